"""BTS's NYU depth export (dataset `nyu`) on fixtures written in BTS's layouts: the depth
toolbox's (lists and scene folders under one root, FiT3D's `eval_data/nyu`) and BTS's own
(`sync/` for train, `official_splits/test/` for test); checks FiT3D's NYUCrop on train, the Eigen
crop at test, raw depth (uint16 mm, holes 0), the list handling and bad roots."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fit3d.datasets import open_dataset
from fit3d.errors import UserError

TRAIN = ["/kitchen_0028b/rgb_00045.jpg", "/bedroom_0067a/rgb_00010.jpg"]
TEST = ["bathroom/rgb_00045.jpg", "bathroom/rgb_00046.jpg"]


def _frame(folder: Path, rgb_rel: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """Writes rgb_<n>.jpg and sync_depth_<n>.png (uint16 mm with holes); returns (rgb, depth
    mm). The colour file holds PNG bytes under BTS's .jpg name (decoders go by content), so the
    pixels compare exactly; column index in red, row index in green make crops visible."""
    rgb_path = folder / rgb_rel.lstrip("/")
    rgb_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[..., 0] = np.arange(640)[None] % 256
    rgb[..., 1] = np.arange(480)[:, None] % 256
    rgb_path.write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    depth = rng.integers(500, 9000, (480, 640)).astype(np.uint16)
    depth[rng.random((480, 640)) < 0.2] = 0  # Kinect holes
    name = rgb_path.name.replace("rgb_", "sync_depth_").replace(".jpg", ".png")
    cv2.imwrite(str(rgb_path.parent / name), depth)
    return rgb, depth


def _lines(paths: list[str]) -> str:
    return "".join(
        f"{p} {p.replace('rgb_', 'sync_depth_').replace('.jpg', '.png')} 518.8579\n" for p in paths
    )


@pytest.fixture
def toolbox_root(tmp_path):
    """FiT3D's eval_data/nyu: lists and frames under one root; one train line has no depth."""
    rng = np.random.default_rng(0)
    planted = {p: _frame(tmp_path, p, rng) for p in TRAIN + TEST}
    (tmp_path / "nyu_train.txt").write_text(
        _lines(TRAIN) + "/kitchen_0001/rgb_00001.jpg None 518.8579\n"
    )
    (tmp_path / "nyu_test.txt").write_text(_lines(TEST))
    return tmp_path, planted


def test_train_frames_get_fit3ds_nyu_crop(toolbox_root):
    root, planted = toolbox_root
    ds = open_dataset("nyu", root, "train")
    assert len(ds) == 2 and ds.tasks == {"depth"} and ds.max_depth == 10.0
    # sorted by image path, the None line skipped (FiT3D's NYUDataset)
    assert [ds.info(i).key for i in range(2)] == [
        "bedroom_0067a/rgb_00010",
        "kitchen_0028b/rgb_00045",
    ]
    s = ds[1]
    rgb, depth = planted[TRAIN[0]]
    assert s.image.shape == (472 - 45, 608 - 43, 3) and ds.info(1).height == 427
    assert torch.equal((s.image * 255).round().byte(), torch.from_numpy(rgb[45:472, 43:608].copy()))
    assert torch.equal(s.depth, torch.from_numpy(depth[45:472, 43:608] / np.float32(1000)))
    assert s.eval_mask is None and s.group == "kitchen_0028b"
    assert s.K[0, 2] == pytest.approx(325.5824 - 43) and s.K[1, 2] == pytest.approx(253.7362 - 45)
    full = open_dataset("nyu", root, "train", nyu_crop=False)[1]
    assert full.image.shape == (480, 640, 3)


def test_test_frames_are_whole_with_the_eigen_crop_scored(toolbox_root):
    root, planted = toolbox_root
    ds = open_dataset("nyu", root, "test")
    s = ds[0]
    rgb, depth = planted[TEST[0]]
    assert s.key == "bathroom/rgb_00045" and s.image.shape == (480, 640, 3)
    assert torch.equal(s.depth, torch.from_numpy(depth / np.float32(1000)))  # raw: holes are 0
    assert (s.depth == 0).any()
    m = s.eval_mask
    assert m.sum() == (471 - 45) * (601 - 41) and m[45, 41] and not m[44, 41] and not m[45, 601]
    assert ds.mask_is_crop  # the evaluator scores the crop at test only
    assert ds.paper["dinov2"]["eval/depth/rmse"] == (0.4423, 0.4198)


def test_btss_own_folders_and_list_names(tmp_path):
    """BTS's README layout: train frames under sync/, test under official_splits/test/, lists
    under BTS's names."""
    rng = np.random.default_rng(1)
    train_planted = {p: _frame(tmp_path / "sync", p, rng) for p in TRAIN}
    _frame(tmp_path / "official_splits" / "test", TEST[0], rng)
    (tmp_path / "nyudepthv2_train_files_with_gt.txt").write_text(_lines(TRAIN))
    (tmp_path / "nyudepthv2_test_files_with_gt.txt").write_text(_lines(TEST[:1]))
    train = open_dataset("nyu", tmp_path, "train")
    rgb, _ = train_planted[TRAIN[1]]
    assert torch.equal(
        (train[0].image * 255).round().byte(), torch.from_numpy(rgb[45:472, 43:608].copy())
    )
    assert len(open_dataset("nyu", tmp_path, "test")) == 1


def test_bad_roots(toolbox_root):
    root, _ = toolbox_root
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="nyu_train.txt.*cleinc/bts"):
        open_dataset("nyu", root / "empty", "train")
    (root / "bathroom" / "sync_depth_00046.png").unlink()
    with pytest.raises(UserError, match="sync_depth_00046.png.*1 lack"):
        open_dataset("nyu", root, "test")
    with pytest.raises(UserError, match="no split 'val'"):
        open_dataset("nyu", root, "val")
