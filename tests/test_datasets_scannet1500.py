"""ScanNet-1500 reader on fixtures in LoFTR's npz layout and SuperGlue's pair list: fixed pairs,
colour resized to the depth size with K scaled, depth in metres, and the relative pose of each
pair equal to the planted one in both layouts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fit3d.datasets import open_dataset
from fit3d.errors import UserError

FRAMES = [(707, 0, 15, 30), (707, 0, 30, 45)]  # two pairs sharing a frame


def _pose(f: int) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_euler("xyz", [0.1 * f, -0.02 * f, 0.3]).as_matrix()
    c2w[:3, 3] = [0.01 * f, 1.0, 2.0]
    return c2w


def _frames(root, sid="scene0707_00"):
    rng = np.random.default_rng(5)
    for d in ("color", "depth", "pose"):
        (root / sid / d).mkdir(parents=True, exist_ok=True)
    depths = {}
    for f in (15, 30, 45):
        cv2.imwrite(str(root / sid / "color" / f"{f}.jpg"), np.full((968, 1296, 3), f, np.uint8))
        depths[f] = rng.integers(0, 6000, (480, 640), dtype=np.uint16)
        cv2.imwrite(str(root / sid / "depth" / f"{f}.png"), depths[f])
        np.savetxt(root / sid / "pose" / f"{f}.txt", _pose(f))
    return depths


K_COLOR = np.array([[1165.7, 0, 649.0], [0, 1165.7, 484.0], [0, 0, 1]])


def test_loftr_layout(tmp_path):
    depths = _frames(tmp_path)
    np.savez(tmp_path / "test.npz", name=np.array(FRAMES))
    np.savez(tmp_path / "intrinsics.npz", scene0707_00=K_COLOR)
    ds = open_dataset("scannet1500", tmp_path, "test")
    assert len(ds) == 4 and ds.pairs() == [(0, 1), (2, 3)]
    assert ds.image_norm == "half"  # Probe3D's ScanNet pairs: mean = std = 0.5
    s0, s1 = ds[2], ds[3]
    assert (s0.key, s1.key, s0.group) == ("0001/0", "0001/1", "scene0707_00")
    assert s0.image.shape == (480, 640, 3) and torch.allclose(
        s0.image, torch.full_like(s0.image, 30 / 255), atol=2 / 255
    )
    assert torch.equal(s1.depth, torch.from_numpy(depths[45].astype(np.float32) / 1000))
    assert torch.allclose(s0.K[0], torch.tensor([1165.7 * 640 / 1296, 0, 649.0 * 640 / 1296]))
    rel = s1.viewmat.double() @ torch.linalg.inv(s0.viewmat.double())
    expect = np.linalg.inv(_pose(45)) @ _pose(30)
    assert np.allclose(rel.numpy(), expect, atol=1e-5)


def test_superglue_list_and_rotation_refused(tmp_path):
    _frames(tmp_path / "scans_test")
    lines = []
    for _, _, f0, f1 in FRAMES:
        T = np.linalg.inv(_pose(f1)) @ _pose(f0)
        vals = [*K_COLOR.ravel(), *K_COLOR.ravel(), *T.ravel()]
        paths = [f"scans_test/scene0707_00/color/{f}.jpg" for f in (f0, f1)]
        lines.append(" ".join([*paths, "0", "0", *(f"{v:.10g}" for v in vals)]))
    (tmp_path / "scannet_test_pairs_with_gt.txt").write_text("\n".join(lines) + "\n")
    ds = open_dataset("scannet1500", tmp_path, "test")
    assert len(ds) == 4 and ds.info(0).group == "scene0707_00"
    s0, s1 = ds[0], ds[1]
    assert torch.equal(s0.viewmat, torch.eye(4))
    rel = s1.viewmat.double() @ torch.linalg.inv(s0.viewmat.double())
    assert np.allclose(rel.numpy(), np.linalg.inv(_pose(30)) @ _pose(15), atol=1e-5)
    assert s0.depth.shape == (480, 640)
    bad = lines[0].split()
    bad[2] = "1"
    (tmp_path / "scannet_test_pairs_with_gt.txt").write_text(" ".join(bad) + "\n")
    with pytest.raises(UserError, match="EXIF rotation"):
        open_dataset("scannet1500", tmp_path, "test")


def test_bad_roots(tmp_path):
    with pytest.raises(UserError, match="test.npz.*LoFTR"):
        open_dataset("scannet1500", tmp_path, "test")
    _frames(tmp_path)
    np.savez(tmp_path / "test.npz", name=np.array(FRAMES))
    np.savez(tmp_path / "intrinsics.npz", scene0707_00=K_COLOR)
    (tmp_path / "scene0707_00" / "depth" / "45.png").unlink()
    with pytest.raises(UserError, match="45.png"):
        open_dataset("scannet1500", tmp_path, "test")
