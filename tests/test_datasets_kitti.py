"""KITTI reader on a fixture in the official layout: raw PNG images, uint16 PNG depth (metres x
256), BTS-style Eigen split lists with a `None` line; checks the KB crop of image, depth and K,
the Garg evaluation mask, and bad roots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fit3d.datasets import open_dataset
from fit3d.errors import UserError

H, W = 375, 1242
DRIVE = "2011_09_26_drive_0002_sync"


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(3)
    planted = {}
    lines = []
    for frame in ("0000000069", "0000000005"):
        img_rel = f"2011_09_26/{DRIVE}/image_02/data/{frame}.png"
        dep_rel = f"{DRIVE}/proj_depth/groundtruth/image_02/{frame}.png"
        (tmp_path / "input" / img_rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "gt_depth" / dep_rel).parent.mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        raw = rng.integers(0, 80 * 256, (H, W), dtype=np.uint16)
        raw[rng.random((H, W)) < 0.7] = 0  # sparse lidar
        cv2.imwrite(str(tmp_path / "input" / img_rel), rgb[..., ::-1])
        cv2.imwrite(str(tmp_path / "gt_depth" / dep_rel), raw)
        planted[frame] = (rgb, raw)
        lines.append(f"{img_rel} {dep_rel} 721.5377")
    lines.append(f"2011_09_26/{DRIVE}/image_02/data/0000000001.png None 721.5377")
    (tmp_path / "eigen_test_files_with_gt.txt").write_text("\n".join(lines) + "\n")  # BTS name
    return tmp_path, planted


def test_kb_crop_depth_scale_and_garg_mask(root):
    path, planted = root
    ds = open_dataset("kitti", path, "test")
    assert len(ds) == 2  # the None line is skipped
    s = ds[0]  # sorted: frame 0000000005 first
    assert s.key == f"2011_09_26/{DRIVE}/0000000005" and s.group == f"2011_09_26/{DRIVE}"
    rgb, raw = planted["0000000005"]
    top, left = H - 352, (W - 1216) // 2
    assert (top, left) == (23, 13)
    assert s.image.shape == (352, 1216, 3) and s.depth.shape == (352, 1216)
    assert torch.equal((s.image * 255).round().byte(), torch.from_numpy(rgb[23:375, 13:1229]))
    expect = raw[23:375, 13:1229].astype(np.float32) / 256.0
    assert torch.equal(s.depth, torch.from_numpy(expect))
    m = s.eval_mask
    rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
    assert (rows.min().item(), rows.max().item()) == (143, 348)
    assert (cols.min().item(), cols.max().item()) == (43, 1171)
    assert m.sum() == (349 - 143) * (1172 - 43)
    assert s.K[0, 2].item() == pytest.approx(609.5593 - 13) and s.K[1, 2].item() == pytest.approx(
        172.854 - 23
    )
    assert ds.max_depth == 80.0 and ds.tasks == {"depth"}
    assert ds.mask_is_crop  # Garg's crop is scored at test only; FiT3D trains on all GT


def test_bad_roots(root, tmp_path):
    path, _ = root
    with pytest.raises(UserError, match="kitti_eigen_train.txt.*cvlibs"):
        open_dataset("kitti", path, "train")
    (path / "gt_depth" / DRIVE / "proj_depth/groundtruth/image_02/0000000005.png").unlink()
    with pytest.raises(UserError, match="0000000005.png.*annotated depth.*1 missing"):
        open_dataset("kitti", path, "test")
