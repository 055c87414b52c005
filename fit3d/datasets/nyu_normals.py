"""NYUv2 surface normals as Probe3D uses them: GeoNet's frames for training, the labeled set's
654 test images with Ladicky et al.'s normals for testing.

Layout (Probe3D's `data_processing/README.md`)::

    <root>/nyu_depth_v2_labeled.mat        the labeled set (see fit3d.datasets.nyuv2)
    <root>/all_normals.pklz                FAIR's normals: gzip pickle, all_normals [1449,480,640,3]
    <root>/train_SN40.json, test_SN40.json lists of {"img": "<1-based number>_..."}
    <root>/nyu_geonet/*.mat                GeoNet's training frames: img, depth, norm

(`all_normals.pklz` and the lists: `surfacenormal_metadata/` of FAIR's SSL benchmark,
dl.fbaipublicfiles.com/fair_self_supervision_benchmark/nyuv2_surfacenormal_metadata.zip, moved up
into the root as Probe3D does; GeoNet: github.com/xjqi/GeoNet, data1.zip + data2.zip merged.)

Splits: `test` = the images of `test_SN40.json` (654) with the labeled set's raw Kinect depth
(`rawDepths`, as Probe3D) and the normals of `all_normals.pklz`; `trainval` = GeoNet's files
sorted by name, the two bad files Probe3D drops removed (positions 6919 and 21181 of the full
release): what Probe3D's probes train on; `train` / `val` = every 20th of those for `val`, the
rest for `train`. GeoNet images are stored mean-subtracted (twice the ImageNet-Caffe mean per
channel) and are restored here; all frames are cut to 480x640, then (`center_crop=True`, Probe3D's
NYU config) to their middle 480x480 (columns 80:560), train and test. Depth beyond 10 m is set to
0 (invalid), as Probe3D does.

The normals' axes are the releases' (x to the right; Probe3D trains and scores them unchanged); we
do not re-orient them, so on this set `normals` are in that convention rather than OpenCV's.
The first open of `test` converts the 654 test normals of the pickle (which holds all 1449 and
must be read whole) into `<root>/test_normals.npy` (float32, 2.4 GB, memory-mapped after that).
"""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io
import torch

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    check_split,
    intrinsics,
    missing,
    require_dir,
    require_file,
    to_image,
)
from fit3d.datasets.nyuv2 import K_NYU, LabeledMat
from fit3d.datasets.nyuv2 import WHERE as WHERE_NYU
from fit3d.errors import UserError
from fit3d.io import atomic_path

WHERE_SN = "dl.fbaipublicfiles.com/fair_self_supervision_benchmark/nyuv2_surfacenormal_metadata.zip"
WHERE_GEONET = "github.com/xjqi/GeoNet (NYU training data, data1.zip + data2.zip)"
GEONET_MEAN = np.array([122.175, 116.169, 103.508])
"""Per-channel value GeoNet subtracted twice from its stored images."""
GEONET_BAD = (21181, 6919)
"""Positions (in the sorted full release) of the files Probe3D drops, removed in this order."""
MAX_DEPTH = 10.0
_NAN = float("nan")
PAPER: PaperNumbers = {
    "dinov2_b": {
        "eval/normals/within_11": (0.6201, _NAN),
        "eval/normals/within_22": (0.7932, _NAN),
        "eval/normals/within_30": (0.8532, _NAN),
        "eval/normals/ang_rmse": (22.41, _NAN),
        "eval/depth/delta1": (0.9343, _NAN),
        "eval/depth/rmse": (0.3307, _NAN),
    }
}
"""Probe3D's DINOv2 ViT-B/14 (DPT probe) numbers on this set; FiT3D reports none."""


def sn40_indices(path: Path) -> list[int]:
    """0-based labeled-set indices of a `*_SN40.json` list."""
    require_file(path, 'a JSON list of {"img": "<1-based number>_..."}', WHERE_SN)
    try:
        return [int(str(e["img"]).split("_")[0]) - 1 for e in json.loads(path.read_text())]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: expected a list of {{'img': '<number>_...'}} ({e})") from e


class NYUNormals(EvalSet):
    """Probe3D's NYU normals `train`, `val` (GeoNet) or `test` (labeled set)."""

    name = "nyu_normals"
    tasks = frozenset({"depth", "normals"})
    max_depth = MAX_DEPTH
    paper = PAPER

    def __init__(self, root: str | Path, split: str, center_crop: bool = True):
        check_split(self.name, split, ("train", "val", "trainval", "test"))
        self.root, self.split = Path(root), split
        self.cols = slice(80, 560) if center_crop else slice(0, 640)
        if split == "test":
            mat = require_file(
                root_mat := self.root / "nyu_depth_v2_labeled.mat", "the labeled set", WHERE_NYU
            )
            self.indices = sn40_indices(self.root / "test_SN40.json")
            self.mat = LabeledMat(mat)
            bad = [i for i in self.indices if not 0 <= i < self.mat.count]
            if bad:
                raise UserError(
                    f"{self.root / 'test_SN40.json'}: image {bad[0] + 1} not in {root_mat}"
                )
            self._normals = self._test_normals()
        else:
            folder = require_dir(
                self.root / "nyu_geonet", "GeoNet's *.mat training frames", WHERE_GEONET
            )
            files = sorted(p.name for p in folder.iterdir() if p.suffix == ".mat")
            if len(files) > max(GEONET_BAD):
                for pos in GEONET_BAD:
                    del files[pos]
            keep = {
                "train": lambda k: k % 20 != 0,
                "val": lambda k: k % 20 == 0,
                "trainval": lambda k: True,
            }[split]
            self.files = [folder / f for k, f in enumerate(files) if keep(k)]
            if not self.files:
                raise missing(folder, "GeoNet *.mat files", WHERE_GEONET)

    def _test_normals(self) -> np.ndarray:
        """[654, 480, 640, 3] float32 (memory-mapped), converted from the pickle on first use."""
        cache = self.root / "test_normals.npy"
        if cache.is_file():
            arr = np.load(cache, mmap_mode="r")
            if arr.shape == (len(self.indices), 480, 640, 3):
                return arr
        src = require_file(self.root / "all_normals.pklz", "FAIR's surface normal pickle", WHERE_SN)
        try:
            with gzip.open(src, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            normals = np.asarray(data["all_normals"])
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as e:
            raise UserError(f"{src}: expected a gzip pickle with all_normals ({e})") from e
        if normals.ndim != 4 or normals.shape[1:] != (480, 640, 3):
            raise UserError(f"{src}: all_normals has shape {normals.shape}, expected [N,480,640,3]")
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, normals[self.indices].astype(np.float32))
        return np.load(cache, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.indices) if self.split == "test" else len(self.files)

    def _key(self, i: int) -> str:
        return f"{self.indices[i] + 1:04d}" if self.split == "test" else self.files[i].stem

    def _K(self) -> torch.Tensor:
        fx, fy, cx, cy = K_NYU
        return intrinsics(fx, fy, cx - self.cols.start, cy)

    def info(self, i: int) -> ViewInfo:
        width = self.cols.stop - self.cols.start
        return ViewInfo(self._key(i), "", 480, width, self._K(), None)

    def _load(self, i: int) -> Sample:
        if self.split == "test":
            j = self.indices[i]
            rgb = self.mat.image(j)
            depth = self.mat.array("rawDepths", j).astype(np.float32)
            normals = np.array(self._normals[i], dtype=np.float32)
        else:
            try:
                m = scipy.io.loadmat(self.files[i])
                img, depth, normals = m["img"], m["depth"], m["norm"]
            except (KeyError, ValueError, OSError) as e:
                raise UserError(
                    f"{self.files[i]}: expected a MATLAB file with img, depth, norm ({e})"
                ) from e
            img = img[:480, :640].astype(np.float64) + 2 * GEONET_MEAN
            rgb = np.clip(img, 0, 255).astype(np.uint8)
            depth = depth[:480, :640].astype(np.float32)
            normals = normals[:480, :640].astype(np.float32)
        depth = np.where(np.isfinite(depth) & (depth <= MAX_DEPTH), depth, 0.0).astype(np.float32)
        norm = np.linalg.norm(normals, axis=-1, keepdims=True)
        normals = np.divide(normals, norm, out=np.zeros_like(normals), where=norm > 1e-6)
        c = self.cols
        return Sample(
            key=self._key(i),
            image=to_image(np.ascontiguousarray(rgb[:, c])),
            depth=torch.from_numpy(np.ascontiguousarray(depth[:, c])),
            normals=torch.from_numpy(np.ascontiguousarray(normals[:, c])),
            K=self._K(),
        )
