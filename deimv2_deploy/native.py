"""What native libraries (onnxsim's C++, FFmpeg) print straight to the process's stdout/stderr, captured at the
file descriptors so the caller can summarise it in one line instead of flooding the console."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["native_output_captured"]


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)  # what C/C++ libraries buffered (std::cout goes through C stdio)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """The lines native code (onnxsim's C++, say) prints to stdout/stderr inside the block, captured at the file
    descriptors instead of reaching the console; the list is filled when the block ends."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(line for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip())
