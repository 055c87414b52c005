"""`scenes.name=colmap`: COLMAP workspaces, any camera model, undistorted to pinhole once.

A scene folder (what `colmap automatic_reconstructor` or `colmap mapper` leaves)::

    <scene>/images/<name>                                 the images the model names
    <scene>/sparse/0/{cameras,images,points3D}.{bin,txt}  text or binary model (or sparse/ itself)
    <scene>/masks/<name>.png                              optional, COLMAP's convention: 0 = ignore

`scenes.root` is one such folder or a folder of them (every subfolder holding `sparse/` is a
scene, named by its folder). The model's world frame and poses are kept; its registered images
are the views, its points seed the Gaussians. COLMAP poses images as stored; one whose EXIF
orientation says the camera was held sideways is turned upright when written (with its camera).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap

from fit3d.config import ScenesConfig
from fit3d.errors import UserError
from fit3d.scenes.own.layout import Capture, Job, PosedView, camera, exif_orientation

MODEL_NAMES = ("cameras", "images", "points3D")


def model_dir(scene: Path) -> Path | None:
    """The sparse model folder of a workspace (`sparse/0`, `sparse`, or the folder itself)."""
    for d in (scene / "sparse" / "0", scene / "sparse", scene):
        if any((d / f"cameras{ext}").is_file() for ext in (".bin", ".txt")):
            return d
    return None


def scene_dirs(root: Path) -> list[Path]:
    """The workspaces under `scenes.root`: the root itself, else its subfolders with a model."""
    if model_dir(root) is not None:
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and model_dir(d) is not None)


def read_model(path: Path) -> pycolmap.Reconstruction:
    """A COLMAP model folder, binary (preferred) or text; a UserError names what is wrong."""
    for ext in (".bin", ".txt"):
        if all((path / f"{n}{ext}").is_file() for n in MODEL_NAMES):
            break
    else:
        raise UserError(
            f"{path}: expected a COLMAP model, {', '.join(n + '.bin' for n in MODEL_NAMES)} or "
            f"the same .txt files"
        )
    rec = pycolmap.Reconstruction()
    try:
        rec.read_binary(str(path)) if ext == ".bin" else rec.read_text(str(path))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot read COLMAP model {path}: {str(e).splitlines()[0]}") from None
    return rec


def capture_from_model(
    rec: pycolmap.Reconstruction, images: Path, masks: Path | None, info: dict
) -> Capture:
    """The registered images of a model as a `Capture` (images under `images/<name>`, masks
    under `masks/<name>.png` where present); checks every image file exists."""
    views = []
    for image in sorted(rec.images.values(), key=lambda im: im.name):
        if not image.has_pose:
            continue
        path = images / image.name
        if not path.is_file():
            raise UserError(f"missing image {path} (named by the COLMAP model)")
        cam = rec.cameras[image.camera_id]
        viewmat = np.eye(4)
        viewmat[:3, :4] = image.cam_from_world().matrix()
        mask = masks / f"{image.name}.png" if masks is not None else None
        views.append(
            PosedView(
                name=image.name,
                image=path,
                camera=camera(cam.model.name, cam.width, cam.height, list(cam.params)),
                viewmat=viewmat,
                mask=mask if mask is not None and mask.is_file() else None,
                upright=exif_orientation(path),
            )
        )
    points = [rec.points3D[i] for i in sorted(rec.points3D)]  # by id: a stable order
    xyz = np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], dtype=np.float64).reshape(-1, 3) / 255.0
    return Capture(views, xyz, rgb, info=info)


def plan(scene: Path, sc: ScenesConfig, verbose: bool = True) -> Job:
    """Read and check one workspace (the model and that its images exist; pixels are read when
    the scene is written)."""
    path = model_dir(scene)
    if path is None:
        raise UserError(f"{scene}: no COLMAP model (sparse/0/cameras.bin or .txt)")
    rec = read_model(path)
    images = scene / "images"
    if not images.is_dir():
        raise UserError(f"{scene}: no images/ folder beside the model {path}")
    registered = sum(im.has_pose for im in rec.images.values())
    if registered < 2:
        raise UserError(f"{path}: {registered} registered image(s); a scene needs at least 2")
    masks = scene / "masks"
    capture = capture_from_model(
        rec,
        images,
        masks if masks.is_dir() else None,
        {"source": "colmap", "model": str(path.resolve()), "registered": registered},
    )
    files = [f for f in path.iterdir() if f.is_file()] + [v.image for v in capture.views]
    return Job(scene.name, files, lambda work, verbose: capture)
