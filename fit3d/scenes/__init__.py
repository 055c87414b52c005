"""Scenes: posed views with lazy images, sparse points and optional ground truth.

One reader (`open_scene`) serves ScanNet++ DSLR data, the generated demo rooms and your own scenes
(COLMAP, nerfstudio, photos), which are written in the same layout (see `fit3d.scenes.scannetpp`,
`fit3d.scenes.demo` and `fit3d.scenes.own`). Resolving the scenes of a config is pure: the demo
set is generated, and own scenes are prepared, only when asked for (`generate_demo_set`,
`python -m fit3d.scenes.demo`, `python -m fit3d.scenes.own`, `make scenes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fit3d.errors import UserError

if TYPE_CHECKING:
    from fit3d.config import Config
    from fit3d.scenes.scannetpp import Scene, list_scenes, open_scene


def __getattr__(name: str) -> Any:
    """`Scene`, `open_scene` and `list_scenes` load the reader (torch) on first use, so entry
    points under this package check their settings first."""
    if name in ("Scene", "open_scene", "list_scenes"):
        from fit3d.scenes import scannetpp

        return getattr(scannetpp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Scene", "open_scene", "list_scenes", "resolve_scenes", "generate_demo_set"]

SPLITS = ("train", "val")
"""Split names of a config: `train` -> `scenes.train_split`, `val` -> `scenes.val_split`."""


def _demo_kwargs(cfg: Config) -> dict:
    """`generate_demo` keyword arguments of the config's demo set."""
    sc = cfg.scenes
    return {
        "seed": sc.demo_seed,
        "n_train": sc.demo_train,
        "n_val": sc.demo_val,
        "n_views": sc.demo_views,
        "width": sc.demo_width,
        "height": sc.demo_height,
        "n_probe": sc.demo_probe,
        "probe_views": sc.demo_probe_views,
        "n_test": sc.demo_test,
        "test_views": sc.demo_test_views,
        "test_seed": sc.demo_test_seed,
    }


def generate_demo_set(cfg: Config, verbose: bool = False) -> Path:
    """Generate (or reuse, when its parameters match) the config's demo set; returns its root."""
    from fit3d.runs import demo_scenes_dir
    from fit3d.scenes.demo import generate_demo

    return generate_demo(demo_scenes_dir(cfg), verbose=verbose, **_demo_kwargs(cfg))


def _check_demo_set(cfg: Config, root: Path) -> None:
    """UserError unless `root` holds the demo set the config describes (its `demo.json` marker)."""
    from fit3d.scenes.demo import GENERATOR_VERSION

    want = {"version": GENERATOR_VERSION, **_demo_kwargs(cfg)}
    make = "run `make scenes` (or `python -m fit3d.scenes.demo` with the same settings)"
    try:
        have = json.loads((root / "demo.json").read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"no demo scenes in {root}: {make}") from None
    if have != want:
        raise UserError(f"the demo scenes in {root} were made with other settings ({have}): {make}")


def scenes_root(cfg: Config) -> Path:
    """The dataset root of `cfg.scenes` (checked: it exists and holds the expected layout)."""
    from fit3d.runs import demo_scenes_dir
    from fit3d.scenes.scannetpp import GET_SCANNETPP

    sc = cfg.scenes
    if sc.name == "demo":
        root = demo_scenes_dir(cfg)
        _check_demo_set(cfg, root)
        return root
    if sc.name == "scannetpp":
        root_str = sc.root or os.environ.get("SCANNETPP_ROOT", "")
        if not root_str:
            raise UserError(
                f"no ScanNet++ root (scenes.root and SCANNETPP_ROOT empty): {GET_SCANNETPP}"
            )
        root = Path(root_str)
        if not (root / "data").is_dir():
            raise UserError(f"ScanNet++ root {root} has no data/ folder: {GET_SCANNETPP}")
        return root
    from fit3d.scenes.own import NAMES, prepared_root

    if sc.name in NAMES:
        return prepared_root(cfg)
    raise UserError(f"unknown scenes.name '{sc.name}' (known: demo, scannetpp, {', '.join(NAMES)})")


def resolve_scenes(cfg: Config, split: str) -> tuple[Path, list[str], float]:
    """(root, scene ids, resolution) of `split` ("train" or "val") of a config's scene set.

    Pure: reads the split file; the demo set must have been generated (`generate_demo_set`).
    """
    from fit3d.scenes.scannetpp import list_scenes

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = scenes_root(cfg)
    sc = cfg.scenes
    ids = list_scenes(root, sc.train_split if split == "train" else sc.val_split)
    if sc.max_scenes > 0:
        ids = ids[: sc.max_scenes]
    if not ids:
        raise UserError(f"split '{split}' of {root} lists no scenes")
    return root, ids, sc.resolution
