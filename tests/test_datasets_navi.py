"""NAVI reader on a fixture in the release layout (annotations.json per collection, JPEG images
with EXIF orientation, uint16 inverse-depth PNGs): splits over objects and collections, depth
decoding, the square crop and K, the pose against scipy's quaternion, normals against analytic
planes, and the pair rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from fit3d.datasets import open_dataset
from fit3d.datasets.navi import normals_from_depth
from fit3d.errors import UserError

H, W, F = 80, 100, 120.0
VALUE = 655  # stored inverse depth -> 655.35 / 655 m


def _collection(path, n, rng, exif_first=False):
    (path / "images").mkdir(parents=True)
    (path / "depth").mkdir()
    annos = []
    for k in range(n):
        q = Rotation.from_euler("y", 25.0 * k, degrees=True).as_quat()  # x, y, z, w
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        raw = np.zeros((H, W), np.uint16)
        raw[10:30, 20:60] = VALUE
        size = [H, W]
        if exif_first and k == 0:  # stored landscape, EXIF says rotate: annotations are portrait
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(rgb).save(path / "images" / f"{k:03d}.jpg", exif=exif, quality=98)
            raw = np.ascontiguousarray(np.rot90(raw, -1))
            size = [W, H]
        else:
            Image.fromarray(rgb).save(path / "images" / f"{k:03d}.jpg", quality=98)
        Image.fromarray(raw).save(path / "depth" / f"{k:03d}.png")
        cam = {"q": [q[3], q[0], q[1], q[2]], "t": [10.0 * k, -20.0, 500.0], "focal_length": F}
        annos.append({"filename": f"{k:03d}.jpg", "image_size": size, "camera": cam})
    (path / "annotations.json").write_text(json.dumps(annos))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("navi")
    rng = np.random.default_rng(6)
    for c in range(10):  # 10 multiview collections: 9 train, 1 val
        _collection(root / "keywest" / f"multiview_{c:02d}_pixel", 2, rng)
    _collection(root / "keywest" / "wild_set", 8, rng, exif_first=True)
    _collection(root / "lonely" / "multiview_00_pixel", 2, rng)  # no wild_set: skipped
    return root


def test_splits_keys_and_pose(root):
    train, val, test = (open_dataset("navi", root, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 8)
    assert len(open_dataset("navi", root, "trainval")) == 20  # what Probe3D trains on
    # Probe3D's NAVI: depth bins to 1 m, ground truth counted to 10 m (its loss's cut)
    assert (test.max_depth, test.gt_max_depth) == (1.0, 10.0)
    assert val.info(0).group == "keywest/multiview_09_pixel"
    s = test[3]
    assert s.key == "keywest/wild_set/003" and s.group == "keywest/wild_set"
    R = Rotation.from_euler("y", 75.0, degrees=True).as_matrix()
    assert torch.allclose(s.viewmat[:3, :3], torch.from_numpy(R).float(), atol=1e-6)
    assert torch.allclose(s.viewmat[:3, 3], torch.tensor([0.03, -0.02, 0.5]))


def test_depth_crop_resize_and_normals(root):
    ds = open_dataset("navi", root, "test", size=0)
    s = ds[1]
    # valid depth rows 10:30, cols 20:60 -> square side 40 at top 0, left 20
    assert s.depth.shape == (40, 40)
    assert torch.allclose(s.depth[10:30, 0:40], torch.full((20, 40), 655.35 / VALUE))
    assert (s.depth[:10] == 0).all() and (s.depth[30:] == 0).all()
    assert torch.allclose(s.K, torch.tensor([[F, 0, 30.0], [0, F, 40.0], [0, 0, 1]]))
    inner = s.normals[11:29, 1:39]  # a fronto-parallel patch faces the camera: (0, 0, -1)
    assert torch.allclose(inner, torch.tensor([0.0, 0.0, -1.0]).expand_as(inner), atol=1e-6)
    assert (s.normals[10] == 0).all() and (s.normals[:10] == 0).all()  # border: undefined
    r = open_dataset("navi", root, "test", size=20)[1]
    assert r.image.shape == (20, 20, 3) and r.depth.shape == (20, 20)
    assert torch.allclose(r.K, torch.tensor([[F / 2, 0, 15.0], [0, F / 2, 20.0], [0, 0, 1]]))


def test_exif_orientation_is_applied(root):
    s = open_dataset("navi", root, "test", crop=False, size=0)[0]
    assert s.image.shape == (W, H, 3) and s.depth.shape == (W, H)  # rotated to portrait
    assert s.K[0, 2] == pytest.approx(H / 2) and s.K[1, 2] == pytest.approx(W / 2)


def test_normals_of_a_tilted_plane():
    K = np.array([[200.0, 0, 32], [0, 200.0, 24], [0, 0, 1]])
    n_true = np.array([0.3, -0.2, -1.0])
    n_true /= np.linalg.norm(n_true)  # faces the camera (negative z)
    v, u = np.meshgrid(np.arange(48) + 0.5, np.arange(64) + 0.5, indexing="ij")
    rays = np.stack([(u - 32) / 200, (v - 24) / 200, np.ones_like(u)], -1)
    depth = (n_true @ np.array([0, 0, 2.0])) / (rays @ n_true)  # plane through (0, 0, 2)
    n = normals_from_depth(depth.astype(np.float32), K)
    ang = np.degrees(np.arccos(np.clip(n[1:-1, 1:-1] @ n_true, -1, 1)))
    assert ang.max() < 0.05


def test_pairs_follow_the_rule(root):
    ds = open_dataset("navi", root, "test")
    pairs = ds.pairs()
    assert [i for i, _ in pairs] == [0, 4]  # every 4th view
    for i, j in pairs:
        Ri = ds.info(i).viewmat[:3, :3].double()
        Rj = ds.info(j).viewmat[:3, :3].double()
        ang = torch.rad2deg(torch.arccos(((Ri @ Rj.T).trace() - 1) / 2)).item()
        assert ds.info(i).group == ds.info(j).group and 0 < ang <= 120
    assert pairs == open_dataset("navi", root, "test").pairs()  # seeded


def test_bad_roots(tmp_path):
    with pytest.raises(UserError, match="google/navi"):
        open_dataset("navi", tmp_path / "none", "test")
    with pytest.raises(UserError, match="wild_set.*google/navi"):
        open_dataset("navi", tmp_path, "test")
