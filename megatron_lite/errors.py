"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file); printed as one line without a traceback."""


def fail(message: str) -> NoReturn:
    """Raise a UserError; a shorthand that reads well at call sites."""
    raise UserError(message)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line entry point, turning UserError and Ctrl-C into one line and an exit status."""
    try:
        status = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: nothing was left half-written", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)
