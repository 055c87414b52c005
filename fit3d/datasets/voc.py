"""Pascal VOC 2012 segmentation (21 classes, no SBD), as FiT3D evaluates it.

Layout (the official devkit, host.robots.ox.ac.uk/pascal/VOC/voc2012,
`VOCtrainval_11-May-2012.tar`)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png   palette PNG: index = class (0 = background), 255 = border
    <root>/ImageSets/Segmentation/{train,val}.txt

`root` is `VOCdevkit/VOC2012` (or a folder above it). Splits: `train` (1,464), `val` (1,449).
Labels are the palette indices as stored (21 classes, background included; 255 = the void
border, ignored), as mmseg's PascalVOCDataset reads them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    check_split,
    missing,
    read_lines,
    read_png,
    read_rgb,
    require_file,
    to_image,
)
from fit3d.errors import UserError

WHERE = "host.robots.ox.ac.uk/pascal/VOC/voc2012 (VOCtrainval_11-May-2012.tar)"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
PAPER: PaperNumbers = {"dinov2": {"eval/seg/miou": (0.8114, 0.8235)}}


class VOC2012(EvalSet):
    """Pascal VOC 2012 segmentation `train` or `val`; see the module docstring."""

    name = "voc2012"
    tasks = frozenset({"seg"})
    classes = VOC_CLASSES
    paper = PAPER

    def __init__(self, root: str | Path, split: str):
        check_split(self.name, split, ("train", "val"))
        root = Path(root)
        for sub in ("VOCdevkit/VOC2012", "VOC2012"):
            if (root / sub).is_dir():
                root = root / sub
                break
        self.root, self.split = root, split
        lst = require_file(
            root / "ImageSets" / "Segmentation" / f"{split}.txt", "one image id per line", WHERE
        )
        self.ids = read_lines(lst)
        if not self.ids:
            raise UserError(f"{lst}: lists no images")
        for sub, ext, what in (
            ("JPEGImages", "jpg", "images"),
            ("SegmentationClass", "png", "palette labels"),
        ):
            lacking = [i for i in self.ids if not (root / sub / f"{i}.{ext}").is_file()]
            if lacking:
                raise missing(
                    root / sub / f"{lacking[0]}.{ext}",
                    f"{what} of every id in {lst.name} ({len(lacking)} missing)",
                    WHERE,
                )

    def __len__(self) -> int:
        return len(self.ids)

    def info(self, i: int) -> ViewInfo:
        with Image.open(self.root / "SegmentationClass" / f"{self.ids[i]}.png") as im:
            w, h = im.size
        return ViewInfo(self.ids[i], "", h, w)

    def _load(self, i: int) -> Sample:
        import torch

        label = read_png(self.root / "SegmentationClass" / f"{self.ids[i]}.png")
        return Sample(
            key=self.ids[i],
            image=to_image(read_rgb(self.root / "JPEGImages" / f"{self.ids[i]}.jpg")),
            seg=torch.from_numpy(label.astype("int64")),
        )
