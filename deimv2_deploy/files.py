"""Writing files so that nothing incomplete ever stands under a final name (no torch, no OpenCV).

Every writer in the package goes through `atomic_write`: write under a temporary name beside the final one,
verify, flush to disk, then rename onto the final name (atomic on one file system). A failure, or a stop
(Ctrl-C; SIGTERM in the command-line tools, see `deimv2_deploy.signals`), removes the temporaries, or keeps what
was written as `<name>.partial<ext>` when asked (`keep_partial`).

    with atomic_write("out/report.json") as tmp:
        tmp.write_text(text)

    with atomic_write("m.xml", "m.bin") as (xml, weights):   # published together, the first one last
        ov.save_model(model, str(xml))                         # (a reader never sees a new .bin beside an old .xml)

    out = AtomicWrite("clip.mp4", verify=check_video)          # long-lived: a video written frame by frame
    ... out.tmp ...; out.publish()  # or out.keep_partial() / out.discard()

Temporary names are `.<stem>.<pid>-<token>.tmp<ext>`: hidden, unique, with the final extension (OpenCV and
OpenVINO pick the format from it; `x.xml` and `x.bin` get matching names, as `ov.save_model` wants). Nothing is
created before the writer writes, so files get the usual permissions (0666 minus the umask) with no chmod.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deimv2_deploy.signals import shielded

__all__ = ["AtomicWrite", "atomic_write", "write_bytes", "write_text", "work_folder", "partial_path", "file_sha256",
           "describe_os_error", "free_bytes", "NothingWritten"]


class NothingWritten(OSError):
    """A writer finished without error but left no (or an empty) file."""


def partial_path(path: str | os.PathLike) -> Path:
    """`out.mp4` -> `out.partial.mp4`: where the output of a failed run is kept."""
    p = Path(path)
    return p.with_name(f"{p.stem}.partial{p.suffix}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, or of the files directly inside a folder (sorted by name)."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def describe_os_error(error: OSError) -> str:
    """One line for a user: what failed, where, and what to do (full disk, read-only or forbidden folder)."""
    where = error.filename or ""
    if error.errno == errno.ENOSPC:
        free = free_bytes(where)
        room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return (f"no space left on the device writing {where or 'a file'}{room}: free some space or write "
                "elsewhere (--output-dir / --output)")
    if error.errno == errno.EROFS:
        return (f"{where or 'the output folder'} is on a read-only file system: write elsewhere "
                "(--output-dir / --output)")
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where or error.strerror}: choose a folder you may write to, or fix its permissions"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where or 'a file'}: free some space or write elsewhere"
    text = str(error)
    return text if text else type(error).__name__


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path) if path else Path.cwd()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some file systems cannot open folders: the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory and e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


class AtomicWrite:
    """One or more files written under temporary names and published together when complete.

    `verify(tmps)` (optional) raises when what was written is not what it should be; every file must also
    exist and be non-empty. `publish()` verifies, flushes each file to disk, removes the first final name,
    renames the others, then the first one (the one readers look for) last. `discard()` removes the
    temporaries; `keep_partial(check)` renames the non-empty ones to `<name>.partial<ext>` (only those passing
    `check`, if given) and removes the rest.
    """

    def __init__(self, *finals: str | os.PathLike, verify: Callable[[Sequence[Path]], Any] | None = None) -> None:
        if not finals:
            raise ValueError("AtomicWrite needs at least one final path")
        self.finals = [Path(f) for f in finals]
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.tmps = [f.with_name(f".{f.stem}.{token}.tmp{f.suffix}") for f in self.finals]
        self.verify = verify
        self.settled = False

    @property
    def tmp(self) -> Path:
        return self.tmps[0]

    def prepare(self) -> AtomicWrite:
        """Create the folders (only now: a run that fails earlier leaves no empty folder behind)."""
        for f in self.finals:
            f.parent.mkdir(parents=True, exist_ok=True)
        return self

    def check(self) -> None:
        for tmp, final in zip(self.tmps, self.finals, strict=True):
            if not tmp.exists() or tmp.stat().st_size == 0:
                raise NothingWritten(f"nothing was written to {final}")
        if self.verify is not None:
            self.verify(list(self.tmps))

    def name_error(self, error: BaseException) -> BaseException:
        """`error` naming the final file instead of a temporary one (or none): what a user can act on."""
        if isinstance(error, OSError) and error.errno is not None:  # a system error (its message names no file)
            names = {str(t): str(f) for t, f in zip(self.tmps, self.finals, strict=True)}
            if error.filename is None or str(error.filename) in names:
                error.filename = names.get(str(error.filename), str(self.finals[0]))
        return error

    def publish(self) -> list[Path]:
        """Verify, flush and rename onto the final names; on any failure the temporaries are removed. A stop
        signal meanwhile takes effect after the renames (`deimv2_deploy.signals.shielded`)."""
        with shielded():
            return self._publish()

    def _publish(self) -> list[Path]:
        try:
            self.check()
            for tmp in self.tmps:
                _fsync(tmp)
            first, *rest = list(zip(self.tmps, self.finals, strict=True))
            if rest:
                first[1].unlink(missing_ok=True)  # readers never see new companions beside an old main file
            for tmp, final in (*rest, first):
                os.replace(tmp, final)
            for folder in {f.parent for f in self.finals}:
                _fsync(folder, directory=True)
        except BaseException as e:
            self.discard()
            self.name_error(e)
            raise
        self.settled = True
        return list(self.finals)

    def discard(self) -> None:
        for tmp in self.tmps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.settled = True

    def keep_partial(self, check: Callable[[Path], bool] | None = None) -> list[Path]:
        """Keep what was written as `<name>.partial<ext>`; returns the kept paths."""
        kept = []
        for tmp, final in zip(self.tmps, self.finals, strict=True):
            try:
                usable = tmp.exists() and tmp.stat().st_size > 0 and (check is None or check(tmp))
                if usable:
                    os.replace(tmp, partial_path(final))
                    kept.append(partial_path(final))
            except OSError:
                pass
        self.discard()
        return kept

    def __enter__(self) -> Any:
        self.prepare()
        return self.tmps[0] if len(self.tmps) == 1 else tuple(self.tmps)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self.settled:
            return False
        if exc_type is None:
            self.publish()
        else:
            self.discard()
            self.name_error(exc)
        return False


def atomic_write(*finals: str | os.PathLike, verify: Callable[[Sequence[Path]], Any] | None = None) -> AtomicWrite:
    """`with atomic_write(final) as tmp:` (or several finals -> a tuple of temporaries): see `AtomicWrite`."""
    return AtomicWrite(*finals, verify=verify)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """`data` to `path` atomically; the written size is checked before the file is published."""
    data = memoryview(data).cast("B")

    def same_size(tmps: Sequence[Path]) -> None:
        size = tmps[0].stat().st_size
        if size != data.nbytes:
            raise OSError(f"{path} was not written completely ({size} of {data.nbytes} bytes): is the disk full?")

    with atomic_write(path, verify=same_size) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`text` to `path` atomically (see `write_bytes`)."""
    return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def work_folder(prefix: str = "deimv2-") -> Iterator[Path]:
    """A private scratch folder in the system's temporary directory, removed afterwards (also on errors)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
