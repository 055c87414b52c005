"""Probe3D's NYU normals reader on fixtures in the release formats: the labeled set as MATLAB
v7.3 (HDF5) with rawDepths, FAIR's gzip-pickled normals and SN40 json lists, and GeoNet's
per-frame MATLAB v5 files (mean-subtracted images); checks splits, the >10 m depth cut, the
normals cache and bad roots."""

from __future__ import annotations

import gzip
import json
import pickle

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from fit3d.datasets import open_dataset
from fit3d.datasets.nyu_normals import GEONET_MEAN
from fit3d.errors import UserError

N = 3


def _mat73(path, arrays):
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(v.transpose(tuple(range(v.ndim))[::-1])))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116))


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (480, 640, 3, N), dtype=np.uint8)
    raw = rng.uniform(0.5, 12.0, (480, 640, N)).astype(np.float32)
    zeros = np.zeros((480, 640, N), np.uint16)
    _mat73(
        tmp_path / "nyu_depth_v2_labeled.mat",
        {"images": images, "depths": raw, "rawDepths": raw, "labels": zeros},
    )
    normals = np.zeros((N, 480, 640, 3), np.float32)
    for n in range(N):
        normals[n, ..., 0], normals[n, ..., 2] = np.sin(0.3 * n), -np.cos(0.3 * n)
    normals[:, :5] = 0  # no normal on the top rows
    with gzip.open(tmp_path / "all_normals.pklz", "wb") as f:
        pickle.dump(
            {"all_normals": normals, "all_filenames": ["000001", "000002", "000003"]}, f, protocol=2
        )
    (tmp_path / "test_SN40.json").write_text(
        json.dumps([{"img": "000003_rgb.png"}, {"img": "000002_rgb.png"}])
    )
    (tmp_path / "train_SN40.json").write_text(json.dumps([{"img": "000001_rgb.png"}]))
    geo = tmp_path / "nyu_geonet"
    geo.mkdir()
    for k in range(21):
        img = np.full((12, 16, 3), 100.0) - 2 * GEONET_MEAN  # stored mean-subtracted
        depth = np.full((12, 16), 3.0 + k)
        norm = np.tile([0.0, 0.0, -2.0], (12, 16, 1))  # not unit: the reader normalises
        scipy.io.savemat(
            geo / f"living_room_{k:04d}_0000-{k}.mat", {"img": img, "depth": depth, "norm": norm}
        )
    return tmp_path, images, raw, normals


def test_test_split_and_normals_cache(root):
    path, images, raw, normals = root
    ds = open_dataset("nyu_normals", path, "test", center_crop=False)
    assert len(ds) == 2 and ds.tasks == {"depth", "normals"}
    s = ds[0]  # image number 3
    assert s.key == "0003"
    assert torch.equal((s.image * 255).round().byte(), torch.from_numpy(images[..., 2]))
    d = raw[..., 2]
    assert torch.equal(s.depth, torch.from_numpy(np.where(d <= 10, d, 0).astype(np.float32)))
    assert torch.allclose(s.normals[10, 10], torch.tensor([np.sin(0.6), 0, -np.cos(0.6)]).float())
    assert (s.normals[:5] == 0).all()
    assert (path / "test_normals.npy").is_file()
    (path / "all_normals.pklz").unlink()  # the cache is enough from now on
    again = open_dataset("nyu_normals", path, "test", center_crop=False)[1]
    assert again.key == "0002" and torch.allclose(
        again.normals[10, 10], torch.tensor([np.sin(0.3), 0, -np.cos(0.3)]).float()
    )


def test_center_crop_default_is_probe3d_480x480(root):
    path, images, raw, normals = root
    ds = open_dataset("nyu_normals", path, "test")  # Probe3D's NYU config: center_crop True
    s, full = ds[0], open_dataset("nyu_normals", path, "test", center_crop=False)[0]
    assert s.image.shape == (480, 480, 3) and ds.info(0).width == 480
    assert torch.equal(s.image, full.image[:, 80:560])  # Probe3D's [..., 80:-80]
    assert torch.equal(s.depth, full.depth[:, 80:560])
    assert torch.equal(s.normals, full.normals[:, 80:560])
    assert s.K[0, 2] == pytest.approx(full.K[0, 2] - 80) and s.K[1, 2] == full.K[1, 2]


def test_geonet_train_val(root):
    path, *_ = root
    train, val, trainval = (
        open_dataset("nyu_normals", path, split, center_crop=False)
        for split in ("train", "val", "trainval")
    )
    assert (len(train), len(val)) == (19, 2)  # every 20th file is val
    assert len(trainval) == 21  # what Probe3D trains on
    assert [val.info(i).key for i in range(2)] == [
        "living_room_0000_0000-0",
        "living_room_0020_0000-20",
    ]
    s = val[1]
    assert torch.allclose(s.image, torch.full((12, 16, 3), 100 / 255))
    assert (s.depth == 0).all()  # 23 m > 10 m: invalid
    assert torch.allclose(val[0].depth, torch.full((12, 16), 3.0))
    assert torch.allclose(s.normals, torch.tensor([0.0, 0.0, -1.0]).expand(12, 16, 3))


def test_bad_roots(tmp_path):
    with pytest.raises(UserError, match="nyu_depth_v2_labeled.mat"):
        open_dataset("nyu_normals", tmp_path, "test")
    with pytest.raises(UserError, match="nyu_geonet.*GeoNet"):
        open_dataset("nyu_normals", tmp_path, "train")
