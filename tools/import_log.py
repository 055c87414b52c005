"""Record the top-level modules a process imported, for `tools/gpu_bundle.py audit`.

With FIT3D_IMPORT_LOG=DIR set, `write()` (benchmarks/gpu_check.py calls it before it exits) and
this module as a pytest plugin (`pytest -p import_log`, with tools/ on the path: at the end of the
session) each write `<DIR>/<pid>.txt`, one `name<TAB>file` line per top-level module in
sys.modules (a namespace package's first folder instead of a file; empty when neither).
Without the variable both do nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "FIT3D_IMPORT_LOG"


def modules() -> dict[str, str]:
    """Top-level module name -> its file, or for a namespace package its first folder ('' for
    built-in modules and modules made at run time)."""
    out = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or "." in name:
            continue
        folder = next(iter(getattr(mod, "__path__", None) or []), "")
        out[name] = getattr(mod, "__file__", None) or folder
    return out


def write(folder: str | None = None) -> Path | None:
    """Write this process's log into `folder` (default $FIT3D_IMPORT_LOG); its path or None."""
    folder = folder or os.environ.get(ENV)
    if not folder:
        return None
    path = Path(folder) / f"{os.getpid()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{n}\t{f}\n" for n, f in sorted(modules().items())))
    tmp.replace(path)
    return path


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001 - pytest hook signature
    """pytest hook: log what the collected and run tests imported."""
    write()
