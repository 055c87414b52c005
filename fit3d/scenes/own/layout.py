"""One posed capture written as a ScanNet++-layout scene: undistorted pinhole images at most
`scenes.image_size` pixels on their long side, masks, optional depth, poses, sparse points.

Every own scene source (`colmap`, `nerfstudio`, `images`) ends in a `Capture`: views with their
source image, a COLMAP camera of any model at the source image size, and an OpenCV world-to-camera
pose, plus the sparse points in the same world frame. `write_capture` turns it into the folder
`fit3d.scenes.scannetpp.open_scene` reads (layout in that module's docstring), so lifting,
fine-tuning and the viewer read own scenes exactly as they read ScanNet++.

Undistortion (docs/method.md, "Your own scenes"). A view is first downscaled (area filter) so
that its long side is at most `image_size`; its camera is rescaled with it (COLMAP's rescale:
focal length and principal point times the size ratio). A camera with distortion then gets the
pinhole camera COLMAP's undistorter picks for it (`pycolmap.undistort_camera`: no blank pixels),
again capped at `image_size`, and every output pixel centre is sent through that pinhole camera's
inverse and the source camera's projection: images are resampled bilinearly there, masks and
depth take the nearest pixel, and pixels that fall outside the source image are masked out.
Distortion that moves no pixel by more than `NEGLIGIBLE_PX` is left alone (the images keep their
pixels). A view whose file says (EXIF orientation) that the camera was held sideways or upside
down is turned upright last, its camera with it (`turn_upright`; COLMAP poses the stored pixels).
Images that need none of this are copied byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycolmap
from PIL import Image
from tqdm import tqdm

from fit3d.errors import UserError
from fit3d.io import write_json
from fit3d.scenes.scannetpp import (
    COLMAP_DIR,
    GT_DIRS,
    IMAGE_DIR,
    MASK_DIR,
    SPLIT_LISTS,
    TRANSFORMS,
    viewmat_to_nerfstudio,
)

NEGLIGIBLE_PX = 0.25
"""Distortion displacing no output pixel by more than this (pixels) is ignored: less than
structure from motion's typical reprojection error (0.3-1 px), and resampling would blur the
images by more than it corrects."""
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
COPYABLE = (".jpg", ".jpeg", ".png")
"""Image files copied unchanged when they need no resampling (others are written as PNG)."""
PREPARED_FILE = "prepared.json"
"""Per prepared scene (beside `dslr/`): source, settings, input fingerprint, counts."""


@dataclass(frozen=True)
class PosedView:
    """One view of a capture: where its pixels are and how the camera saw them."""

    name: str
    """Image name in the source (a relative path; `/` becomes `__` in the prepared scene)."""
    image: Path
    """Source image file."""
    camera: pycolmap.Camera
    """The view's camera, any COLMAP model, at the source image's size."""
    viewmat: np.ndarray
    """[4, 4] world-to-camera, OpenCV axes, in the capture's world frame."""
    mask: Path | None = None
    """Optional valid-pixel mask (non-zero = valid), source image size."""
    depth: Path | None = None
    """Optional depth: uint16 PNG, millimetres along the optical axis, source image size."""
    upright: int = 1
    """EXIF orientation the camera was held in (1 none, 3 180 deg, 6 / 8 90 deg clockwise /
    anticlockwise to display): the prepared view is turned upright (`turn_upright`)."""


@dataclass
class Capture:
    """A posed capture ready to be written (`write_capture`)."""

    views: list[PosedView]
    xyz: np.ndarray  # [P, 3] sparse points, world frame of the views
    rgb: np.ndarray  # [P, 3] their colours in [0, 1]
    test_names: list[str] | None = None
    """Held-out view names; None = every `test_every`-th view (`held_out_views`)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance of the poses (source, registered images, reprojection error, ...)."""


@dataclass(frozen=True)
class Job:
    """One checked input scene of a source, ready for the long work."""

    scene_id: str
    files: list[Path]
    """Input files whose names, sizes and modification times fingerprint the prepared scene."""
    run: Callable[[Path, bool], Capture]
    """(work folder for resumable intermediate files, verbose) -> the posed capture."""
    check: Callable[[bool], None] | None = None
    """(verbose) -> None, a UserError for a bad input: the costlier checks (decoding every
    image), run before any scene's long work but only for scenes not prepared yet."""

    def fingerprint(self) -> str:
        """sha1 over (path, size, mtime) of `files`: a changed input prepares the scene again."""
        h = hashlib.sha1()
        for f in sorted(self.files):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def held_out_views(n: int, test_every: int) -> list[int]:
    """Indices of the held-out views among n views sorted by name: the `test_every`-th,
    2`test_every`-th, ... (indices test_every-1, 2 test_every-1, ...); the last view when that
    picks none. No view is held out of a scene of fewer than 2."""
    held = list(range(test_every - 1, n, test_every))
    return held or ([n - 1] if n >= 2 else [])


# --- cameras ------------------------------------------------------------------------------------
def camera(model: str, width: int, height: int, params: list[float]) -> pycolmap.Camera:
    """A COLMAP camera from its model name, size and parameters (COLMAP's parameter order)."""
    try:
        cam = pycolmap.Camera.create_from_model_name(1, model, 1.0, width, height)
        cam.params = np.asarray(params, dtype=np.float64)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"bad {model} camera {params} ({str(e).splitlines()[0]})") from None
    if not cam.verify_params():
        raise UserError(f"a {model} camera takes {cam.params_info}, got {params}")
    return cam


def _copy_camera(cam: pycolmap.Camera) -> pycolmap.Camera:
    return camera(cam.model.name, cam.width, cam.height, list(cam.params))


def _pinhole(cam: pycolmap.Camera) -> np.ndarray:
    """K [3, 3] of a camera's pinhole part (focal lengths, principal point)."""
    return np.array(
        [
            [cam.focal_length_x, 0.0, cam.principal_point_x],
            [0.0, cam.focal_length_y, cam.principal_point_y],
            [0.0, 0.0, 1.0],
        ]
    )


def _fit(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most image_size (0 = unchanged)."""
    s = min(1.0, image_size / max(width, height)) if image_size > 0 else 1.0
    return max(1, round(width * s)), max(1, round(height * s))


def _source_map(K: np.ndarray, width: int, height: int, cam: pycolmap.Camera) -> np.ndarray:
    """Source pixel coordinates [H, W, 2] (x, y pixel indices) seen by each output pixel of the
    pinhole camera K at width x height, through source camera `cam`."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(K).T  # [HW, 3]
    src = cam.img_from_cam(rays, check_cheirality=False) - 0.5  # [HW, 2]
    return src.reshape(height, width, 2).astype(np.float32)


@dataclass(frozen=True)
class Target:
    """How one source camera becomes the prepared pinhole camera."""

    K: np.ndarray  # [3, 3] prepared pinhole intrinsics
    width: int
    height: int
    scaled: pycolmap.Camera  # the source camera at the downscaled source size
    warp: np.ndarray | None  # [H, W, 2] source pixel of each output pixel; None = no resampling


def target(cam: pycolmap.Camera, image_size: int) -> Target:
    """The prepared pinhole camera of source camera `cam` (see the module docstring)."""
    w, h = _fit(cam.width, cam.height, image_size)
    scaled = _copy_camera(cam)
    if (w, h) != (cam.width, cam.height):
        scaled.rescale(w, h)
    K = _pinhole(scaled)
    if scaled.model.name in PINHOLE_MODELS:
        return Target(K, w, h, scaled, None)
    warp = _source_map(K, w, h, scaled)
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    if np.abs(warp - np.stack([u, v], -1)).max() <= NEGLIGIBLE_PX:
        return Target(K, w, h, scaled, None)
    und = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), scaled)
    uw, uh = _fit(und.width, und.height, image_size)
    if (uw, uh) != (und.width, und.height):
        und.rescale(uw, uh)
    K = _pinhole(und)
    return Target(K, uw, uh, scaled, _source_map(K, uw, uh, scaled))


# --- pixels -------------------------------------------------------------------------------------
def read_rgb(path: Path) -> tuple[np.ndarray, bool]:
    """(8-bit BGR [H, W, 3], whether the file held exactly that) of any image cv2 reads: grey is
    expanded, 16-bit scaled to 8 bits, an alpha channel composited onto white (the NeRF-synthetic
    convention)."""
    if not path.is_file():
        raise UserError(f"missing image {path}")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise UserError(f"unreadable image {path}: not an image file, or cut short")
    plain = img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise UserError(f"image {path} has {img.dtype} pixels; fit3d reads 8- or 16-bit images")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        alpha = img[..., 3:].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return img, plain


def _read_plane(path: Path, what: str) -> np.ndarray:
    """A single-channel mask or depth file [H, W] as stored."""
    if not path.is_file():
        raise UserError(f"missing {what} {path}")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise UserError(f"unreadable {what} {path}")
    return arr if arr.ndim == 2 else arr[..., 0]


def _check_size(arr: np.ndarray, cam: pycolmap.Camera, path: Path) -> None:
    if arr.shape[:2] != (cam.height, cam.width):
        raise UserError(
            f"{path} is {arr.shape[1]}x{arr.shape[0]} but its camera is {cam.width}x{cam.height}"
        )


def _resample(arr: np.ndarray, t: Target, nearest: bool) -> np.ndarray:
    """Source-size array -> prepared size: downscale, then undistort (module docstring)."""
    size = (t.scaled.width, t.scaled.height)
    if (arr.shape[1], arr.shape[0]) != size:
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    if t.warp is None:
        return arr
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(
        arr, t.warp[..., 0], t.warp[..., 1], interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def _inside(t: Target) -> np.ndarray | None:
    """Output pixels [H, W] bool whose source pixel lies in the source image; None = all."""
    if t.warp is None:
        return None
    x, y = t.warp[..., 0], t.warp[..., 1]
    ok = (x >= -0.5) & (y >= -0.5) & (x <= t.scaled.width - 0.5) & (y <= t.scaled.height - 0.5)
    return None if ok.all() else ok


def prepared_name(name: str) -> str:
    """File name of a view in the prepared scene: flat (`/` -> `__`), PNG unless JPG/PNG."""
    flat = name.replace("\\", "/").replace("/", "__")
    return flat if Path(flat).suffix.lower() in COPYABLE else str(Path(flat).with_suffix(".png"))


def _write_image(path: Path, img: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), img, params):
        raise UserError(f"cannot write {path}")


_TURNS = {  # EXIF orientation -> (cv2 rotation, R [3, 3]: prepared camera axes from source ones)
    3: (cv2.ROTATE_180, np.diag([-1.0, -1.0, 1.0])),
    6: (cv2.ROTATE_90_CLOCKWISE, np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])),
    8: (cv2.ROTATE_90_COUNTERCLOCKWISE, np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])),
}


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag of an image file (1 when it has none or cannot say)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1))
    except (OSError, ValueError, TypeError):
        return 1


def turn_upright(
    K: np.ndarray, width: int, height: int, viewmat: np.ndarray, orientation: int
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """(K, width, height, viewmat) of a pinhole view turned by EXIF `orientation` 3, 6 or 8.

    Turning the image 90 deg clockwise sends continuous pixel (x, y) to (height - y, x): the
    camera's new x axis is its old -y, its new y axis its old x (R below), fx and fy swap and the
    principal point moves with the pixels. Anticlockwise and 180 deg likewise."""
    rot = _TURNS[orientation][1]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if orientation == 3:
        K2, size = [[fx, 0, width - cx], [0, fy, height - cy]], (width, height)
    elif orientation == 6:
        K2, size = [[fy, 0, height - cy], [0, fx, cx]], (height, width)
    else:
        K2, size = [[fy, 0, cy], [0, fx, width - cx]], (height, width)
    turn = np.eye(4)
    turn[:3, :3] = rot
    return np.array([*K2, [0, 0, 1.0]]), size[0], size[1], turn @ viewmat


def _write_view(view: PosedView, t: Target, dslr: Path) -> dict[str, Any]:
    """Write one view's image (and mask, depth) into `dslr`; returns its nerfstudio frame."""
    name = prepared_name(view.name)
    stem = Path(name).stem
    out = dslr / IMAGE_DIR / name
    turn = _TURNS[view.upright][0] if view.upright in _TURNS else None

    def upright(arr: np.ndarray) -> np.ndarray:
        return arr if turn is None else cv2.rotate(arr, turn)

    same_size = (t.width, t.height) == (view.camera.width, view.camera.height)
    img, plain = read_rgb(view.image)  # read even when copied: an unreadable file stops here
    _check_size(img, view.camera, view.image)
    # a copy keeps the file's EXIF orientation, which readers apply: only files without one
    copy = plain and t.warp is None and same_size and turn is None
    if copy and view.image.suffix.lower() in COPYABLE and exif_orientation(view.image) == 1:
        shutil.copyfile(view.image, out)
    else:
        _write_image(out, upright(_resample(img, t, nearest=False)))
    valid = _inside(t)
    if view.mask is not None:
        m = _read_plane(view.mask, "mask")
        _check_size(m, view.camera, view.mask)
        m = _resample((m > 0).astype(np.uint8), t, nearest=True) > 0
        valid = m if valid is None else valid & m
    K, width, height, viewmat = t.K, t.width, t.height, view.viewmat
    if turn is not None:
        K, width, height, viewmat = turn_upright(K, width, height, viewmat, view.upright)
    frame: dict[str, Any] = {
        "file_path": name,
        "transform_matrix": viewmat_to_nerfstudio(viewmat).tolist(),
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": width,
        "h": height,
    }
    if valid is not None:
        mask = upright(valid.astype(np.uint8) * 255)
        cv2.imwrite(str(dslr / MASK_DIR / f"{stem}.png"), mask)
        frame["mask_path"] = f"{stem}.png"
    if view.depth is not None:
        d = _read_plane(view.depth, "depth")
        if d.dtype != np.uint16:
            raise UserError(f"depth {view.depth} must be a 16-bit PNG (millimetres)")
        _check_size(d, view.camera, view.depth)
        (dslr / GT_DIRS["depth"]).mkdir(exist_ok=True)
        depth = upright(_resample(d, t, nearest=True))
        cv2.imwrite(str(dslr / GT_DIRS["depth"] / f"{stem}.png"), depth)
    return frame


def write_points(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """COLMAP `points3D.txt` of points xyz [P, 3] with colours rgb [P, 3] in [0, 1] (no tracks;
    `fit3d.scenes.scannetpp.read_points3d` reads it)."""
    col = np.clip(np.round(np.asarray(rgb) * 255), 0, 255).astype(int)
    rows = [
        f"{i} {p[0]:.9g} {p[1]:.9g} {p[2]:.9g} {c[0]} {c[1]} {c[2]} 0"
        for i, (p, c) in enumerate(zip(np.asarray(xyz), col, strict=True), 1)
    ]
    path.write_text(
        "# 3D point list: POINT3D_ID X Y Z R G B ERROR\n" + "".join(r + "\n" for r in rows)
    )


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` only if the block
    succeeds (a previous `path` is removed then), else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_capture(
    capture: Capture,
    scene_dir: Path,
    image_size: int,
    test_every: int,
    prepared: dict[str, Any],
    verbose: bool = True,
) -> dict[str, Any]:
    """Write `capture` as the ScanNet++-layout scene `scene_dir` (`<root>/data/<scene_id>`),
    atomically; `prepared` (source, settings, fingerprint) goes into its `prepared.json` with the
    counts. Returns that record."""
    views = sorted(capture.views, key=lambda v: prepared_name(v.name))
    names = [prepared_name(v.name) for v in views]
    if len(set(names)) != len(names):
        raise UserError(f"{scene_dir.name}: two images map to the same file name in {names}")
    if capture.test_names is None:
        held = {names[i] for i in held_out_views(len(names), test_every)}
    else:
        held = {prepared_name(n) for n in capture.test_names}
    targets: dict[tuple, Target] = {}  # one per distinct source camera (shared intrinsics: one)
    with atomic_dir(scene_dir) as tmp:
        dslr = tmp / "dslr"
        for sub in (IMAGE_DIR, MASK_DIR, "nerfstudio", COLMAP_DIR):
            (dslr / sub).mkdir(parents=True)
        frames = []
        bar = tqdm(views, desc=f"{scene_dir.name}: undistort", unit="img", disable=not verbose)
        for view in bar:
            cam = view.camera
            key = (cam.model.name, cam.width, cam.height, tuple(cam.params.tolist()))
            if key not in targets:
                targets[key] = target(view.camera, image_size)
            frames.append(_write_view(view, targets[key], dslr))
        train = [f for f in frames if f["file_path"] not in held]
        test = [f for f in frames if f["file_path"] in held]
        top = {k: frames[0][k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")}
        write_json(
            dslr / TRANSFORMS,
            {"camera_model": "PINHOLE", **top, "frames": train, "test_frames": test},
        )
        write_json(
            dslr / SPLIT_LISTS,
            {"train": [f["file_path"] for f in train], "test": [f["file_path"] for f in test]},
        )
        if len(capture.xyz):
            write_points(dslr / COLMAP_DIR / "points3D.txt", capture.xyz, capture.rgb)
        record = {
            **prepared,
            **capture.info,
            "views": len(frames),
            "train_views": len(train),
            "test_views": len(test),
            "points": len(capture.xyz),
            "size": sorted({(t.width, t.height) for t in targets.values()}),
            "undistorted": any(t.warp is not None for t in targets.values()),
        }
        write_json(tmp / PREPARED_FILE, record)
    return record
