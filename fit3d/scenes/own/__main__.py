"""`python -m fit3d.scenes.own --preset images scenes.root=my_photos [key=value ...]`: prepare a
config's own scenes (`colmap`, `nerfstudio`, `images` or a `mix`): posed, undistorted and cached
under `<run.out>/scenes/<name>/` (nothing to do when they are prepared already)."""

from __future__ import annotations

import time

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry
from fit3d.scenes.own import prepare


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Prepare the own scenes of a config (`--preset colmap|nerfstudio|images|mix`)."""
    cfg = parse_cli(
        argv, "python -m fit3d.scenes.own", "Pose, undistort and cache your own scenes."
    )
    t0 = time.perf_counter()
    root = prepare(cfg)
    print(f"{cfg.scenes.name} scenes ready in {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
