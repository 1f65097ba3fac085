"""SIGTERM and SIGHUP as a clean stop, like Ctrl-C.

`docker stop`, systemd and `timeout` end a process with SIGTERM, whose default action kills it on the spot: no
`finally` runs, so temporaries stay behind and a video being written is lost. Inside `stop_signals_as_interrupt()`
those signals raise `Terminated` (a KeyboardInterrupt) in the main thread instead, so every clean-up that Ctrl-C
gets (partial outputs kept, temporaries removed) runs for them too.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Terminated", "stop_signals_as_interrupt", "shielded", "STOP_SIGNALS"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP); handled wherever Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _State:
    shield = 0  # depth of `shielded()` blocks in the main thread
    pending: int | None = None  # a stop signal that came while shielded


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A clean-up that must finish (renaming finished files, keeping partial ones): a stop signal that comes
    meanwhile is raised as `Terminated` when the outermost shielded block ends, not in the middle of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.shield += 1
    try:
        yield
    finally:
        _State.shield -= 1
        if _State.shield == 0 and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise `Terminated` in the main thread (once: a second signal during the
    clean-up is ignored so the clean-up can finish; SIGKILL still ends the process).

    Only signals still on their default action are taken over, and only from the main thread: a program that
    installed its own handlers, or calls this from another thread, is left as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if raised.is_set():
            return
        raised.set()
        if _State.shield:
            _State.pending = signum
        else:
            raise Terminated(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
