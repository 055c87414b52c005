"""NYUv2 reader on a fixture in the official format: a MATLAB v7.3 (HDF5, column-major) labeled
set written with h5py, MATLAB v5 splits.mat and classMapping40.mat written with scipy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from fit3d.datasets import open_dataset
from fit3d.datasets.nyuv2 import NYU13_CLASSES
from fit3d.errors import UserError

N = 4
# raw 894-class ids planted in the label maps, and the NYU-40 class each maps to
RAW_TO_40 = {5: 1, 11: 2, 157: 4, 3: 23, 172: 25, 894: 40, 21: 22}
NAME_OF_40 = {1: "wall", 2: "floor", 4: "bed", 23: "books", 25: "tv", 40: "objects", 22: "ceiling"}


def write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """HDF5 with MATLAB's 512-byte v7.3 header; arrays given in MATLAB order (H, W, C, N) are
    stored reversed, as MATLAB does."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(v.transpose(tuple(range(v.ndim))[::-1])))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("nyu")
    images = rng.integers(0, 256, (480, 640, 3, N), dtype=np.uint8)  # MATLAB: H, W, C, N
    depths = rng.uniform(0.5, 9.5, (480, 640, N)).astype(np.float32)
    raw_depths = depths * (rng.random((480, 640, N)) > 0.3)  # holes, as the Kinect's
    labels = np.zeros((480, 640, N), np.uint16)
    raws = list(RAW_TO_40)
    for n in range(N):
        for k, raw in enumerate(raws):
            labels[k * 60 : (k + 1) * 60, :, n] = raw  # horizontal bands, last band unlabeled
    write_mat73(
        root / "nyu_depth_v2_labeled.mat",
        {"images": images, "depths": depths, "rawDepths": raw_depths, "labels": labels},
    )
    scipy.io.savemat(
        root / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2], [4]])}
    )
    map_class = np.full((1, 894), 40, dtype=np.float64)
    for raw, c40 in RAW_TO_40.items():
        map_class[0, raw - 1] = c40
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": map_class})
    return root, {"images": images, "depths": depths, "raw": raw_depths, "labels": labels}


def test_test_split_images_depth_labels_and_eigen_crop(root):
    path, planted = root
    ds = open_dataset("nyuv2", path, "test")
    assert len(ds) == 2 and ds.classes == NYU13_CLASSES and ds.max_depth == 10.0
    s = ds[1]  # test image number 4 -> index 3
    assert s.key == "0004"
    assert torch.equal((s.image * 255).round().byte(), torch.from_numpy(planted["images"][..., 3]))
    assert torch.equal(s.depth, torch.from_numpy(planted["raw"][..., 3]))  # raw, holes = 0
    filled = open_dataset("nyuv2", path, "test", depth="filled")[1]
    assert torch.equal(filled.depth, torch.from_numpy(planted["depths"][..., 3]))
    assert ds.mask_tasks == {"depth"} and ds.mask_is_crop  # seg scored on the whole frame
    for k, raw in enumerate(RAW_TO_40):
        band = s.seg[k * 60 : (k + 1) * 60]
        assert (band == NYU13_CLASSES.index(NAME_OF_40[RAW_TO_40[raw]])).all()
    assert (s.seg[len(RAW_TO_40) * 60 :] == 255).all()  # raw 0 = unlabeled -> ignore
    m = s.eval_mask
    assert m.shape == (480, 640) and m.sum() == (471 - 45) * (601 - 41)
    assert m[45, 41] and m[470, 600] and not m[44, 41] and not m[45, 40] and not m[471, 300]
    assert not m[200, 601]
    assert s.K[0, 0] == pytest.approx(518.8579, rel=1e-6)


def test_train_split_and_no_crop_option(root):
    path, _ = root
    ds = open_dataset("nyuv2", path, "train", eigen_crop=False)
    assert [ds.info(i).key for i in range(len(ds))] == ["0001", "0003"]
    assert ds[0].eval_mask is None


def test_bad_depth_option(root):
    path, _ = root
    with pytest.raises(UserError, match="depth must be one of"):
        open_dataset("nyuv2", path, "test", depth="inpainted")


def test_bad_roots(root, tmp_path):
    with pytest.raises(UserError, match="nyu_depth_v2_labeled.mat.*nyu_depth_v2.html"):
        open_dataset("nyuv2", tmp_path, "test")
    path, _ = root
    with pytest.raises(UserError, match="no split 'val'"):
        open_dataset("nyuv2", path, "val")
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"not hdf5")
    (tmp_path / "classMapping40.mat").write_bytes((path / "classMapping40.mat").read_bytes())
    (tmp_path / "splits.mat").write_bytes((path / "splits.mat").read_bytes())
    with pytest.raises(UserError, match="MATLAB v7.3"):
        open_dataset("nyuv2", tmp_path, "test")
