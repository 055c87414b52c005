"""NYU Depth v2 as FiT3D trains and tests its depth probe: BTS's export of the raw video frames
(dataset `nyu`, FiT3D's `eval_data/nyu`).

Layout (what BTS's README and the depth toolbox FiT3D's configs come from produce)::

    <root>/nyu_train.txt   or BTS's nyudepthv2_train_files_with_gt.txt   (24,231 lines)
    <root>/nyu_test.txt    or BTS's nyudepthv2_test_files_with_gt.txt    (654 lines)
    one line per frame: `<rgb path> <depth path | None> <focal>`, e.g.
        /kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579   (train)
        bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579                 (test)
    <root>/<scene>/rgb_<n>.jpg, sync_depth_<n>.png   uint16 PNG, millimetres, 0 = no reading

Paths are relative to `<root>` (a leading slash is dropped, as FiT3D does); where they are not
there, BTS's own folders are tried: `<root>/sync/` for train (the `sync.zip` of raw frames) and
`<root>/official_splits/test/` for test (BTS's `extract_official_train_test_set_from_mat.py`,
which writes the labeled set's `rawDepths` x 1000 as uint16 and blacks out the colour image
outside rows 7:474, columns 7:632). Lines whose depth is `None` are skipped and the rest sorted by
image path, as FiT3D's NYUDataset does. The split lists come from github.com/cleinc/bts
(`train_test_inputs/`); the frames from BTS's README (its sync.zip) and the labeled .mat.

Protocol (FiT3D's NYU depth config): train frames are cut to rows 45:472, columns 43:608
(`NYUCrop`, 427x565, image and depth); test frames stay 480x640 and `eval_mask` is the Eigen crop
(rows 45:471, columns 41:601), scored at test only. Depth is raw (holes are 0, invalid), range
(1e-3, 10) m. K: the NYU colour camera (FiT3D's `cam_intrinsic`), shifted by the crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    box_mask,
    check_split,
    intrinsics,
    missing,
    read_pair_list,
    read_png,
    read_rgb,
    to_image,
)
from fit3d.datasets.nyuv2 import EIGEN_CROP, K_NYU
from fit3d.errors import UserError

WHERE = (
    "github.com/cleinc/bts (README: sync.zip of raw frames, extract_official_train_test_set_"
    "from_mat.py; lists in train_test_inputs/)"
)
LISTS = {
    "train": ("nyu_train.txt", "nyudepthv2_train_files_with_gt.txt"),
    "test": ("nyu_test.txt", "nyudepthv2_test_files_with_gt.txt"),
}
BTS_DIRS = {"train": "sync", "test": "official_splits/test"}
"""BTS's own folder of each split, tried when a listed path is not under the root."""
NYU_CROP = (45, 472, 43, 608)
"""FiT3D's `NYUCrop` of training frames: rows [45, 472), columns [43, 608)."""
DEPTH_SCALE = 1000.0
PAPER: PaperNumbers = {"dinov2": {"eval/depth/rmse": (0.4423, 0.4198)}}


class NYUDepth(EvalSet):
    """BTS's NYU depth frames, `train` (24,231) or `test` (654); see the module docstring."""

    name = "nyu"
    tasks = frozenset({"depth"})
    max_depth = 10.0
    paper = PAPER
    mask_is_crop = True

    def __init__(self, root: str | Path, split: str, nyu_crop: bool = True):
        check_split(self.name, split, tuple(LISTS))
        self.root, self.split = Path(root), split
        self.crop = nyu_crop and split == "train"
        lists = [self.root / n for n in LISTS[split]]
        what = "the NYU split list (or BTS's name for it)"
        lst, self.items = read_pair_list(lists, what, WHERE)
        bts = self.root / BTS_DIRS[split]
        self.base = self.root if (self.root / self.items[0][0]).is_file() else bts
        lacking = [
            it for it in self.items if not all((self.base / p).is_file() for p in it)
        ]  # fmt: skip
        if lacking:
            first = next(self.base / p for p in lacking[0] if not (self.base / p).is_file())
            raise missing(
                first,
                f"the colour and depth of every line of {lst.name} ({len(lacking)} lack)",
                WHERE,
            )

    def __len__(self) -> int:
        return len(self.items)

    def _key(self, i: int) -> str:
        return self.items[i][0].removesuffix(".jpg")

    def _box(self) -> tuple[int, int, int, int]:
        return NYU_CROP if self.crop else (0, 480, 0, 640)

    def _K(self) -> torch.Tensor:
        top, _, left, _ = self._box()
        fx, fy, cx, cy = K_NYU
        return intrinsics(fx, fy, cx - left, cy - top)

    def info(self, i: int) -> ViewInfo:
        top, bottom, left, right = self._box()
        group = Path(self.items[i][0]).parent.name
        return ViewInfo(self._key(i), group, bottom - top, right - left, self._K(), None)

    def _load(self, i: int) -> Sample:
        rgb_rel, depth_rel = self.items[i]
        rgb = read_rgb(self.base / rgb_rel)
        depth = read_png(self.base / depth_rel).astype(np.float32) / DEPTH_SCALE
        if rgb.shape[:2] != (480, 640) or depth.shape != (480, 640):
            raise UserError(
                f"{self.base / rgb_rel}: colour {rgb.shape[1]}x{rgb.shape[0]} and depth "
                f"{depth.shape[1]}x{depth.shape[0]} must both be 640x480"
            )
        top, bottom, left, right = self._box()
        crop = (slice(top, bottom), slice(left, right))
        return Sample(
            key=self._key(i),
            image=to_image(rgb[crop]),
            depth=torch.from_numpy(np.ascontiguousarray(depth[crop])),
            eval_mask=None if self.crop else box_mask(480, 640, *EIGEN_CROP),
            K=self._K(),
            group=Path(rgb_rel).parent.name,
        )
