"""`python -m stage1_lift [--preset demo] [key=value ...]`: lift the scenes of one split.

Scenes already finished (their `meta.json` exists) are skipped; an interrupted scene resumes from
its checkpoint. `SHARD=i/n` (or a SLURM array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
takes every n-th scene, so shards share one run folder without coordination: each scene folder has
one writer and `summary.json` is rebuilt from the per-scene files by every shard.
"""

from __future__ import annotations

import sys

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 1 when no scene of this shard could be lifted."""
    cfg = parse_cli(
        argv,
        "python -m stage1_lift",
        "Stage 1: lift features into 3D Gaussians",
        inputs=("scenes", "backbone"),
    )
    from stage1_lift.run import run  # torch, timm, gsplat: only for settings that passed

    return 0 if run(cfg)["done"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
