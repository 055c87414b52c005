"""Pascal VOC 2012 reader on a fixture in the official devkit layout: palette PNG labels (read as
indices, never as colours), the 255 border kept as ignore, ImageSets split lists."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from fit3d.datasets import open_dataset
from fit3d.datasets.voc import VOC_CLASSES
from fit3d.errors import UserError


def _palette() -> list[int]:
    """The VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


@pytest.fixture
def root(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    rng = np.random.default_rng(2)
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for split, names in ids.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            cv2.imwrite(
                str(voc / "JPEGImages" / f"{name}.jpg"),
                rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
            )
            label = np.zeros((20, 30), np.uint8)
            label[5:15, 5:25] = 15  # person
            label[5:15, 5] = 255  # border
            label[:3] = 20  # tvmonitor
            im = Image.fromarray(label, mode="P")
            im.putpalette(_palette())
            im.save(voc / "SegmentationClass" / f"{name}.png")
    return tmp_path


def test_palette_indices_and_border(root):
    ds = open_dataset("voc2012", root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.classes[0] == "background"
    s = ds[1]
    assert s.key == "2007_000039"
    assert (s.seg[6:15, 6:25] == VOC_CLASSES.index("person")).all()
    assert (s.seg[5:15, 5] == 255).all()
    assert (s.seg[:3] == VOC_CLASSES.index("tvmonitor")).all()
    assert (s.seg[15:] == 0).all()  # background is a class in VOC
    assert s.image.shape == (20, 30, 3)
    assert len(open_dataset("voc2012", root / "VOCdevkit" / "VOC2012", "val")) == 1


def test_bad_roots(root, tmp_path):
    with pytest.raises(UserError, match="ImageSets/Segmentation/val.txt.*voc2012"):
        open_dataset("voc2012", tmp_path / "nothing", "val")
    (root / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png").unlink()
    with pytest.raises(UserError, match="2007_000033.png"):
        open_dataset("voc2012", root, "val")
