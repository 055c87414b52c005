"""ADE20k (SceneParsing, `ADEChallengeData2016`): 150-class segmentation as FiT3D evaluates it.

Layout (the MIT Scene Parsing release, sceneparsing.csail.mit.edu, `ADEChallengeData2016.zip`)::

    <root>/images/{training,validation}/ADE_*_XXXXXXXX.jpg
    <root>/annotations/{training,validation}/ADE_*_XXXXXXXX.png   uint8, 0 = other, 1..150

`root` may also be the folder that contains `ADEChallengeData2016/`. Splits: `train` = training
(20,210 images), `val` = validation (2,000). Labels: mmseg's reduce_zero_label (0 -> 255,
k -> k - 1), as FiT3D's config; `ADE20K_CLASSES` in the order of mmseg's ADE20KDataset.
"""

from __future__ import annotations

from pathlib import Path

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    check_split,
    missing,
    read_png,
    read_rgb,
    reduce_zero_label,
    require_dir,
    to_image,
)

WHERE = "sceneparsing.csail.mit.edu (ADEChallengeData2016.zip)"
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
PAPER: PaperNumbers = {"dinov2": {"eval/seg/miou": (0.4428, 0.4593)}}
_FOLDERS = {"train": "training", "val": "validation"}


class ADE20k(EvalSet):
    """ADE20k `train` or `val`; see the module docstring."""

    name = "ade20k"
    tasks = frozenset({"seg"})
    classes = ADE20K_CLASSES
    paper = PAPER

    def __init__(self, root: str | Path, split: str):
        check_split(self.name, split, tuple(_FOLDERS))
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root, self.split = root, split
        sub = _FOLDERS[split]
        img_dir = require_dir(root / "images" / sub, f"ADE_*.jpg images ({sub})", WHERE)
        ann_dir = require_dir(root / "annotations" / sub, f"ADE_*.png labels ({sub})", WHERE)
        self.images = sorted(img_dir.glob("*.jpg"))
        if not self.images:
            raise missing(img_dir, "ADE_*.jpg images", WHERE)
        self.labels = [ann_dir / f"{p.stem}.png" for p in self.images]
        lacking = [p for p in self.labels if not p.is_file()]
        if lacking:
            raise missing(
                lacking[0], f"the label of {self.images[0].name} ({len(lacking)} missing)", WHERE
            )

    def __len__(self) -> int:
        return len(self.images)

    def info(self, i: int) -> ViewInfo:
        import cv2

        h, w = cv2.imread(str(self.labels[i]), cv2.IMREAD_UNCHANGED).shape[:2]
        return ViewInfo(self.images[i].stem, "", h, w)

    def _load(self, i: int) -> Sample:
        return Sample(
            key=self.images[i].stem,
            image=to_image(read_rgb(self.images[i])),
            seg=reduce_zero_label(read_png(self.labels[i])),
        )
