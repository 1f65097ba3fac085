"""Console scripts: deimv2-export, deimv2-infer, deimv2-bench, deimv2-capi (each module has `main(argv=None)`)."""
from __future__ import annotations

import sys
from collections.abc import Callable

from deimv2_deploy.files import describe_os_error
from deimv2_deploy.signals import Terminated, stop_signals_as_interrupt

__all__ = ["run_cli", "USER_ERRORS", "user_message"]

# errors a user can fix: printed as one line, exit status 1, no traceback. OSError covers missing files and
# folders, a file where a folder was expected, permissions, read-only file systems and full disks.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, NotImplementedError, RuntimeError)


def user_message(error: BaseException) -> str:
    """The one line a user sees for `error` (its notes, e.g. where partial output was kept, follow it)."""
    if isinstance(error, OSError) and error.errno is not None:
        text = describe_os_error(error)
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the library put in it


def _line(prog: str, text: str, error: BaseException) -> str:
    notes = [" ".join(str(n).split()) for n in getattr(error, "__notes__", [])]  # e.g. where partial output went
    return "; ".join([f"{prog}: {text}", *notes])


def run_cli(body: Callable[[], int], prog: str) -> int:
    """Run a command's body: user errors as one line and exit status 1, Ctrl-C 130, SIGTERM/SIGHUP 128 + N
    (with the same clean-up as Ctrl-C)."""
    try:
        with stop_signals_as_interrupt():
            return body()
    except Terminated as e:
        print(_line(prog, str(e), e), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt as e:
        print(_line(prog, "interrupted", e), file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(_line(prog, f"error: {user_message(e)}", e), file=sys.stderr)
        return 1
