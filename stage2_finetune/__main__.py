"""`python -m stage2_finetune [--preset NAME] [key.sub=value ...]`: fine-tune a backbone."""

from __future__ import annotations

import json
import sys

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv,
        prog="python -m stage2_finetune",
        description="Stage 2: fine-tune a 2D backbone on features rendered from a stage-1 run.",
        inputs=("backbone",),
    )
    from fit3d.runs import run_dir
    from stage2_finetune.train import run  # Lightning, torch, timm: only for settings that passed

    meta = run(cfg)
    if meta:
        print(f"wrote {run_dir(cfg, 'finetune')}: " + json.dumps(meta["heldout"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
