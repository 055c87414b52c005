"""KITTI depth, Eigen split, as FiT3D evaluates it (KB crop, Garg crop, depth / 256, 80 m).

Layout (the monocular-depth toolbox / BTS arrangement FiT3D's config reads)::

    <root>/input/<date>/<date>_drive_<nnnn>_sync/image_02/data/<frame>.png     KITTI raw images
    <root>/gt_depth/<date>_drive_<nnnn>_sync/proj_depth/groundtruth/image_02/<frame>.png
    <root>/kitti_eigen_train.txt, <root>/kitti_eigen_test.txt

Images: the KITTI raw data (www.cvlibs.net/datasets/kitti/raw_data.php); depth: the annotated
depth maps (www.cvlibs.net/datasets/kitti/eval_depth.php, `data_depth_annotated.zip`; uint16 PNG,
metres x 256, 0 = no measurement), the train and val drives merged into one `gt_depth/`. The split
lists are BTS's `eigen_train_files_with_gt.txt` / `eigen_test_files_with_gt.txt`
(github.com/cleinc/bts, `train_test_inputs/`), accepted under either name: one
`<image path> <depth path | None> <focal>` per line; lines without depth are skipped, as FiT3D does.

Protocol: the KB crop (bottom 352 rows, centred 1216 columns) is applied to image, depth and K,
train and test; `eval_mask` is the Garg crop of that 352x1216 frame, scored at test only (FiT3D
trains on every ground-truth pixel of the KB crop); depth range (1e-3, 80) m; the depth probe's
colour augmentation draws its brightness from [0.9, 1.1] (FiT3D's KITTI config).
K: the rectified colour camera (P_rect_02) of each recording day.
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
from fit3d.errors import UserError

WHERE = (
    "www.cvlibs.net/datasets/kitti (raw data + data_depth_annotated.zip); split lists: "
    "github.com/cleinc/bts train_test_inputs/eigen_{train,test}_files_with_gt.txt"
)
LISTS = {
    "train": ("kitti_eigen_train.txt", "eigen_train_files_with_gt.txt"),
    "test": ("kitti_eigen_test.txt", "eigen_test_files_with_gt.txt"),
}
KB_HEIGHT, KB_WIDTH = 352, 1216
DEPTH_SCALE = 256.0
P2 = {
    "2011_09_26": (721.5377, 609.5593, 172.8540),
    "2011_09_28": (707.0493, 604.0814, 180.5066),
    "2011_09_29": (718.3351, 600.3891, 181.5122),
    "2011_09_30": (707.0912, 601.8873, 183.1104),
    "2011_10_03": (718.8560, 607.1928, 185.2157),
}
"""Recording day -> (focal, cx, cy) of P_rect_02 (pixels, full 1242x375-ish frame)."""
PAPER: PaperNumbers = {"dinov2": {"eval/depth/rmse": (3.0322, 2.9125)}}


def kb_crop(height: int, width: int) -> tuple[int, int]:
    """(top, left) of the KB crop of a height x width frame."""
    return height - KB_HEIGHT, (width - KB_WIDTH) // 2


def garg_mask(height: int = KB_HEIGHT, width: int = KB_WIDTH) -> torch.Tensor:
    """Garg et al.'s evaluation crop of a (KB-cropped) frame, [H, W] bool."""
    return box_mask(
        height,
        width,
        int(0.40810811 * height),
        int(0.99189189 * height),
        int(0.03594771 * width),
        int(0.96405229 * width),
    )


class KITTI(EvalSet):
    """KITTI Eigen `train` or `test` (with ground-truth depth); see the module docstring."""

    name = "kitti"
    tasks = frozenset({"depth"})
    max_depth = 80.0
    paper = PAPER
    mask_is_crop = True
    color_brightness = (0.9, 1.1)

    def __init__(self, root: str | Path, split: str):
        check_split(self.name, split, tuple(LISTS))
        self.root, self.split = Path(root), split
        lists = [self.root / n for n in LISTS[split]]
        what = "the Eigen split list (or BTS's name for it)"
        lst, self.items = read_pair_list(lists, what, WHERE)
        for sub, k, what in (
            ("input", 0, "KITTI raw image"),
            ("gt_depth", 1, "annotated depth PNG"),
        ):
            lacking = [it[k] for it in self.items if not (self.root / sub / it[k]).is_file()]
            if lacking:
                raise missing(
                    self.root / sub / lacking[0],
                    f"the {what} of every line of {lst.name} ({len(lacking)} missing)",
                    WHERE,
                )

    def __len__(self) -> int:
        return len(self.items)

    def _key(self, i: int) -> str:
        return self.items[i][0].removesuffix(".png").replace("/image_02/data/", "/")

    def _K(self, i: int, top: int, left: int) -> torch.Tensor | None:
        day = Path(self.items[i][0]).parts[0]
        if day not in P2:
            return None
        f, cx, cy = P2[day]
        return intrinsics(f, f, cx - left, cy - top)

    def info(self, i: int) -> ViewInfo:
        return ViewInfo(self._key(i), self._key(i).rsplit("/", 1)[0], KB_HEIGHT, KB_WIDTH)

    def _load(self, i: int) -> Sample:
        img_rel, dep_rel = self.items[i]
        rgb = read_rgb(self.root / "input" / img_rel)
        depth = read_png(self.root / "gt_depth" / dep_rel).astype(np.float32) / DEPTH_SCALE
        h, w = depth.shape
        if rgb.shape[:2] != (h, w) or h < KB_HEIGHT or w < KB_WIDTH:
            raise UserError(
                f"{self.root / 'input' / img_rel}: image {rgb.shape[1]}x{rgb.shape[0]} and depth "
                f"{w}x{h} must match and be at least {KB_WIDTH}x{KB_HEIGHT}"
            )
        top, left = kb_crop(h, w)
        crop = (slice(top, top + KB_HEIGHT), slice(left, left + KB_WIDTH))
        return Sample(
            key=self._key(i),
            image=to_image(rgb[crop]),
            depth=torch.from_numpy(np.ascontiguousarray(depth[crop])),
            eval_mask=garg_mask(),
            K=self._K(i, top, left),
            group=self._key(i).rsplit("/", 1)[0],
        )
