"""Console scripts: deimv2-export, deimv2-infer, deimv2-bench, deimv2-capi (each module has `main(argv=None)`)."""
from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["run_cli", "USER_ERRORS"]

# errors a user can fix: printed as one line, exit status 1, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, IsADirectoryError, PermissionError,
                                                NotImplementedError, RuntimeError)


def run_cli(body: Callable[[], int], prog: str) -> int:
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
