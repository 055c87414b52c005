"""ADE20k reader on a fixture in the official `ADEChallengeData2016` layout (JPEG images, uint8
PNG labels with 0 = other): reduce-zero-label, class order, splits, bad roots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fit3d.datasets import open_dataset
from fit3d.datasets.ade20k import ADE20K_CLASSES
from fit3d.errors import UserError


@pytest.fixture
def root(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(1)
    for sub, names in (
        ("training", ["ADE_train_00000002", "ADE_train_00000001"]),
        ("validation", ["ADE_val_00000001"]),
    ):
        (base / "images" / sub).mkdir(parents=True)
        (base / "annotations" / sub).mkdir(parents=True)
        for name in names:
            cv2.imwrite(
                str(base / "images" / sub / f"{name}.jpg"),
                rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
            )
            label = np.zeros((30, 40), np.uint8)
            label[:10] = 1  # wall
            label[10:20] = 150  # flag
            label[20:25, :20] = 8  # bed
            cv2.imwrite(str(base / "annotations" / sub / f"{name}.png"), label)
    return tmp_path


def test_labels_reduce_zero_and_keep_class_order(root):
    ds = open_dataset("ade20k", root, "train")  # the parent of ADEChallengeData2016 works too
    assert len(ds) == 2 and ds.info(0).key == "ADE_train_00000001"
    s = ds[0]
    assert s.image.shape == (30, 40, 3) and s.image.dtype.is_floating_point
    assert (s.seg[:10] == ADE20K_CLASSES.index("wall")).all()
    assert (s.seg[10:20] == ADE20K_CLASSES.index("flag")).all() and ADE20K_CLASSES.index(
        "flag"
    ) == 149
    assert (s.seg[20:25, :20] == ADE20K_CLASSES.index("bed")).all()
    assert (s.seg[25:] == 255).all() and (s.seg[20:25, 20:] == 255).all()  # 0 = other -> ignore
    assert len(ADE20K_CLASSES) == 150 and ds.tasks == {"seg"}
    assert len(open_dataset("ade20k", root / "ADEChallengeData2016", "val")) == 1


def test_bad_roots(root, tmp_path):
    with pytest.raises(UserError, match="images/validation.*sceneparsing"):
        open_dataset("ade20k", tmp_path / "empty", "val")
    (root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(UserError, match="ADE_val_00000001.png"):
        open_dataset("ade20k", root, "val")
    with pytest.raises(UserError, match="no split 'test'"):
        open_dataset("ade20k", root, "test")
