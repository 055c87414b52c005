"""NAVI (object-centric multiview with aligned 3D shapes): Probe3D's object-level set for depth,
normals and multiview correspondence.

Layout (`navi_v1.tar.gz` from github.com/google/navi, optionally after Probe3D's
`data_processing/resize_navi.py`, which writes `downsampled_<id>.*` beside each file)::

    <root>/<object>/<collection>/            collection: multiview_<nn>_<camera> or wild_set
        annotations.json                     [{"filename", "image_size": [h, w], "camera":
                                               {"q": [w, x, y, z], "t": [mm], "focal_length"}}]
        images/<id>.jpg                      (EXIF-rotated as the annotations expect)
        depth/<id>.png                       uint16 inverse depth: metres = 655.35 / value, 0 = none

Splits, as Probe3D's NAVI loader defines them over objects that have a `wild_set` and at least one
multiview collection: `train` / `val` = the first 90% / the rest of each object's multiview
collections (sorted by name), `trainval` = all of them (what Probe3D's probes train on), `test` =
the `wild_set` collections. Depth range: bins up to 1 m (Probe3D's NAVI `max_depth`); ground
truth counts up to 10 m (Probe3D's depth loss zeroes deeper pixels, in place, before its
metrics). A group is one
`<object>/<collection>`: its views share the object's frame, so the camera `q, t` (object to
camera, OpenCV axes, millimetres) is the `viewmat` (translation in metres). K: focal_length at the
annotated size, principal point at the image centre (as Probe3D assumes), scaled to the file read.

Per sample (Probe3D's `bbox_crop` and 512x512 input): the smallest square around the valid depth,
shifted to lie inside the image, resized to `size` (image area-averaged, depth nearest); K follows.
`size=0` / `crop=False` keep the full image. Normals (NAVI ships none) are computed from the depth
as Probe3D does it, the cross product of neighbouring back-projected points, here turned to face
the camera (Probe3D's point away from it) and zero where a neighbour has no depth.

Pairs (`pairs()`): Probe3D pairs every 4th view with a random view of the same collection within
120 degrees of relative rotation (seeded); we do the same with our own seeded generator over the
sorted views, so the pairs follow the same rule but are not the identical list.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from fit3d.datasets.base import (
    EvalSet,
    Sample,
    ViewInfo,
    check_split,
    missing,
    require_dir,
    to_image,
)
from fit3d.errors import UserError

WHERE = "github.com/google/navi (navi_v1.tar.gz)"
DEPTH_NUMERATOR = 655.35
"""metres = DEPTH_NUMERATOR / stored value (the release stores 65535 * 10 / depth_mm)."""
MAX_PAIR_ANGLE = 120.0


def quat_to_R(q) -> np.ndarray:
    """Rotation [3, 3] of a (w, x, y, z) quaternion (normalised here)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def normals_from_depth(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame unit normals [H, W, 3] from depth [H, W] (0 = none): cross product of the
    central differences of back-projected points, facing the camera; zero where undefined."""
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    xyz = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    xyz *= depth[..., None]
    n = np.zeros_like(xyz)
    dx = xyz[1:-1, 2:] - xyz[1:-1, :-2]
    dy = xyz[2:, 1:-1] - xyz[:-2, 1:-1]
    n[1:-1, 1:-1] = np.cross(dx, dy)
    valid = np.zeros((h, w), bool)
    d = depth > 0
    valid[1:-1, 1:-1] = d[1:-1, 1:-1] & d[1:-1, 2:] & d[1:-1, :-2] & d[2:, 1:-1] & d[:-2, 1:-1]
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid &= norm[..., 0] > 0
    n = np.divide(n, norm, out=np.zeros_like(n), where=valid[..., None])
    n *= np.where((n * xyz).sum(-1, keepdims=True) > 0, -1.0, 1.0)
    return (n * valid[..., None]).astype(np.float32)


def square_box(mask: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side): the smallest square holding `mask`'s bounding box, centred on it and
    shifted to lie inside the image (side capped at the shorter image side)."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = min(max(bottom - top, right - left), h, w)
    t = int(np.clip((top + bottom - side) // 2, 0, h - side))
    l = int(np.clip((left + right - side) // 2, 0, w - side))
    return t, l, int(side)


class NAVI(EvalSet):
    """NAVI `train`, `val` or `test`; see the module docstring."""

    name = "navi"
    tasks = frozenset({"depth", "normals", "corr"})
    paper = {}
    max_depth = 1.0
    gt_max_depth = 10.0

    def __init__(
        self, root: str | Path, split: str, crop: bool = True, size: int = 512, seed: int = 8
    ):
        check_split(self.name, split, ("train", "val", "trainval", "test"))
        self.root, self.split, self.crop, self.size = Path(root), split, crop, size
        require_dir(self.root, "one folder per object", WHERE)
        self.views: list[tuple[str, Path, dict]] = []  # (group, collection dir, annotation)
        objects = sorted(p for p in self.root.iterdir() if p.is_dir())
        for obj in objects:
            colls = sorted(p for p in obj.iterdir() if (p / "annotations.json").is_file())
            multi = [c for c in colls if c.name.startswith("multiview")]
            if not (obj / "wild_set" / "annotations.json").is_file() or not multi:
                continue  # Probe3D skips objects without both kinds of collection
            n_train = int(0.9 * len(multi))
            chosen = {
                "train": multi[:n_train],
                "val": multi[n_train:],
                "trainval": multi,
                "test": [obj / "wild_set"],
            }[split]
            for coll in chosen:
                for anno in self._annotations(coll):
                    self.views.append((f"{obj.name}/{coll.name}", coll, anno))
        if not self.views:
            raise missing(
                self.root / "<object>" / "wild_set" / "annotations.json",
                f"objects with multiview_* and wild_set collections ({split} is empty)",
                WHERE,
            )
        self._pairs = self._make_pairs(np.random.default_rng(seed))

    @staticmethod
    def _annotations(coll: Path) -> list[dict]:
        path = coll / "annotations.json"
        try:
            annos = sorted(json.loads(path.read_text()), key=lambda a: a["filename"])
            ok = all({"q", "t", "focal_length"} <= set(a["camera"]) for a in annos)
            ok = ok and all(len(a["image_size"]) == 2 for a in annos)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable annotations ({e})") from e
        if not ok:
            raise UserError(
                f"{path}: expected [{{filename, image_size, camera: {{q, t, focal_length}}}}]"
            )
        for a in annos:
            img = coll / "images" / a["filename"]
            small = coll / "images" / f"downsampled_{Path(a['filename']).stem}.jpg"
            if not img.is_file() and not small.is_file():
                raise missing(img, f"the image listed in {path.name}", WHERE)
        return annos

    def _make_pairs(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        rots = [quat_to_R(a["camera"]["q"]) for _, _, a in self.views]
        by_group: dict[str, list[int]] = {}
        for i, (g, _, _) in enumerate(self.views):
            by_group.setdefault(g, []).append(i)
        pairs = []
        for i in range(0, len(self.views), 4):
            cands = []
            for j in by_group[self.views[i][0]]:
                cos = (np.trace(rots[i] @ rots[j].T) - 1) / 2
                ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
                if j != i and 0 < ang <= MAX_PAIR_ANGLE:
                    cands.append(j)
            if cands:
                pairs.append((i, int(rng.choice(cands))))
        return pairs

    def pairs(self) -> list[tuple[int, int]]:
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self.views)

    def _file(self, coll: Path, sub: str, stem: str, ext: str) -> Path:
        small = coll / sub / f"downsampled_{stem}.{ext}"
        return small if small.is_file() else coll / sub / f"{stem}.{ext}"

    def _key(self, i: int) -> str:
        return f"{self.views[i][0]}/{Path(self.views[i][2]['filename']).stem}"

    def _viewmat(self, i: int) -> torch.Tensor:
        cam = self.views[i][2]["camera"]
        vm = np.eye(4)
        vm[:3, :3], vm[:3, 3] = quat_to_R(cam["q"]), np.asarray(cam["t"], np.float64) / 1000.0
        return torch.from_numpy(vm).float()

    def _full(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3], depth float32 [H, W] metres and K [3, 3] at the file size."""
        group, coll, anno = self.views[i]
        stem = Path(anno["filename"]).stem
        with Image.open(self._file(coll, "images", stem, "jpg")) as im:
            rgb = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        h, w = rgb.shape[:2]
        dpath = self._file(coll, "depth", stem, "png")
        if not dpath.is_file():
            raise missing(dpath, "the depth of the image", WHERE)
        with Image.open(dpath) as im:
            raw = np.asarray(im).astype(np.float64)
        if raw.shape != (h, w):
            raw = cv2.resize(raw, (w, h), interpolation=cv2.INTER_NEAREST)
        depth = np.where(raw > 0, DEPTH_NUMERATOR / np.maximum(raw, 1), 0.0).astype(np.float32)
        ah, aw = anno["image_size"]
        f = float(anno["camera"]["focal_length"])
        K = np.array([[f * w / aw, 0, w / 2], [0, f * h / ah, h / 2], [0, 0, 1]])
        return rgb, depth, K

    def _crop(self, rgb: np.ndarray, depth: np.ndarray, K: np.ndarray):
        """Square crop around the valid depth, then resize to `size` (K follows both)."""
        if self.crop:
            t, l, side = square_box(depth > 0)
            rgb, depth = rgb[t : t + side, l : l + side], depth[t : t + side, l : l + side]
            K = K - np.array([[0, 0, l], [0, 0, t], [0, 0, 0]])
        if self.size > 0:
            h, w = depth.shape
            scale = self.size / min(h, w)  # shorter side -> size (the square: both sides)
            out_w, out_h = round(w * scale), round(h * scale)
            rgb = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
            depth = cv2.resize(depth, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
            K = np.diag([out_w / w, out_h / h, 1.0]) @ K
        return rgb, depth, K

    def info(self, i: int) -> ViewInfo:
        if self.crop and self.size > 0:
            h = w = self.size
        else:
            h, w = self._crop(*self._full(i))[1].shape
        return ViewInfo(self._key(i), self.views[i][0], h, w, None, self._viewmat(i))

    def _load(self, i: int) -> Sample:
        rgb, depth, K = self._crop(*self._full(i))
        return Sample(
            key=self._key(i),
            image=to_image(rgb),
            depth=torch.from_numpy(np.ascontiguousarray(depth)),
            normals=torch.from_numpy(normals_from_depth(depth, K)),
            K=torch.from_numpy(K).float(),
            viewmat=self._viewmat(i),
            group=self.views[i][0],
        )
