"""`scenes.name=nerfstudio`: a `transforms.json` folder (nerfstudio and instant-ngp conventions).

A scene folder holds `transforms.json`, or NeRF-synthetic's `transforms_train.json` and
`transforms_test.json` (and `transforms_val.json`, trained on); paths in them are relative to the
folder. `scenes.root` is one such folder or a folder of them (named by their folders).

- Intrinsics are top-level (shared) or per frame (a frame's keys win): `fl_x`, `fl_y` (or
  instant-ngp's `camera_angle_x` / `camera_angle_y`: fl = w / (2 tan(angle / 2)); a missing
  `fl_y` is `fl_x`), `cx`, `cy` (default: the image centre), `w`, `h` (default: the first
  image's size), `camera_model` with its distortion: perspective (`OPENCV`, `PINHOLE`, ...,
  absent) `k1 k2 k3 p1 p2`, or `OPENCV_FISHEYE` `k1 k2 k3 k4`; absent coefficients are 0. Pixel
  centres are at +0.5, as in fit3d and COLMAP.
- `transform_matrix` is camera-to-world with OpenGL camera axes (`fit3d.geometry.
  opengl_to_opencv`); its world frame is kept as it is.
- A frame's `file_path` without an extension tries `.png`, `.jpg` (NeRF-synthetic);
  `mask_path` (optional: non-zero = valid) and `depth_file_path` (optional: 16-bit PNG in
  millimetres, nerfstudio's default depth unit) go with it.
- Sparse points: `ply_file_path` (in the poses' frame, as nerfstudio reads it); without it the
  lift starts from random points in the camera frusta.
- Held-out views: `test_filenames` (or `val_filenames`), or `transforms_test.json`, else every
  `scenes.test_every`-th.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycolmap

from fit3d.config import ScenesConfig
from fit3d.errors import UserError
from fit3d.geometry import opengl_to_opencv
from fit3d.scenes.own.layout import Capture, Job, PosedView, camera
from fit3d.scenes.scannetpp import read_json

TRANSFORMS = "transforms.json"
SPLIT_FILES = ("transforms_train.json", "transforms_val.json", "transforms_test.json")
"""NeRF-synthetic's per-split files: train and val views are trained on, test views held out."""
FISHEYE = "OPENCV_FISHEYE"
UNSUPPORTED = ("EQUIRECTANGULAR", "OMNIDIRECTIONALSTEREO_L", "OMNIDIRECTIONALSTEREO_R")
UNSUPPORTED += ("VR180_L", "VR180_R", "FISHEYE624")


def _is_scene(d: Path) -> bool:
    return (d / TRANSFORMS).is_file() or (d / SPLIT_FILES[0]).is_file()


def scene_dirs(root: Path) -> list[Path]:
    """The scenes under `scenes.root`: the root itself, else its subfolders with transforms."""
    if _is_scene(root):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and _is_scene(d))


def _frames(scene: Path) -> tuple[dict[str, Any], list[tuple[dict, Path]], list[str] | None]:
    """(shared keys, [(frame, its json)], held-out file paths or None) of a scene folder."""
    if (scene / TRANSFORMS).is_file():
        path = scene / TRANSFORMS
        meta = read_json(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
            raise UserError(f"{path}: expected an object with a 'frames' list")
        held = meta.get("test_filenames") or meta.get("val_filenames")
        return meta, [(f, path) for f in meta["frames"]], held
    shared: dict[str, Any] = {}
    frames: list[tuple[dict, Path]] = []
    held = []
    for name in SPLIT_FILES:
        path = scene / name
        if not path.is_file():
            continue
        meta = read_json(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
            raise UserError(f"{path}: expected an object with a 'frames' list")
        shared = {**{k: v for k, v in meta.items() if k != "frames"}, **shared}
        frames += [({**meta, **f, "frames": None}, path) for f in meta["frames"]]
        if name == SPLIT_FILES[2]:
            held += [str(f.get("file_path")) for f in meta["frames"]]
    return shared, frames, held or None


def _file(scene: Path, rel: Any, what: str, listed_in: Path) -> Path:
    """A path of the json, checked to exist (a missing extension tries .png, .jpg)."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{listed_in}: a frame has no valid {what} path ({rel!r})")
    path = scene / rel
    if not path.suffix and not path.is_file():
        for ext in (".png", ".jpg", ".jpeg"):
            if path.with_suffix(ext).is_file():
                return path.with_suffix(ext)
    if not path.is_file():
        raise UserError(f"missing {what} {path} (listed in {listed_in})")
    return path


def _name(rel: str) -> str:
    """A file path of the json as a view name (no leading ./)."""
    return Path(rel).as_posix().removeprefix("./")


def _camera(keys: dict[str, Any], size: tuple[int, int], where: Path) -> pycolmap.Camera:
    """The COLMAP camera of a frame's merged intrinsics (module docstring)."""
    model = str(keys.get("camera_model", "OPENCV")).upper()
    if model in UNSUPPORTED:
        raise UserError(f"{where}: camera_model {model} is not supported (perspective or fisheye)")

    def num(k: str, default: float | None = None) -> float:
        v = keys.get(k, default)
        try:
            return float(v)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {k} must be a number, got {v!r}") from None

    try:
        w, h = int(keys.get("w", size[0])), int(keys.get("h", size[1]))
    except (TypeError, ValueError):
        raise UserError(f"{where}: w and h must be integers") from None
    if "fl_x" in keys:
        fx = num("fl_x")
    elif "camera_angle_x" in keys:
        fx = w / (2 * math.tan(num("camera_angle_x") / 2))
    else:
        raise UserError(f"{where}: no focal length (fl_x or camera_angle_x)")
    if "fl_y" in keys:
        fy = num("fl_y")
    elif "camera_angle_y" in keys:
        fy = h / (2 * math.tan(num("camera_angle_y") / 2))
    else:
        fy = fx
    cx, cy = num("cx", w / 2), num("cy", h / 2)
    k1, k2, k3, k4, p1, p2 = (num(k, 0.0) for k in ("k1", "k2", "k3", "k4", "p1", "p2"))
    if model == FISHEYE:
        return camera(FISHEYE, w, h, [fx, fy, cx, cy, k1, k2, k3, k4])
    if k4:
        raise UserError(f"{where}: k4 of a perspective camera is not supported (only k1-k3, p1-p2)")
    if k3:
        return camera("FULL_OPENCV", w, h, [fx, fy, cx, cy, k1, k2, p1, p2, k3, 0, 0, 0])
    if k1 or k2 or p1 or p2:
        return camera("OPENCV", w, h, [fx, fy, cx, cy, k1, k2, p1, p2])
    return camera("PINHOLE", w, h, [fx, fy, cx, cy])


def _points(scene: Path, meta: dict[str, Any], where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sparse points of `ply_file_path` (xyz [P, 3], rgb [P, 3] in [0, 1]); P = 0 without."""
    rel = meta.get("ply_file_path")
    if not rel:
        return np.zeros((0, 3)), np.zeros((0, 3))
    path = _file(scene, rel, "point cloud", where)
    rec = pycolmap.Reconstruction()
    try:
        rec.import_PLY(str(path))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot read point cloud {path}: {str(e).splitlines()[0]}") from None
    pts = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in pts], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in pts], dtype=np.float64).reshape(-1, 3) / 255.0
    return xyz, rgb


def plan(scene: Path, sc: ScenesConfig, verbose: bool = True) -> Job:
    """Read and check one scene folder: every image, mask and depth file it lists exists."""
    meta, frames, held = _frames(scene)
    if len(frames) < 2:
        raise UserError(f"{scene}: {len(frames)} frame(s); a scene needs at least 2")
    views: list[PosedView] = []
    size: tuple[int, int] | None = None
    for frame, where in frames:
        if not isinstance(frame, dict):
            raise UserError(f"{where}: a frame is not an object ({frame!r})")
        image = _file(scene, frame.get("file_path"), "image", where)
        if size is None and not ("w" in meta and "h" in meta):
            probe = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
            if probe is None:
                raise UserError(f"unreadable image {image}")
            size = (probe.shape[1], probe.shape[0])
        try:
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: frame {frame.get('file_path')} has no 4x4 pose") from None
        if c2w.shape == (3, 4):
            c2w = np.vstack([c2w, [0.0, 0.0, 0.0, 1.0]])
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise UserError(f"{where}: transform_matrix of {image.name} is not a finite 4x4")
        views.append(
            PosedView(
                name=_name(str(frame["file_path"])),
                image=image,
                camera=_camera({**meta, **frame}, size or (0, 0), where),
                viewmat=np.linalg.inv(opengl_to_opencv(c2w)),
                mask=_file(scene, frame["mask_path"], "mask", where)
                if frame.get("mask_path")
                else None,
                depth=_file(scene, frame["depth_file_path"], "depth", where)
                if frame.get("depth_file_path")
                else None,
            )
        )
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise UserError(f"{scene}: the same file_path is listed twice")
    test = None
    if held is not None:
        test = [_name(str(n)) for n in held]
        unknown = sorted(set(test) - set(names))
        if unknown:
            raise UserError(f"{scene}: held-out file {unknown[0]} is not among the frames")
    xyz, rgb = _points(scene, meta, frames[0][1])
    files = sorted({where for _, where in frames})
    files += [f for v in views for f in (v.image, v.mask, v.depth) if f is not None]
    capture = Capture(views, xyz, rgb, test, {"source": "nerfstudio"})
    return Job(scene.name, files, lambda work, verbose: capture)
