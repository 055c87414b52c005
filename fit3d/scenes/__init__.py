"""Scenes: posed views with lazy images, sparse points and optional ground truth.

One reader (`open_scene`) serves ScanNet++ DSLR data and the generated demo rooms, which are
written in the same layout (see `fit3d.scenes.scannetpp` and `fit3d.scenes.demo`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fit3d.errors import UserError
from fit3d.scenes.scannetpp import GET_SCANNETPP, Scene, list_scenes, open_scene

if TYPE_CHECKING:
    from fit3d.config import ScenesConfig

__all__ = ["Scene", "open_scene", "list_scenes", "resolve_scenes", "generate_demo"]


def generate_demo(out: str | Path, seed: int = 0, **kwargs) -> Path:
    """Generate (or reuse) the demo scene set under `out`; see `fit3d.scenes.demo`."""
    from fit3d.scenes.demo import generate_demo as _generate

    return _generate(out, seed=seed, **kwargs)


def demo_root(cfg: ScenesConfig, out_root: str | Path) -> Path:
    """Where the demo set of `cfg` lives: `cfg.root`, else `<out_root>/scenes/demo`."""
    return Path(cfg.root) if cfg.root else Path(out_root) / "scenes" / "demo"


def resolve_scenes(
    cfg: ScenesConfig, out_root: str | Path, split: str
) -> tuple[Path, list[str], float]:
    """(root, scene ids, resolution) of `split` ("train" or "val") for a scenes config.

    `name=demo` generates the demo set on first use (cached); `name=scannetpp` reads `cfg.root`
    or $SCANNETPP_ROOT.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.name == "demo":
        root = generate_demo(
            demo_root(cfg, out_root),
            seed=cfg.demo_seed,
            n_train=cfg.demo_train,
            n_val=cfg.demo_val,
            n_views=cfg.demo_views,
            width=cfg.demo_width,
            height=cfg.demo_height,
        )
    elif cfg.name == "scannetpp":
        root_str = cfg.root or os.environ.get("SCANNETPP_ROOT", "")
        if not root_str:
            raise UserError(
                f"no ScanNet++ root (scenes.root and SCANNETPP_ROOT empty): {GET_SCANNETPP}"
            )
        root = Path(root_str)
        if not (root / "data").is_dir():
            raise UserError(f"ScanNet++ root {root} has no data/ folder: {GET_SCANNETPP}")
    else:
        raise UserError(f"unknown scenes.name '{cfg.name}' (known: demo, scannetpp)")
    ids = list_scenes(root, cfg.train_split if split == "train" else cfg.val_split)
    if cfg.max_scenes > 0:
        ids = ids[: cfg.max_scenes]
    if not ids:
        raise UserError(f"split '{split}' of {root} lists no scenes")
    return root, ids, cfg.resolution
