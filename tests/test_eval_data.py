"""The evaluator's stored ground truth: which pixels count where (test-time crops at test only,
per-task masks, depth-masked normals in float32, the ground-truth depth range) and the splits and
options it opens datasets with."""

from __future__ import annotations

import torch

from fit3d.config import load_config
from fit3d.datasets.base import EvalSet, Sample, ViewInfo
from fit3d.eval import data as D


class _Set(EvalSet):
    """Two 4x4 views: seg, depth (one pixel without depth, one beyond 12 m), normals (one pixel
    without normal), and an eval mask keeping the left half."""

    name, split = "fake", "x"
    tasks = frozenset({"seg", "depth", "normals"})
    classes = ("a", "b")
    max_depth = 10.0

    def __len__(self) -> int:
        return 2

    def info(self, i: int) -> ViewInfo:
        return ViewInfo(f"v{i}", "g", 4, 4)

    def _load(self, i: int) -> Sample:
        depth = torch.full((4, 4), 2.0)
        depth[0, 0] = 0.0  # no depth
        depth[0, 1] = 12.0  # within gt_max_depth only when it is set past 12 m
        normals = torch.tensor([0.0, 0.0, -1.0]).expand(4, 4, 3).clone()
        normals[1, 1] = 0.0  # depth but no normal
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[:, :2] = True
        return Sample(f"v{i}", torch.zeros(4, 4, 3), seg=torch.ones(4, 4, dtype=torch.long),
                      depth=depth, normals=normals, eval_mask=mask)  # fmt: skip


def _store(tmp_path, ds, role: str, *overrides: str):
    cfg = load_config([], list(overrides))
    split = D.Split(role, ds, [0, 1])
    D.store_labels(cfg, split, tmp_path / role / "_".join(overrides), [])
    return {t: D.label_batch(split, [0], t)[0] for t in ("seg", "depth", "normals")}


def test_a_test_time_crop_applies_to_the_test_split_only(tmp_path):
    ds = _Set()
    ds.mask_is_crop = True  # Eigen's / Garg's crop: the originals train on every pixel
    train, test = _store(tmp_path, ds, "train"), _store(tmp_path, ds, "test")
    assert (train["seg"] == 1).all() and (test["seg"][:, 2:] == 255).all()
    assert (train["depth"][:, 2:] == 2.0).all() and (test["depth"][:, 2:] == 0).all()
    forced = _store(tmp_path, ds, "train", "eval.crop_train_labels=true")
    assert (forced["seg"][:, 2:] == 255).all()
    ds.mask_is_crop = False  # an anonymisation mask: everywhere
    assert (_store(tmp_path, ds, "train")["seg"][:, 2:] == 255).all()


def test_the_mask_applies_to_the_sets_mask_tasks_only(tmp_path):
    ds = _Set()
    ds.mask_tasks = frozenset({"depth"})  # NYUv2: segmentation is scored on the whole frame
    test = _store(tmp_path, ds, "test")
    assert (test["seg"] == 1).all() and (test["depth"][:, 2:] == 0).all()


def test_normals_count_where_depth_is_valid_and_are_float32(tmp_path):
    ds = _Set()
    ds.mask_tasks = frozenset()
    got = _store(tmp_path, ds, "test")["normals"]
    assert got.dtype == torch.float32 and got.shape == (4, 4, 4)
    valid = got[..., 3] > 0.5
    assert not valid[0, 0] and not valid[0, 1]  # no depth / depth beyond the 10 m range
    assert valid[1, 1] and (got[1, 1, :3] == 0).all()  # depth, no normal: counts (90 degrees)
    by_normal = _store(tmp_path, ds, "test", "eval.normals_valid=normal")["normals"]
    assert by_normal[0, 0, 3] == 1 and by_normal[1, 1, 3] == 0


def test_ground_truth_depth_range_can_extend_past_the_bins(tmp_path):
    ds = _Set()
    ds.mask_tasks = frozenset()
    assert _store(tmp_path, ds, "test")["depth"][0, 1] == 0  # 12 m > max_depth 10
    ds.max_depth, ds.gt_max_depth = 1.0, 20.0  # NAVI: bins to 1 m, ground truth to 10 m
    cfg = load_config([], [])
    assert D.depth_range(cfg, ds) == (1e-3, 1.0) and D.gt_depth_range(cfg, ds) == (1e-3, 20.0)
    assert _store(tmp_path, ds, "test")["depth"][0, 1] == 12.0


def test_probe3d_sets_train_on_trainval_and_nyu_options_reach_the_readers():
    cfg = load_config([], ["eval.nyu_depth=filled", "eval.nyu_center_crop=false"])
    assert D.DEFAULT_TRAIN_SPLIT == {"nyu_normals": "trainval", "navi": "trainval"}
    assert D.dataset_options(cfg, "nyuv2") == {"depth": "filled"}
    assert D.dataset_options(cfg, "nyu_normals") == {"center_crop": False}
    assert D.dataset_options(cfg, "kitti") == {}
    half = _Set()
    half.image_norm = "half"  # ScanNet-1500 (Probe3D normalises with 0.5 / 0.5)
    assert D.image_norm(cfg, half) == "half" and D.image_norm(cfg, _Set()) == "imagenet"
    assert D.image_norm(load_config([], ["eval.image_norm=imagenet"]), half) == "imagenet"
