"""ScanNet++ DSLR reader (undistorted pinhole images), also used for the generated demo scenes.

Layout (official toolkit, after its undistort step)::

    <root>/splits/{nvs_sem_train,nvs_sem_val}.txt            one scene id per line
    <root>/classes.json                                       optional: class names (demo only)
    <root>/data/<scene_id>/dslr/
        undistorted_images/<file_path>                        RGB (JPG)
        undistorted_anon_masks/<mask_path>                    255 = valid, 0 = anonymised
        nerfstudio/transforms_undistorted.json                pinhole intrinsics + poses
        colmap/{cameras,images,points3D}.txt                  sparse model (COLMAP world frame)
        train_test_lists.json                                 {"train": [names], "test": [names]}
        gt_{depth,normals,semantics,instances}/<stem>.png     optional ground truth: written by
                                                              the demo generator, or rendered
                                                              from the scan mesh by
                                                              fit3d.datasets.scannetpp_labels

Poses: nerfstudio `transform_matrix` is camera-to-world with OpenGL camera axes in a world frame
whose axes are permuted relative to COLMAP's. `nerfstudio_to_viewmat` turns it into an OpenCV
world-to-camera matrix in the COLMAP frame of `points3D.txt` (docs/method.md, "ScanNet++ layout
and poses").
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from fit3d.errors import UserError
from fit3d.geometry import opengl_to_opencv
from fit3d.io import read_image

IMAGE_DIR = "undistorted_images"
MASK_DIR = "undistorted_anon_masks"
TRANSFORMS = "nerfstudio/transforms_undistorted.json"
SPLIT_LISTS = "train_test_lists.json"
COLMAP_DIR = "colmap"
GT_DIRS = {
    "depth": "gt_depth",
    "normals": "gt_normals",
    "semantics": "gt_semantics",
    "instances": "gt_instances",
}
"""Ground-truth folders beside the images; files are `<image stem>.png`."""
DEPTH_SCALE = 1000.0
"""Depth PNGs store uint16 millimetres."""
NORMAL_SCALE = 32767.0
"""Normal PNGs store uint16 `(n + 1) * NORMAL_SCALE`, channels x, y, z; all-zero = invalid."""
IGNORE_LABEL = 255
"""Semantic id of pixels without a label."""

# World-frame change nerfstudio -> COLMAP: negate row 2, then swap rows 0 and 1.
_NS_TO_COLMAP = np.array(
    [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=np.float64
)

GET_SCANNETPP = (
    "get ScanNet++ from https://kaldir.vc.in.tum.de/scannetpp/ (licence required), run the "
    "official toolkit's undistort step (github.com/scannetpp/scannetpp: "
    "`python -m dslr.undistort dslr/configs/undistort.yml`), then set scenes.root=<root> or "
    "SCANNETPP_ROOT"
)


def nerfstudio_to_viewmat(c2w: np.ndarray) -> np.ndarray:
    """nerfstudio camera-to-world [4,4] (OpenGL axes, permuted world) -> OpenCV world-to-camera
    [4,4] in the COLMAP world frame."""
    return np.linalg.inv(_NS_TO_COLMAP @ opengl_to_opencv(np.asarray(c2w, dtype=np.float64)))


def viewmat_to_nerfstudio(viewmat: np.ndarray) -> np.ndarray:
    """Inverse of `nerfstudio_to_viewmat`: OpenCV world-to-camera (COLMAP frame) -> nerfstudio
    camera-to-world."""
    c2w_cv = np.linalg.inv(np.asarray(viewmat, dtype=np.float64))
    return opengl_to_opencv(np.linalg.inv(_NS_TO_COLMAP) @ c2w_cv)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a `UserError` naming it."""
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed JSON in {path}: {e}") from e


@dataclass(frozen=True)
class _View:
    name: str  # file_path inside the image folder
    K: np.ndarray  # [3, 3] at file resolution
    width: int  # file resolution
    height: int
    viewmat: np.ndarray  # [4, 4] world-to-camera, OpenCV axes, COLMAP frame
    mask_name: str | None


class Scene:
    """One scene: lazily loaded views, cameras, sparse points and optional ground truth.

    Conventions: `viewmat(i)` is world-to-camera with OpenCV axes (x right, y down, z forward) in
    the COLMAP world frame of `points()`; `K(i)` uses pixel centres at +0.5 (COLMAP, gsplat); both
    already account for the resolution factor. Opening a scene reads only JSON files.
    """

    def __init__(
        self,
        scene_id: str,
        dslr_dir: Path,
        views: list[_View],
        train_views: list[int],
        test_views: list[int],
        resolution: float = 1.0,
        classes: list[str] | None = None,
    ):
        self.scene_id = scene_id
        self.dslr_dir = dslr_dir
        self.classes = classes
        self.train_views = train_views
        self.test_views = test_views
        self.resolution = resolution
        self._views = views
        self._points: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        return (
            f"Scene({self.scene_id!r}, views={len(self)}, train={len(self.train_views)}, "
            f"test={len(self.test_views)}, resolution={self.resolution})"
        )

    # --- cameras -------------------------------------------------------------------------------
    def _size(self, i: int) -> tuple[int, int]:
        v = self._views[i]
        return round(v.width * self.resolution), round(v.height * self.resolution)

    def width(self, i: int) -> int:
        return self._size(i)[0]

    def height(self, i: int) -> int:
        return self._size(i)[1]

    def K(self, i: int) -> torch.Tensor:
        """Intrinsics [3, 3] float32 at the read resolution."""
        v = self._views[i]
        w, h = self._size(i)
        scale = np.diag([w / v.width, h / v.height, 1.0])
        return torch.from_numpy(scale @ v.K).float()

    def viewmat(self, i: int) -> torch.Tensor:
        """World-to-camera [4, 4] float32, OpenCV axes, COLMAP world frame."""
        return torch.from_numpy(self._views[i].viewmat).float()

    def cameras(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All views' (viewmats [N, 4, 4], Ks [N, 3, 3]) float32."""
        return (
            torch.stack([self.viewmat(i) for i in range(len(self))]),
            torch.stack([self.K(i) for i in range(len(self))]),
        )

    def image_name(self, i: int) -> str:
        return self._views[i].name

    def index(self, name: str) -> int:
        """View index of an image name."""
        for i, v in enumerate(self._views):
            if v.name == name:
                return i
        raise KeyError(name)

    # --- per-view data -------------------------------------------------------------------------
    def _resize(self, i: int, arr: np.ndarray, nearest: bool) -> np.ndarray:
        size = self._size(i)
        if (arr.shape[1], arr.shape[0]) == size:
            return arr
        if nearest:
            interp = cv2.INTER_NEAREST
        else:
            interp = cv2.INTER_AREA if self.resolution < 1 else cv2.INTER_LINEAR
        return cv2.resize(arr, size, interpolation=interp)

    def _check_size(self, i: int, arr: np.ndarray, path: Path) -> None:
        v = self._views[i]
        if arr.shape[:2] != (v.height, v.width):
            raise UserError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but {TRANSFORMS} says "
                f"{v.width}x{v.height}"
            )

    def load_image(self, i: int) -> torch.Tensor:
        """RGB [H, W, 3] float32 in [0, 1]."""
        path = self.dslr_dir / IMAGE_DIR / self._views[i].name
        bgr = read_image(path)
        self._check_size(i, bgr, path)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return torch.from_numpy(self._resize(i, rgb, nearest=False)).float() / 255.0

    def load_mask(self, i: int) -> torch.Tensor | None:
        """Valid-pixel mask [H, W] bool (False = anonymised), or None without a mask file."""
        name = self._views[i].mask_name
        if name is None:
            return None
        path = self.dslr_dir / MASK_DIR / name
        if not path.is_file():
            return None
        m = read_image(path, cv2.IMREAD_GRAYSCALE)
        self._check_size(i, m, path)
        return torch.from_numpy(self._resize(i, m, nearest=True) >= 128)

    def _gt(self, i: int, kind: str, flags: int) -> np.ndarray | None:
        path = self.dslr_dir / GT_DIRS[kind] / (Path(self._views[i].name).stem + ".png")
        if not path.is_file():
            return None
        arr = read_image(path, flags)
        self._check_size(i, arr, path)
        return self._resize(i, arr, nearest=True)

    def load_depth(self, i: int) -> torch.Tensor | None:
        """Depth along the optical axis [H, W] float32 metres, 0 = invalid; None if absent."""
        d = self._gt(i, "depth", cv2.IMREAD_UNCHANGED)
        return None if d is None else torch.from_numpy(d.astype(np.float32) / DEPTH_SCALE)

    def load_normals(self, i: int) -> torch.Tensor | None:
        """Unit normals [H, W, 3] float32 in the camera frame (OpenCV), 0 = invalid."""
        n = self._gt(i, "normals", cv2.IMREAD_UNCHANGED)
        if n is None:
            return None
        raw = torch.from_numpy(n[..., ::-1].astype(np.float32))  # file stores x, y, z as R, G, B
        valid = raw.sum(-1, keepdim=True) > 0
        vec = torch.nn.functional.normalize(raw / NORMAL_SCALE - 1.0, dim=-1)
        return vec * valid

    def load_semantics(self, i: int) -> torch.Tensor | None:
        """Class ids [H, W] int64 (index into `classes`), 255 = ignore; None if absent."""
        s = self._gt(i, "semantics", cv2.IMREAD_UNCHANGED)
        return None if s is None else torch.from_numpy(s.astype(np.int64))

    def load_instances(self, i: int) -> torch.Tensor | None:
        """Instance ids [H, W] int64 (0 = none); None if absent."""
        s = self._gt(i, "instances", cv2.IMREAD_UNCHANGED)
        return None if s is None else torch.from_numpy(s.astype(np.int64))

    # --- sparse points -------------------------------------------------------------------------
    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """COLMAP sparse points: xyz [P, 3] float32, rgb [P, 3] float32 in [0, 1] (P may be 0)."""
        if self._points is None:
            self._points = read_points3d(self.dslr_dir / COLMAP_DIR)
        return self._points


def read_points3d(colmap_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `points3D.txt` with pycolmap (xyz [P,3], rgb [P,3] in [0,1]); no file -> P = 0.

    pycolmap reads a text model only as a whole, so when `cameras.txt` / `images.txt` are absent
    the lone `points3D.txt` is read from a temporary folder beside empty ones.
    """
    import pycolmap

    path = colmap_dir / "points3D.txt"
    if not path.is_file():
        return torch.zeros(0, 3), torch.zeros(0, 3)
    rec = pycolmap.Reconstruction()
    try:
        if all((colmap_dir / f).is_file() for f in ("cameras.txt", "images.txt")):
            rec.read_text(str(colmap_dir))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for f in ("cameras.txt", "images.txt"):
                    Path(tmp, f).write_text("")
                os.symlink(path.resolve(), Path(tmp, "points3D.txt"))
                rec.read_text(tmp)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot read COLMAP model {colmap_dir}: {str(e).splitlines()[0]}") from e
    pts = list(rec.points3D.values())
    if not pts:
        return torch.zeros(0, 3), torch.zeros(0, 3)
    xyz = np.stack([p.xyz for p in pts]).astype(np.float32)
    rgb = np.stack([p.color for p in pts]).astype(np.float32) / 255.0
    return torch.from_numpy(xyz), torch.from_numpy(rgb)


def _intrinsics(meta: dict, path: Path) -> tuple[np.ndarray, int, int]:
    try:
        fx, fy = float(meta["fl_x"]), float(meta["fl_y"])
        cx, cy = float(meta["cx"]), float(meta["cy"])
        w, h = int(meta["w"]), int(meta["h"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: missing or bad intrinsics ({e})") from e
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64), w, h


def _classes(root: Path) -> list[str] | None:
    path = root / "classes.json"
    if not path.is_file():
        return None
    data = read_json(path)
    names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise UserError(f"{path} must hold a list of class names")
    return names


def open_scene(root: str | Path, scene_id: str, resolution: float = 1.0) -> Scene:
    """Open `<root>/data/<scene_id>/dslr` (reads JSON only; images load on demand).

    Views are sorted by image name; frames flagged `is_bad` are skipped. The train/test split
    comes from `train_test_lists.json`, else from the json's `frames` / `test_frames`.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"scene root {root} does not exist")
    if resolution <= 0:
        raise UserError(f"resolution must be > 0, got {resolution}")
    dslr = root / "data" / scene_id / "dslr"
    if not dslr.is_dir():
        raise UserError(f"scene {scene_id} not found: no folder {dslr}")
    tpath = dslr / TRANSFORMS
    meta = read_json(tpath)
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise UserError(f"{tpath}: expected an object with a 'frames' list")
    K, w, h = _intrinsics(meta, tpath)
    tagged = [(f, "train") for f in meta["frames"]]
    tagged += [(f, "test") for f in meta.get("test_frames") or []]
    views: dict[str, tuple[_View, str]] = {}
    for frame, tag in tagged:
        try:
            name = str(frame["file_path"])
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{tpath}: bad frame entry ({e})") from e
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise UserError(f"{tpath}: frame {name} transform_matrix is not a finite 4x4 matrix")
        if frame.get("is_bad", False):
            continue
        if not (dslr / IMAGE_DIR / name).is_file():
            raise UserError(f"missing image {dslr / IMAGE_DIR / name} (listed in {tpath})")
        fK, fw, fh = _intrinsics({**meta, **frame}, tpath)
        view = _View(name, fK, fw, fh, nerfstudio_to_viewmat(c2w), frame.get("mask_path"))
        views[name] = (view, tag)
    if len(views) < 2:
        raise UserError(f"scene {scene_id} has {len(views)} usable view(s) in {tpath}; need >= 2")
    names = sorted(views)
    ordered = [views[n][0] for n in names]
    lists_path = dslr / SPLIT_LISTS
    if lists_path.is_file():
        lists = read_json(lists_path)
        if not isinstance(lists, dict) or not all(
            isinstance(lists.get(k), list) for k in ("train", "test")
        ):
            raise UserError(f"{lists_path}: expected {{'train': [...], 'test': [...]}}")
        pos = {n: i for i, n in enumerate(names)}
        train = sorted(pos[n] for n in lists["train"] if n in pos)
        test = sorted(pos[n] for n in lists["test"] if n in pos)
    else:
        train = [i for i, n in enumerate(names) if views[n][1] == "train"]
        test = [i for i, n in enumerate(names) if views[n][1] == "test"]
    return Scene(scene_id, dslr, ordered, train, test, resolution, _classes(root))


SPLIT_ALIASES = {"train": "nvs_sem_train", "val": "nvs_sem_val"}


def list_scenes(root: str | Path, split: str) -> list[str]:
    """Scene ids listed in `<root>/splits/<split>.txt` (blank lines and `#` comments skipped);
    `train` / `val` stand for `nvs_sem_train` / `nvs_sem_val` unless such files exist."""
    path = Path(root) / "splits" / f"{split}.txt"
    if not path.is_file() and split in SPLIT_ALIASES:
        path = path.with_name(f"{SPLIT_ALIASES[split]}.txt")
    if not path.is_file():
        raise UserError(f"split file {path} not found")
    ids = [ln.strip() for ln in path.read_text().splitlines()]
    return [s for s in ids if s and not s.startswith("#")]
