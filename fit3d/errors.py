"""One exception type for bad user input, turned into a one-line message and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (path, file, config, backbone): reported as one line, exit 2."""


def cli_entry(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap an entry point `main(argv) -> int` so a `UserError` prints one line and returns 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
