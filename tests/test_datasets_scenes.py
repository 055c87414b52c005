"""The scene EvalSet on generated demo rooms: every view of the split's rooms, keys and groups,
labels equal to what the scene reader returns, max_views subsampling, the anonymisation mask as
eval_mask, laziness, and bad roots (ScanNet++ labels rendered from meshes are tested in
test_datasets_scannetpp_labels.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fit3d.datasets import open_dataset
from fit3d.datasets.scenes import ScenesSet
from fit3d.errors import UserError
from fit3d.scenes import open_scene
from fit3d.scenes.demo import generate_demo


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_demo(
        tmp_path_factory.mktemp("demo"),
        seed=3,
        n_train=2,
        n_val=1,
        n_views=9,
        width=48,
        height=32,
        workers=1,
    )


def test_views_keys_groups_and_labels_match_the_scene_reader(root):
    ds = open_dataset("demo", root, "train")
    train_ids = (root / "splits" / "nvs_sem_train.txt").read_text().split()
    assert len(ds) == 2 * 9 and ds.tasks == {"seg", "depth", "normals", "corr"}
    assert ds.classes == tuple(json.loads((root / "classes.json").read_text())["classes"])
    assert ds.max_depth == 10.0 and ds.pairs() == []
    s = ds[10]  # second room, second view
    scene = open_scene(root, train_ids[1])
    assert s.key == f"{train_ids[1]}/{scene.image_name(1)}" and s.group == train_ids[1]
    assert torch.equal(s.image, scene.load_image(1))
    assert torch.equal(s.seg, scene.load_semantics(1))
    assert torch.equal(s.depth, scene.load_depth(1))
    assert torch.equal(s.normals, scene.load_normals(1))
    assert torch.equal(s.eval_mask, scene.load_mask(1))  # the anonymisation mask (all valid here)
    assert torch.equal(s.K, scene.K(1)) and torch.equal(s.viewmat, scene.viewmat(1))
    info = ds.info(10)
    assert (info.key, info.group, info.height, info.width) == (s.key, s.group, 32, 48)
    assert ds[-1].key == ds[17].key and len(ds[0:3]) == 3
    with pytest.raises(IndexError):
        ds[18]


def test_max_views_and_resolution(root):
    ds = open_dataset("demo", root, "train", max_views=3)
    names = [ds.info(i).key.split("/")[1] for i in range(len(ds))]
    assert len(ds) == 6 and names[:3] == ["DSC00000.JPG", "DSC00004.JPG", "DSC00008.JPG"]
    half = ScenesSet(root, "val", kind="demo", resolution=0.5)
    assert len(half) == 9 and half[0].image.shape == (16, 24, 3) and half[0].seg.shape == (16, 24)


def test_missing_labels_and_bad_roots(root, tmp_path):
    with pytest.raises(UserError, match="data.*kaldir"):
        open_dataset("scannetpp", tmp_path, "train")
    with pytest.raises(UserError, match="no split 'test'"):
        open_dataset("demo", root, "test")
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        open_dataset("nope", root, "train")
    with pytest.raises(UserError, match="unexpected keyword argument 'max_view'"):
        open_dataset("demo", root, "train", max_view=3)
