"""ScanNet (v2) frames: 40-class (NYU-40) segmentation and depth, as FiT3D evaluates them.

Two layouts are read (auto-detected):

1. The official 2D benchmark subset, `scannet_frames_25k` (ScanNet download script,
   `--preprocessed_frames`; github.com/ScanNet/ScanNet, licence required)::

       <root>/scannetv2_train.txt, scannetv2_val.txt          official scene lists (Tasks/Benchmark)
       <root>/<scene>/color/<n>.jpg                           RGB (resized to the label size)
       <root>/<scene>/depth/<n>.png                           uint16 millimetres, 0 = invalid
       <root>/<scene>/label/<n>.png                           uint8 NYU-40 id, 0 = unannotated
       <root>/<scene>/pose/<n>.txt, intrinsics_color.txt      camera-to-world, colour K (4x4)

   `root` may also be the folder holding `scannet_frames_25k/`. Every frame carries all of seg,
   depth and a pose (`corr` too: views of one scene share its world frame).
2. FiT3D's own export (its configs' `eval_data/scannet`, not released; frames from ScanNet)::

       <root>/images/{training,validation}/*.jpg, annotations/{training,validation}/*.png
       <root>/scannet_train.txt, scannet_val.txt              "<image> <depth png> [focal]"

   Segmentation reads the folders, depth the lists (paths relative to `root`), so a split is one
   task: `task="seg"` (default) or `task="depth"`.

Labels: NYU-40 ids 1..40 -> 0..39, 0 -> 255 (reduce_zero_label), `SCANNET40_CLASSES` in FiT3D's
ScanNetDataset order. Depth: range (1e-3, 10) m; `eval_mask` is the Eigen crop of a 480x640 frame
(FiT3D's `eigen_crop=True`; None at other sizes, or with `eigen_crop=False`), scored at test
only, as FiT3D's ScanNet config does.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    box_mask,
    check_split,
    missing,
    read_lines,
    read_png,
    read_rgb,
    reduce_zero_label,
    require_dir,
    to_image,
)
from fit3d.datasets.nyuv2 import EIGEN_CROP
from fit3d.errors import UserError

WHERE = "github.com/ScanNet/ScanNet (download-scannet.py --preprocessed_frames; licence required)"
SCANNET40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "nightstand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
PAPER: PaperNumbers = {}
"""FiT3D reports ScanNet probes only in its supplementary figures; no table numbers to pair."""


class ScanNet(EvalSet):
    """ScanNet `train` or `val` frames in either layout; see the module docstring."""

    name = "scannet"
    classes = SCANNET40_CLASSES
    max_depth = 10.0
    paper = PAPER
    mask_is_crop = True

    def __init__(self, root: str | Path, split: str, task: str = "seg", eigen_crop: bool = True):
        check_split(self.name, split, ("train", "val"))
        root = Path(root)
        if (root / "scannet_frames_25k").is_dir():
            root = root / "scannet_frames_25k"
        self.root, self.split, self.eigen_crop = root, split, eigen_crop
        self.items: list[dict[str, Path | str | None]] = []
        if (root / f"scannetv2_{split}.txt").is_file():
            self.layout = "frames_25k"
            self._index_frames()
            self.tasks = frozenset({"seg", "depth", "corr"})
        elif (root / "images").is_dir() or (root / f"scannet_{split}.txt").is_file():
            if task not in ("seg", "depth"):
                raise UserError(f"scannet: task must be seg or depth, got {task!r}")
            self.layout = "fit3d"
            self._index_fit3d(task)
            self.tasks = frozenset({task})
        else:
            raise missing(
                root / f"scannetv2_{split}.txt",
                "the scannet_frames_25k layout (or FiT3D's images/ + scannet_*.txt export)",
                WHERE,
            )
        if not self.items:
            raise UserError(f"{root}: no {split} frames found")

    def _index_frames(self) -> None:
        scenes = read_lines(self.root / f"scannetv2_{self.split}.txt")
        present = [s for s in scenes if (self.root / s).is_dir()]
        if not present:
            raise missing(self.root / scenes[0], "color/, depth/, label/ frames", WHERE)
        for sid in present:
            K = np.loadtxt(self.root / sid / "intrinsics_color.txt")[:3, :3]
            for img in sorted((self.root / sid / "color").glob("*.jpg")):
                n = img.stem
                item = {
                    "key": f"{sid}/{n}",
                    "group": sid,
                    "image": img,
                    "seg": self.root / sid / "label" / f"{n}.png",
                    "depth": self.root / sid / "depth" / f"{n}.png",
                    "pose": self.root / sid / "pose" / f"{n}.txt",
                    "K": K,
                }
                for kind in ("seg", "depth"):
                    if not item[kind].is_file():
                        raise missing(item[kind], f"the {kind} of {img}", WHERE)
                self.items.append(item)

    def _index_fit3d(self, task: str) -> None:
        where = "FiT3D's ScanNet export (github.com/ywyue/FiT3D evaluation configs)"
        if task == "seg":
            sub = "training" if self.split == "train" else "validation"
            img_dir = require_dir(self.root / "images" / sub, "*.jpg frames", where)
            ann_dir = require_dir(self.root / "annotations" / sub, "*.png NYU-40 labels", where)
            for img in sorted(img_dir.glob("*.jpg")):
                lab = ann_dir / f"{img.stem}.png"
                if not lab.is_file():
                    raise missing(lab, f"the label of {img.name}", where)
                self.items.append({"key": img.stem, "group": "", "image": img, "seg": lab})
        else:
            lst = self.root / f"scannet_{self.split}.txt"
            if not lst.is_file():
                raise missing(lst, "'<image> <depth png>' per line", where)
            for ln in read_lines(lst):
                img, dep = (p.lstrip("/") for p in ln.split()[:2])
                if dep == "None":
                    continue
                if not (self.root / dep).is_file():
                    raise missing(self.root / dep, f"the depth listed in {lst.name}", where)
                self.items.append(
                    {
                        "key": img.rsplit(".", 1)[0],
                        "group": "",
                        "image": self.root / img,
                        "depth": self.root / dep,
                    }
                )
            self.items.sort(key=lambda it: str(it["image"]))

    def __len__(self) -> int:
        return len(self.items)

    def _size(self, i: int) -> tuple[int, int]:
        it = self.items[i]
        ref = it.get("seg") or it.get("depth")
        h, w = cv2.imread(str(ref), cv2.IMREAD_UNCHANGED).shape[:2]
        return h, w

    def _cameras(self, i: int, h: int, w: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Colour K scaled from the stored colour size to (h, w), and world-to-camera from the
        camera-to-world pose file (None when ScanNet marks the pose invalid with -inf)."""
        it = self.items[i]
        if self.layout != "frames_25k":
            return None, None
        from PIL import Image

        with Image.open(it["image"]) as im:
            cw, ch = im.size  # header only
        K = it["K"] * np.array([[w / cw], [h / ch], [1.0]])
        c2w = np.loadtxt(it["pose"]) if it["pose"].is_file() else np.full((4, 4), np.nan)
        vm = torch.from_numpy(np.linalg.inv(c2w)).float() if np.isfinite(c2w).all() else None
        return torch.from_numpy(K).float(), vm

    def info(self, i: int) -> ViewInfo:
        h, w = self._size(i)
        K, vm = self._cameras(i, h, w)
        return ViewInfo(str(self.items[i]["key"]), str(self.items[i]["group"]), h, w, K, vm)

    def _load(self, i: int) -> Sample:
        it = self.items[i]
        rgb = read_rgb(it["image"])
        seg = read_png(it["seg"]) if it.get("seg") else None
        depth = read_png(it["depth"]).astype(np.float32) / 1000.0 if it.get("depth") else None
        h, w = (seg if seg is not None else depth).shape
        if rgb.shape[:2] != (h, w):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        K, vm = self._cameras(i, h, w)
        crop = self.eigen_crop and (h, w) == (480, 640)
        return Sample(
            key=str(it["key"]),
            image=to_image(rgb),
            seg=reduce_zero_label(seg) if seg is not None else None,
            depth=torch.from_numpy(depth) if depth is not None else None,
            eval_mask=box_mask(480, 640, *EIGEN_CROP) if crop else None,
            K=K,
            viewmat=vm,
            group=str(it["group"]),
        )
