"""`python -m fit3d.eval [--preset demo] [key=value ...]`: before/after report of FiT3D features
(see `fit3d.eval.run`)."""

from __future__ import annotations

import sys

from fit3d.cli import parse_cli
from fit3d.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv,
        "python -m fit3d.eval",
        "Evaluate original vs fine-tuned features.",
        inputs=("scenes", "backbone", "eval"),
    )
    from fit3d.eval.run import run  # torch, timm: only for settings that passed

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
