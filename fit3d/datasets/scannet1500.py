"""ScanNet-1500: SuperGlue's 1500 ScanNet test pairs with ground-truth poses and depth (Probe3D's
scene-level correspondence set).

Two layouts are read (auto-detected):

1. LoFTR's `scannet_test_1500` (what Probe3D downloads; github.com/zju3dv/LoFTR,
   `assets/scannet_test_1500/{test,intrinsics}.npz`)::

       <root>/test.npz              name: [1500, 4] (scene number, scan number, frame 0, frame 1)
       <root>/intrinsics.npz        scene id -> K [3, 3] of the stored colour images
       <root>/<scene>/color/<frame>.jpg, depth/<frame>.png (uint16 mm), pose/<frame>.txt (c2w)

2. SuperGlue's list (github.com/magicleap/SuperGluePretrainedNetwork,
   `assets/scannet_test_pairs_with_gt.txt`), one pair per line:
   `<image 0> <image 1> <rot 0> <rot 1> <K0: 9 values> <K1: 9 values> <T_0to1: 16 values>`, image
   paths relative to `<root>`, depth at the same path with `color/<n>.jpg` -> `depth/<n>.png`.

Each pair p contributes two samples, 2p (view 0) and 2p + 1 (view 1), and `pairs()` lists
(2p, 2p + 1) in file order. Colour is resized to the depth size (640x480) and K scaled with it.
Poses: layout 1 gives world-to-camera from the pose files; layout 2 puts view 0 at the origin
(identity) and view 1 at T_0to1. Either way `viewmat_1 @ inv(viewmat_0)` is the relative pose.
ScanNet lists no EXIF rotations; a non-zero one is refused. Probe3D normalises these images with
mean = std = 0.5 (not ImageNet's): `image_norm = "half"`.
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
    check_split,
    missing,
    read_lines,
    read_png,
    read_rgb,
    to_image,
)
from fit3d.errors import UserError

WHERE = (
    "github.com/zju3dv/LoFTR (scannet_test_1500 + assets/scannet_test_1500/*.npz) or "
    "github.com/magicleap/SuperGluePretrainedNetwork (assets/scannet_test_pairs_with_gt.txt)"
)
SUPERGLUE_LIST = "scannet_test_pairs_with_gt.txt"
_NAN = float("nan")
PAPER: PaperNumbers = {
    "dinov2_b": {
        "eval/corr/recall_10px_rot0-15": (0.370, _NAN),
        "eval/corr/recall_10px_rot15-30": (0.275, _NAN),
        "eval/corr/recall_10px_rot30-60": (0.197, _NAN),
        "eval/corr/recall_10px_rot60-180": (0.112, _NAN),
    }
}
"""Probe3D's DINOv2 ViT-B/14 (last block) recall per relative-rotation bin (no FiT3D number)."""


class ScanNet1500(EvalSet):
    """The 1500 ScanNet test pairs (split `test`); see the module docstring."""

    name = "scannet1500"
    tasks = frozenset({"depth", "corr"})
    paper = PAPER
    image_norm = "half"

    def __init__(self, root: str | Path, split: str = "test"):
        check_split(self.name, split, ("test",))
        self.root, self.split = Path(root), split
        # per view: (key, group, image path, depth path, K [3,3] of the stored image, viewmat)
        self.views: list[tuple[str, str, Path, Path, np.ndarray, np.ndarray]] = []
        if (self.root / "test.npz").is_file():
            self._read_loftr()
        elif (self.root / SUPERGLUE_LIST).is_file():
            self._read_superglue()
        else:
            raise missing(self.root / "test.npz", f"LoFTR's test.npz or {SUPERGLUE_LIST}", WHERE)
        lacking = [v for v in self.views if not (v[2].is_file() and v[3].is_file())]
        if lacking:
            bad = lacking[0][2] if not lacking[0][2].is_file() else lacking[0][3]
            raise missing(
                bad, f"colour and depth of every listed frame ({len(lacking)} missing)", WHERE
            )

    def _read_loftr(self) -> None:
        names = np.load(self.root / "test.npz")["name"]
        kpath = self.root / "intrinsics.npz"
        if not kpath.is_file():
            raise missing(kpath, "scene id -> K [3, 3]", WHERE)
        Ks = dict(np.load(kpath))
        for p, (room, seq, f0, f1) in enumerate(np.asarray(names).astype(int)):
            sid = f"scene{room:04d}_{seq:02d}"
            if sid not in Ks:
                raise UserError(f"{kpath}: no intrinsics for {sid} (pair {p})")
            for k, f in enumerate((f0, f1)):
                pose_path = self.root / sid / "pose" / f"{f}.txt"
                if not pose_path.is_file():
                    raise missing(pose_path, "the camera-to-world pose", WHERE)
                vm = np.linalg.inv(np.loadtxt(pose_path).reshape(4, 4))
                self.views.append(
                    (
                        f"{p:04d}/{k}",
                        sid,
                        self.root / sid / "color" / f"{f}.jpg",
                        self.root / sid / "depth" / f"{f}.png",
                        np.asarray(Ks[sid], dtype=np.float64).reshape(3, 3),
                        vm,
                    )
                )

    def _read_superglue(self) -> None:
        lst = self.root / SUPERGLUE_LIST
        for p, ln in enumerate(read_lines(lst)):
            parts = ln.split()
            if len(parts) != 38:
                raise UserError(f"{lst}: line {p + 1} has {len(parts)} fields, expected 38")
            if parts[2] != "0" or parts[3] != "0":
                raise UserError(f"{lst}: line {p + 1} asks for an EXIF rotation; ScanNet has none")
            vals = np.array(parts[4:], dtype=np.float64)
            K0, K1, T = vals[:9].reshape(3, 3), vals[9:18].reshape(3, 3), vals[18:].reshape(4, 4)
            for k, (img, K, vm) in enumerate(((parts[0], K0, np.eye(4)), (parts[1], K1, T))):
                color = self.root / img
                depth = color.parent.parent / "depth" / f"{color.stem}.png"
                group = Path(img).parts[-3] if len(Path(img).parts) >= 3 else ""
                self.views.append((f"{p:04d}/{k}", group, color, depth, K, vm))

    def __len__(self) -> int:
        return len(self.views)

    def pairs(self) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(0, len(self.views), 2)]

    def _K(self, i: int, h: int, w: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.views[i][2]) as im:
            cw, ch = im.size
        return torch.from_numpy(self.views[i][4] * np.array([[w / cw], [h / ch], [1.0]])).float()

    def info(self, i: int) -> ViewInfo:
        key, group, _, depth, _, vm = self.views[i]
        h, w = cv2.imread(str(depth), cv2.IMREAD_UNCHANGED).shape[:2]
        return ViewInfo(key, group, h, w, self._K(i, h, w), torch.from_numpy(vm).float())

    def _load(self, i: int) -> Sample:
        key, group, color, depth_path, _, vm = self.views[i]
        depth = read_png(depth_path).astype(np.float32) / 1000.0
        h, w = depth.shape
        rgb = read_rgb(color)
        if rgb.shape[:2] != (h, w):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        return Sample(
            key=key,
            image=to_image(rgb),
            depth=torch.from_numpy(depth),
            K=self._K(i, h, w),
            viewmat=torch.from_numpy(vm).float(),
            group=group,
        )
