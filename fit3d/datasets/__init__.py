"""Evaluation datasets behind one small interface (`fit3d.datasets.base`): `open_dataset(name,
root, split, **options) -> EvalSet`, a lazy sequence of `Sample`s.

| name | module | splits | tasks |
|---|---|---|---|
| `demo`, `scannetpp` | `scenes` | train, val | seg, depth, normals, corr |
| `nyuv2` | `nyuv2` | train, test | seg (13 classes), depth |
| `nyu` | `nyu_bts` | train, test | depth (BTS's raw frames: FiT3D's NYU depth) |
| `ade20k` | `ade20k` | train, val | seg (150) |
| `voc2012` | `voc` | train, val | seg (21) |
| `kitti` | `kitti` | train, test | depth |
| `scannet` | `scannet` | train, val | seg (40), depth |
| `navi` | `navi` | train, val, trainval, test | depth, normals, corr |
| `scannet1500` | `scannet1500` | test | depth, corr (fixed pairs) |
| `nyu_normals` | `nyu_normals` | train, val, trainval, test | depth, normals |

Each module's docstring gives the official layout it reads and where to get it; `python -m
fit3d.datasets.scannetpp_labels` renders ScanNet++'s ground truth from its meshes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fit3d.errors import UserError

if TYPE_CHECKING:
    from fit3d.datasets.base import EvalSet, Sample, ViewInfo


def __getattr__(name: str) -> Any:
    """`EvalSet`, `Sample` and `ViewInfo` load `base` (torch) on first use, so `DATASETS` is
    read and `python -m fit3d.datasets.scannetpp_labels` checks its settings before torch."""
    if name in ("EvalSet", "Sample", "ViewInfo"):
        from fit3d.datasets import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalSet", "Sample", "ViewInfo", "open_dataset", "DATASETS"]

DATASETS: dict[str, tuple[str, str]] = {
    "demo": ("scenes", "ScenesSet"),
    "scannetpp": ("scenes", "ScenesSet"),
    "nyuv2": ("nyuv2", "NYUv2"),
    "nyu": ("nyu_bts", "NYUDepth"),
    "ade20k": ("ade20k", "ADE20k"),
    "voc2012": ("voc", "VOC2012"),
    "kitti": ("kitti", "KITTI"),
    "scannet": ("scannet", "ScanNet"),
    "navi": ("navi", "NAVI"),
    "scannet1500": ("scannet1500", "ScanNet1500"),
    "nyu_normals": ("nyu_normals", "NYUNormals"),
}
"""name -> (module under fit3d.datasets, EvalSet class)."""


def open_dataset(name: str, root: str | Path, split: str, **options) -> EvalSet:
    """Open `split` of dataset `name` at `root` (validated now; pixels load per sample).

    `options` are the reader's keyword arguments (e.g. `max_views=` for scene sets); an unknown
    name or option is a UserError.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    module, cls_name = DATASETS[name]
    cls = getattr(importlib.import_module(f"fit3d.datasets.{module}"), cls_name)
    if name in ("demo", "scannetpp"):
        options = {"kind": name, **options}
    try:
        return cls(root, split, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"dataset {name}: {str(e).split('() ', 1)[-1]}") from e
        raise
