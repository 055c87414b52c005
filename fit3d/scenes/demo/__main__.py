"""`python -m fit3d.scenes.demo [--preset demo] [key=value ...]`: generate a config's demo set
under `scenes.root`, else `<run.out>/scenes/demo` (cached: nothing to do when it exists)."""

from __future__ import annotations

import time

from fit3d.config import parse_cli
from fit3d.errors import cli_entry
from fit3d.scenes import demo_root
from fit3d.scenes.demo import generate_demo


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Generate the demo scenes of a config (default preset: demo)."""
    cfg = parse_cli(argv, "python -m fit3d.scenes.demo", "Generate the embedded demo scenes.")
    sc = cfg.scenes
    root = demo_root(sc, cfg.run.out)
    t0 = time.perf_counter()
    generate_demo(
        root,
        seed=sc.demo_seed,
        n_train=sc.demo_train,
        n_val=sc.demo_val,
        n_views=sc.demo_views,
        width=sc.demo_width,
        height=sc.demo_height,
        verbose=True,
    )
    print(f"demo scenes ready in {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
