"""tools/check_floors.py: installed versions against pyproject's floors, one line per violation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_floors", ROOT / "tools" / "check_floors.py")
check_floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_floors)

PYPROJECT = """
[project]
name = "x"
dependencies = [
    "alpha>=1.5",
    "beta>=2.0,<3",
    "gamma>=1.0; platform_machine == 'no-such-machine'",
    "delta",
]
[project.optional-dependencies]
dev = ["epsilon>=0.6"]
"""


@pytest.fixture
def pyproject(tmp_path: Path) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT)
    return path


def test_one_line_per_missing_or_too_old_distribution(pyproject):
    installed = {"alpha": "1.4.9", "beta": "2.0.0", "delta": "0.1", "epsilon": "0.5"}
    reqs = check_floors.requirements(pyproject, ["dev"])
    lines = check_floors.violations(reqs, installed.get)
    assert lines == [
        "alpha: installed 1.4.9, pyproject needs >=1.5",
        "epsilon: installed 0.5, pyproject needs >=0.6",
    ]  # gamma's marker does not apply here; beta and delta are satisfied
    installed |= {"alpha": "1.5.0rc1"}
    assert check_floors.violations(reqs, installed.get)[0].startswith("alpha: installed 1.5.0rc1")
    installed |= {"alpha": "1.5", "epsilon": "1.0"}
    assert check_floors.violations(reqs, installed.get) == []
    del installed["beta"]
    assert check_floors.violations(reqs, installed.get) == [
        "beta: not installed (pyproject needs <3,>=2.0)"
    ]


def test_main_exits_1_on_a_violation_and_0_when_satisfied(tmp_path, capsys):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\ndependencies = ["pytest>=999"]\n')
    assert check_floors.main(["--pyproject", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pytest: installed" in out and ">=999" in out
    path.write_text('[project]\nname = "x"\ndependencies = ["pytest>=1"]\n')
    assert check_floors.main(["--pyproject", str(path)]) == 0


def test_unknown_extras_group_is_an_error(pyproject):
    with pytest.raises(SystemExit, match="no optional-dependencies group 'docs'"):
        check_floors.requirements(pyproject, ["docs"])
