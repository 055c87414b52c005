"""`python -m fit3d.scenes.demo [--preset demo] [key=value ...]`: generate a config's demo set
under `scenes.root`, else `<run.out>/scenes/demo` (cached: nothing to do when it exists)."""

from __future__ import annotations

import time

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry
from fit3d.scenes import generate_demo_set


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Generate the demo scenes of a config (default preset: demo)."""
    cfg = parse_cli(argv, "python -m fit3d.scenes.demo", "Generate the embedded demo scenes.")
    t0 = time.perf_counter()
    root = generate_demo_set(cfg, verbose=True)
    print(f"demo scenes ready in {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
