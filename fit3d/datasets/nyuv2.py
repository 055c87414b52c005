"""NYU Depth v2, labeled set: FiT3D's 13-class segmentation and Eigen-split depth.

Layout (official release + the standard metadata files)::

    <root>/nyu_depth_v2_labeled.mat   MATLAB v7.3 (HDF5): images, depths, labels (894 classes)
    <root>/splits.mat                 trainNdxs (795) / testNdxs (654), 1-based image numbers
    <root>/classMapping40.mat         mapClass: 894 raw classes -> NYU-40 (Gupta et al.)

`nyu_depth_v2_labeled.mat` and `splits.mat` come from the NYU page
(cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html); `classMapping40.mat` from
github.com/ankurhanda/nyuv2-meta-data. Splits: `train` = 795 images, `test` = 654 (the Eigen test
set of every depth benchmark).

Segmentation: 13 classes (`NYU13_CLASSES`, FiT3D's NYUV2Dataset order), raw label -> NYU-40 ->
NYU-13 (`NYU40_TO_13`, Couprie et al.'s mapping as in the meta-data repo's class13Mapping.mat);
unlabeled -> 255 (FiT3D's reduce_zero_label), scored on the whole frame as FiT3D does. Depth:
`depth="raw"` (default) reads the Kinect depth with its holes (`rawDepths`, what BTS's export of
the test set holds), `depth="filled"` the inpainted `depths`; range (1e-3, 10) m. `eval_mask`
is the Eigen crop (rows 45:471, columns 41:601 of the 480x640 frame, FiT3D's `eigen_crop`) and
applies to depth only (`mask_tasks`), at test only (`mask_is_crop`).

FiT3D's NYUv2 depth numbers come from another set: BTS's export of 24k raw video frames for
training and the 654 test frames (`fit3d.datasets.nyu_bts`, dataset `nyu`). Depth from this
reader trains on the 795 labeled images instead, so its results carry no published number.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
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
    reduce_zero_label,
    require_file,
    to_image,
)
from fit3d.errors import UserError

WHERE = "cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html (labeled .mat, splits.mat)"
WHERE_META = "github.com/ankurhanda/nyuv2-meta-data (classMapping40.mat)"
NYU13_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting", "sofa",
    "table", "tv", "wall", "window",
)  # fmt: skip
NYU40_TO_13 = np.array(
    [0, 12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6, 11, 7, 7,
     7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7],
    dtype=np.int64,
)  # fmt: skip
"""NYU-40 id (0 = unlabeled) -> NYU-13 id (1-based, 0 = unlabeled)."""
EIGEN_CROP = (45, 471, 41, 601)
"""Rows [45, 471), columns [41, 601) of the 480x640 frame."""
K_NYU = (518.8579, 519.4696, 325.5824, 253.7362)
"""fx, fy, cx, cy of the NYU Kinect colour camera (as the NYU toolbox publishes them)."""
PAPER: PaperNumbers = {"dinov2": {"eval/seg/miou": (0.6555, 0.675)}}
"""FiT3D's NYUv2 segmentation; its depth numbers belong to `nyu` (BTS's frames)."""
DEPTH_KEYS = {"raw": "rawDepths", "filled": "depths"}
"""`depth` option -> the labeled set's dataset."""


class LabeledMat:
    """Lazy per-image access to `nyu_depth_v2_labeled.mat` (HDF5, MATLAB column-major).

    The handle is opened on first use in each process, so forked loader workers do not share it.
    """

    def __init__(self, path: Path, keys: tuple[str, ...] = ("images", "depths", "labels")):
        import h5py

        self.path = path
        self._h5 = None
        self._pid = -1
        try:
            with h5py.File(path, "r") as f:
                missing_keys = [k for k in dict.fromkeys(("images", *keys)) if k not in f]
                self.count = int(f["images"].shape[0]) if "images" in f else 0
                shape = tuple(f["images"].shape[1:]) if "images" in f else ()
        except OSError as e:
            raise missing(path, "the MATLAB v7.3 (HDF5) labeled set", WHERE) from e
        if missing_keys or shape != (3, 640, 480):
            raise UserError(
                f"{path}: expected datasets images [N,3,640,480], {', '.join(keys[1:])} (found "
                f"{'missing ' + ', '.join(missing_keys) if missing_keys else f'images {shape}'})"
            )

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def image(self, i: int) -> np.ndarray:
        """RGB uint8 [480, 640, 3] of 0-based image i."""
        return np.ascontiguousarray(self._file()["images"][i].transpose(2, 1, 0))

    def array(self, name: str, i: int) -> np.ndarray:
        """A [480, 640] per-image dataset (`depths`, `labels`, `rawDepths`) of image i."""
        return np.ascontiguousarray(self._file()[name][i].T)


def read_split_indices(path: Path, split: str) -> list[int]:
    """0-based image indices of `train` / `test` from the official `splits.mat`."""
    require_file(path, "trainNdxs / testNdxs (1-based)", WHERE)
    key = "trainNdxs" if split == "train" else "testNdxs"
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: unreadable MATLAB file ({e})") from e
    if key not in mat:
        raise UserError(f"{path}: expected variables trainNdxs and testNdxs")
    return [int(v) - 1 for v in np.asarray(mat[key]).reshape(-1)]


class NYUv2(EvalSet):
    """NYUv2 labeled set, `train` (795) or `test` (654); see the module docstring."""

    name = "nyuv2"
    tasks = frozenset({"seg", "depth"})
    classes = NYU13_CLASSES
    max_depth = 10.0
    paper = PAPER
    mask_tasks = frozenset({"depth"})
    mask_is_crop = True

    def __init__(self, root: str | Path, split: str, eigen_crop: bool = True, depth: str = "raw"):
        check_split(self.name, split, ("train", "test"))
        if depth not in DEPTH_KEYS:
            raise UserError(
                f"dataset nyuv2: depth must be one of {list(DEPTH_KEYS)}, got {depth!r}"
            )
        self.root, self.split, self.eigen_crop = Path(root), split, eigen_crop
        self.depth_key = DEPTH_KEYS[depth]
        mat_path = require_file(
            self.root / "nyu_depth_v2_labeled.mat", "the labeled set (MATLAB v7.3)", WHERE
        )
        map_path = require_file(
            self.root / "classMapping40.mat", "mapClass (894 -> 40)", WHERE_META
        )
        self.indices = read_split_indices(self.root / "splits.mat", split)
        try:
            map40 = np.asarray(scipy.io.loadmat(map_path)["mapClass"]).reshape(-1)
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"{map_path}: expected a MATLAB file with mapClass ({e})") from e
        # raw id (0 = unlabeled, 1..894) -> 13-class id (0 = unlabeled)
        self.raw_to_13 = NYU40_TO_13[np.concatenate([[0], map40.astype(np.int64)])]
        self.mat = LabeledMat(mat_path, ("images", self.depth_key, "labels"))
        bad = [i + 1 for i in self.indices if not 0 <= i < self.mat.count]
        if bad:
            raise UserError(f"{self.root / 'splits.mat'}: image {bad[0]} is not in {mat_path}")

    def __len__(self) -> int:
        return len(self.indices)

    def info(self, i: int) -> ViewInfo:
        return ViewInfo(f"{self.indices[i] + 1:04d}", "", 480, 640, intrinsics(*K_NYU), None)

    def _load(self, i: int) -> Sample:
        j = self.indices[i]
        raw = self.mat.array("labels", j).astype(np.int64)
        if raw.max(initial=0) >= len(self.raw_to_13):
            raise UserError(f"{self.mat.path}: image {j + 1} has label {raw.max()} > 894")
        depth = self.mat.array(self.depth_key, j).astype(np.float32)
        return Sample(
            key=f"{j + 1:04d}",
            image=to_image(self.mat.image(j)),
            seg=reduce_zero_label(self.raw_to_13[raw]),
            depth=torch.from_numpy(np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)),
            eval_mask=box_mask(480, 640, *EIGEN_CROP) if self.eigen_crop else None,
            K=intrinsics(*K_NYU),
        )
