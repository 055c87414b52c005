"""fit3d.errors: `cli_entry` turns a UserError into one line on stderr and exit code 2, and leaves
everything else alone."""

from __future__ import annotations

import pytest

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry


def test_cli_entry_turns_user_error_into_one_line_exit_2(capsys) -> None:
    @cli_entry
    def main(argv: list[str] | None = None) -> int:
        parse_cli(argv, "prog", "test")
        return 0

    assert main(["lift.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown config key 'lift.stepz'")
    assert main(["lift.steps=1"]) == 0


def test_cli_entry_passes_argv_and_return_codes_through_and_keeps_the_name(capsys) -> None:
    seen = []

    @cli_entry
    def main(argv: list[str] | None = None) -> int:
        """Doc."""
        seen.append(argv)
        return len(argv or [])

    assert main(["a", "b", "c"]) == 3 and main() == 0
    assert seen == [["a", "b", "c"], None]
    assert (main.__name__, main.__doc__) == ("main", "Doc.")
    assert capsys.readouterr().err == ""


def test_cli_entry_does_not_swallow_other_errors() -> None:
    @cli_entry
    def main(argv: list[str] | None = None) -> int:
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        main([])
