"""Check installed dependency versions against the floors in pyproject.toml.

    python tools/check_floors.py [--extras dev] [--pyproject PATH]

Reads `[project] dependencies` (and the named optional-dependency groups), skips requirements
whose environment marker does not apply, and prints one line per distribution that is missing or
older than its floor; exits 1 if there is any, else prints one summary line and exits 0. Versions
come from the installed distributions' metadata (what pip compared), not from imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        raise SystemExit("check_floors: needs Python >= 3.11 or the tomli package") from None

ROOT = Path(__file__).resolve().parents[1]


def requirements(pyproject: Path, extras: Iterable[str] = ()) -> list[Requirement]:
    """The project's requirements plus those of `extras`, as written in `pyproject`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for name in extras:
        if name not in optional:
            raise SystemExit(
                f"check_floors: no optional-dependencies group '{name}' in {pyproject}"
            )
        lines += optional[name]
    return [Requirement(line) for line in lines]


def violations(reqs: Iterable[Requirement], installed: Callable[[str], str | None]) -> list[str]:
    """One line per applicable requirement that `installed(name)` (a version string, or None when
    absent) does not satisfy."""
    out = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = installed(req.name)
        if have is None:
            out.append(f"{req.name}: not installed (pyproject needs {req.specifier})")
        elif not req.specifier.contains(Version(have), prereleases=True):
            out.append(f"{req.name}: installed {have}, pyproject needs {req.specifier}")
    return out


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", action="append", default=[], help="optional group, e.g. dev")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    reqs = requirements(args.pyproject, args.extras)
    bad = violations(reqs, installed_version)
    for line in bad:
        print(f"check_floors: {line}")
    if bad:
        return 1
    print(f"check_floors: {len(reqs)} requirements satisfied by the installed versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
