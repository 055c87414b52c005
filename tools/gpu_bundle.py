"""The GPU bundle's bookkeeping: what the borrowed GPU machine lacks, what may travel, what ran.

    python tools/gpu_bundle.py requirements          # the wheels to download, one per line
    python tools/gpu_bundle.py check [--bundle DIR] [--limit-mib 60]
    python tools/gpu_bundle.py pins [--python PY]    # the CPU rehearsal's requirement lines
    python tools/gpu_bundle.py audit [--bundle DIR] LOG_DIR

The machine (`tools/gpu_machine.txt`: its distributions, versions where known) has torch and
most of what fit3d needs but not gsplat, and nothing can be fetched there; one command carries at
most 64 MiB (working tree and extra paths together). `check` verifies a downloaded bundle: one
wheel per distribution, every dependency of every wheel (markers evaluated for Python 3.12 on
x86-64 Linux) present on the machine at a version the wheel accepts (where the list gives a
version) or in the bundle, and bundle + the files that travel with the checkout (tracked and
untracked-not-ignored, as `git ls-files` lists them) under `--limit-mib`.

`pins` prints the rehearsal venv's requirements: `REHEARSAL` pinned to the machine's version
where pip offers it for this Python, else the nearest version pip offers (`OVERRIDES` name the
exceptions and why). `audit` reads the module logs written by `tools/import_log.py` and fails
when a module came from a distribution that is neither on the machine nor in the bundle, nor from
the checkout, the standard library or a kernel built at run time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip carries the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(ROOT / d for d in ("fit3d", "stage1_lift", "stage2_finetune", "tests", "benchmarks",
                                   "tools"))  # fmt: skip
"""The checkout's own code (not ROOT: a rehearsal venv or site folder may live inside it)."""
MACHINE_FILE = ROOT / "tools" / "gpu_machine.txt"
BUNDLE_DIR = ROOT / ".gpu_bundle"
LIMIT_MIB = 60.0
"""The bundle plus the travelling tree stay under this (one command carries at most 64 MiB)."""
BUNDLE = ("gsplat==1.5.3", "pycolmap==4.2.1")
"""What the GPU check needs that the machine lacks: gsplat (pyproject's floor, the version fit3d's
gsplat stand-in and docs describe) and pycolmap (the demo rooms' sparse points are COLMAP text
read by it; 4.2.1 is what fit3d is tested with). wandb, viser, trimesh and embreex are not
needed: fit3d imports each only where used (wandb logging, the viewer, mesh labels)."""
TARGET_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",
}
"""Environment markers of the machine's python3, for evaluating wheels' Requires-Dist."""
REHEARSAL = (
    "torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy",
    "opencv-python-headless", "scikit-image", "scipy", "matplotlib", "onnx", "safetensors",
    "pyyaml", "h5py", "tqdm", "pillow", "pytest", "ninja", "huggingface-hub", "packaging",
    "jaxtyping", "rich",
)  # fmt: skip
"""What the CPU rehearsal installs (with their dependencies): the machine's packages that fit3d,
its tests and the bundle's wheels import."""
OVERRIDES = {
    "torch": ("2.14.1", "pip here is capped at torch<=2.14.1; 2.14.1 is the build that works"),
    "torchvision": ("0.29.1", "the torchvision built for torch 2.14.1"),
}
"""Rehearsal versions chosen by hand instead of the nearest one pip offers, with the reason."""


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_machine(path: Path = MACHINE_FILE) -> dict[str, str | None]:
    """Distribution name (canonical) -> version on the machine, None where unknown."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(member).decode()
    headers = text.split("\n\n", 1)[0].splitlines()
    value = {k: v for k, _, v in (h.partition(": ") for h in headers) if k in ("Name", "Version")}
    requires = [h.partition(": ")[2] for h in headers if h.startswith("Requires-Dist: ")]
    return canonical(value["Name"]), value["Version"], requires


def unmet(wheels: Iterable[Path], machine: dict[str, str | None]) -> list[str]:
    """One line per problem: a distribution bundled twice, or a dependency that applies on the
    machine and is neither there (at an accepted version, where known) nor bundled."""
    metas = [wheel_metadata(w) for w in wheels]
    problems, bundled = [], {}
    for name, version, _ in metas:
        if name in bundled:
            problems.append(f"{name}: bundled twice ({bundled[name]} and {version})")
        bundled[name] = version
    for name, _, requires in metas:
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            dep = canonical(req.name)
            have = bundled.get(dep, machine.get(dep, ""))
            if have == "" and dep not in machine:
                problems.append(f"{name} needs {line}: not on the machine, not bundled")
            elif have and not req.specifier.contains(_version(have), prereleases=True):
                problems.append(f"{name} needs {line}: the machine has {have}")
    return problems


def _version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        return Version("0")


def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of the files that travel with a checkout: tracked plus untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for rel in filter(None, listed):
        path = root / rel.decode()
        if path.is_symlink() or path.is_file():  # a tracked file deleted here does not travel
            total += path.lstat().st_size
    return total


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def check(bundle: Path, root: Path, limit_mib: float, machine: dict[str, str | None]) -> int:
    """Print the bundle's wheels, problems and size; 0 when it is complete and small enough."""
    wheels = sorted(bundle.glob("*.whl"))
    if not wheels:
        print(f"gpu bundle: no wheels in {bundle} (run tools/gpu_bundle.sh)")
        return 1
    for w in wheels:
        print(f"  {w.name}  {w.stat().st_size / 2**20:.1f} MiB")
    wanted = {canonical(Requirement(r).name) for r in BUNDLE}
    have = {wheel_metadata(w)[0] for w in wheels}
    problems = unmet(wheels, machine)
    problems += [f"{n}: missing from the bundle" for n in sorted(wanted - have)]
    tree, extra = travelling_bytes(root), dir_bytes(bundle)
    total = (tree + extra) / 2**20
    print(
        f"gpu bundle: {extra / 2**20:.1f} MiB + travelling tree {tree / 2**20:.1f} MiB "
        f"= {total:.1f} MiB (limit {limit_mib:g} MiB)"
    )
    if total >= limit_mib:
        problems.append(f"bundle + tree {total:.1f} MiB is not under {limit_mib:g} MiB")
    for p in problems:
        print(f"gpu bundle: {p}")
    return 1 if problems else 0


def available_versions(python: str, name: str) -> list[Version]:
    """Versions pip offers `python` for `name` (newest first); [] when it finds none."""
    proc = subprocess.run(
        [python, "-m", "pip", "index", "versions", name],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("Available versions:")), "")
    versions = [_version(v.strip()) for v in line.partition(":")[2].split(",") if v.strip()]
    return sorted(versions, reverse=True)


def nearest(wanted: Version, offered: list[Version]) -> Version | None:
    """`wanted` when offered, else the newest older one, else the oldest newer one."""
    if wanted in offered:
        return wanted
    older = [v for v in offered if v < wanted]
    newer = [v for v in offered if v > wanted]
    return max(older) if older else (min(newer) if newer else None)


def pins(python: str, machine: dict[str, str | None]) -> list[tuple[str, str, str]]:
    """(requirement line, machine version, note) for each of `REHEARSAL`."""
    out = []
    for name in REHEARSAL:
        there = machine.get(canonical(name)) or "?"
        if name in OVERRIDES:
            version, why = OVERRIDES[name]
            out.append((f"{name}=={version}", there, why))
        elif there == "?":
            out.append((name, there, "version there unknown: pip's newest"))
        else:
            got = nearest(Version(there), available_versions(python, name))
            if got is None:
                out.append((name, there, "pip lists no versions: pip's choice"))
            else:
                note = "same" if str(got) == there else f"nearest pip offers ({there} is not)"
                out.append((f"{name}=={got}", there, note))
    return out


def _owners(paths: set[str]) -> dict[str, list[str]]:
    """Installed file or folder (real path) -> the distributions whose RECORD lists it or a file
    inside it, for `paths` (several for a package vendored with its dist-info: setuptools). The
    project's own metadata is left out: an editable install's fit3d.egg-info in the checkout lists
    the checkout's files, which `roots` decide on."""
    from importlib.metadata import distributions

    out: dict[str, list[str]] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if canonical(name) == "fit3d":
            continue
        for f in dist.files or ():
            path = Path(os.path.realpath(dist.locate_file(f)))
            for p in (path, *path.parents):
                if str(p) in paths and name not in out.get(str(p), []):
                    out.setdefault(str(p), []).append(name)
    return out


def audit(logs: Iterable[Path], allowed: set[str], roots: list[Path]) -> list[str]:
    """One line per logged top-level module that came from a distribution outside `allowed`.

    A log line is `name<TAB>file` (a namespace package's folder instead of a file; '' when it has
    neither). A module passes, checked in this order, when:
    - a distribution whose RECORD lists its file (or a file in its folder) is allowed;
    - it belongs to the standard library (by name, or its file is the interpreter's);
    - its file lies under one of `roots` (the checkout's code, folders kernels are built in);
    - a distribution that provides its name is allowed;
    - it has neither file nor distribution (made at run time, such as Cython's `_cython_3_x` or
      torch's `_remote_module_non_scriptable`).
    """
    from importlib.metadata import packages_distributions

    std = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    std_dirs = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")]
    seen: dict[str, str] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            name, _, file = line.partition("\t")
            seen.setdefault(name, file)
    owners = _owners({os.path.realpath(f) for f in seen.values() if f})
    by_name = packages_distributions()
    bad = []
    for name, file in sorted(seen.items()):
        if name in std or name.startswith("__"):
            continue
        real = Path(os.path.realpath(file)) if file else None
        if real and str(real) in owners:  # first: a venv or site folder may lie in a root
            dists = owners[str(real)]
        elif real and any(real.is_relative_to(d) for d in std_dirs):
            continue  # e.g. _sysconfigdata_*: the interpreter's own
        elif real and any(real.is_relative_to(r) for r in roots):
            continue
        else:
            dists = by_name.get(name, [])
        if not dists and not file:
            continue
        if not dists:
            bad.append(f"{name}: no distribution found ({file})")
        elif not any(canonical(d) in allowed for d in dists):
            bad.append(f"{name}: from {', '.join(sorted(set(dists)))}, not on the machine")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("requirements", help="the wheels the bundle holds, one per line")
    p = sub.add_parser("check", help="verify a downloaded bundle and the size limit")
    p.add_argument("--bundle", type=Path, default=BUNDLE_DIR)
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    p = sub.add_parser("pins", help="the CPU rehearsal's requirement lines")
    p.add_argument("--python", default=sys.executable, help="interpreter whose pip is asked")
    p = sub.add_parser("audit", help="fail on modules from outside the machine and the bundle")
    p.add_argument("logs", type=Path, help="folder of tools/import_log.py logs")
    p.add_argument("--bundle", type=Path, default=BUNDLE_DIR)
    p.add_argument("--root", type=Path, action="append", default=[], help="also allowed")
    args = parser.parse_args(argv)
    machine = read_machine()
    if args.cmd == "requirements":
        print("\n".join(BUNDLE))
        return 0
    if args.cmd == "check":
        return check(args.bundle, ROOT, args.limit_mib, machine)
    if args.cmd == "pins":
        for line, there, note in pins(args.python, machine):
            print(f"gpu rehearsal: {line:<32} machine {there:<12} {note}", file=sys.stderr)
            print(line)
        return 0
    logs = sorted(args.logs.glob("*.txt"))
    if not logs:
        print(f"import audit: no module logs in {args.logs}")
        return 1
    allowed = set(machine) | {wheel_metadata(w)[0] for w in args.bundle.glob("*.whl")}
    bad = audit(logs, allowed, [*PROJECT, *(r.resolve() for r in args.root)])
    n = len({ln.partition("\t")[0] for log in logs for ln in log.read_text().splitlines()})
    for line in bad:
        print(f"import audit: {line}")
    verdict = f"{len(bad)} from elsewhere" if bad else "all from the machine's list or the bundle"
    print(f"import audit: {n} top-level modules in {len(logs)} processes, {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
