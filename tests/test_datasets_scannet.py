"""ScanNet reader on fixtures in both layouts: the official scannet_frames_25k (colour JPEG larger
than the uint8 NYU-40 label and uint16 millimetre depth, 4x4 pose and intrinsics text files) and
FiT3D's export (mmseg folders for segmentation, a list file for depth)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fit3d.datasets import open_dataset
from fit3d.datasets.scannet import SCANNET40_CLASSES
from fit3d.errors import UserError


def _frames_root(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "scannet_frames_25k"
    sid = "scene0000_00"
    for d in ("color", "depth", "label", "pose"):
        (root / sid / d).mkdir(parents=True)
    K = np.array([[1170.0, 0, 647.5, 0], [0, 1170.0, 483.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.savetxt(root / sid / "intrinsics_color.txt", K)
    planted = {}
    for n in (0, 100):
        color = np.full((968, 1296, 3), 40 + n, np.uint8)
        depth = rng.integers(0, 9000, (480, 640), dtype=np.uint16)
        label = np.zeros((480, 640), np.uint8)
        label[:100] = 1  # wall
        label[100:200] = 40  # otherprop
        label[200:210] = 22  # ceiling
        pose = np.eye(4)
        pose[:3, 3] = [1.0, 2.0, 0.5 + n / 100]
        cv2.imwrite(str(root / sid / "color" / f"{n}.jpg"), color)
        cv2.imwrite(str(root / sid / "depth" / f"{n}.png"), depth)
        cv2.imwrite(str(root / sid / "label" / f"{n}.png"), label)
        np.savetxt(root / sid / "pose" / f"{n}.txt", pose)
        planted[n] = (depth, pose)
    (root / "scannetv2_train.txt").write_text(sid + "\nscene0001_00\n")  # second not downloaded
    (root / "scannetv2_val.txt").write_text("scene0002_00\n")
    return tmp_path, planted


def test_frames_25k_layout(tmp_path):
    path, planted = _frames_root(tmp_path)
    ds = open_dataset("scannet", path, "train")
    assert len(ds) == 2 and ds.tasks == {"seg", "depth", "corr"} and ds.classes == SCANNET40_CLASSES
    s = ds[1]
    assert s.key == "scene0000_00/100" and s.group == "scene0000_00"
    assert s.image.shape == (480, 640, 3)  # colour resized to the label size
    assert torch.allclose(s.image, torch.full_like(s.image, 140 / 255), atol=2 / 255)
    assert torch.equal(s.depth, torch.from_numpy(planted[100][0].astype(np.float32) / 1000))
    assert (s.seg[:100] == SCANNET40_CLASSES.index("wall")).all()
    assert (s.seg[100:200] == SCANNET40_CLASSES.index("otherprop")).all()
    assert (s.seg[200:210] == SCANNET40_CLASSES.index("ceiling")).all()
    assert (s.seg[210:] == 255).all()
    assert s.eval_mask.sum() == 426 * 560 and s.eval_mask[45, 41] and not s.eval_mask[44, 41]
    assert torch.allclose(s.K[0], torch.tensor([1170 * 640 / 1296, 0, 647.5 * 640 / 1296]))
    assert torch.allclose(s.viewmat, torch.from_numpy(np.linalg.inv(planted[100][1])).float())
    assert ds.info(1).K is not None and ds.info(1).height == 480
    with pytest.raises(UserError, match="scene0002_00.*ScanNet"):
        open_dataset("scannet", path, "val")


def test_fit3d_export_layout(tmp_path):
    for sub in ("training", "validation"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        (tmp_path / "annotations" / sub).mkdir(parents=True)
    img = np.full((48, 64, 3), 7, np.uint8)
    lab = np.zeros((48, 64), np.uint8)
    lab[:, :10] = 5  # chair
    cv2.imwrite(str(tmp_path / "images" / "validation" / "a.jpg"), img)
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / "a.png"), lab)
    (tmp_path / "scans").mkdir()
    cv2.imwrite(str(tmp_path / "scans" / "a.jpg"), img)
    cv2.imwrite(str(tmp_path / "scans" / "a_depth.png"), np.full((48, 64), 2500, np.uint16))
    (tmp_path / "scannet_val.txt").write_text("/scans/a.jpg /scans/a_depth.png 577.87\n")
    seg = open_dataset("scannet", tmp_path, "val")
    assert seg.tasks == {"seg"} and (seg[0].seg[:, :10] == SCANNET40_CLASSES.index("chair")).all()
    assert (seg[0].seg[:, 10:] == 255).all() and seg[0].eval_mask is None  # 48x64: no Eigen crop
    dep = open_dataset("scannet", tmp_path, "val", task="depth")
    assert dep.tasks == {"depth"} and torch.allclose(dep[0].depth, torch.full((48, 64), 2.5))
    (tmp_path / "images" / "training").rmdir()
    with pytest.raises(UserError, match="images/training"):
        open_dataset("scannet", tmp_path, "train")
