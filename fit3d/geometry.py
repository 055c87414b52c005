"""Camera geometry shared by every stage: camera centres, reprojection through depth, grid pixels,
covisibility and view-pair selection.

Conventions (docs/method.md, "Conventions"): viewmats are world-to-camera [4, 4] with OpenCV axes;
K [3, 3] puts pixel (x, y)'s centre at (x + 0.5, y + 0.5); depth is along the optical axis, 0 =
invalid. Pixel coordinates below are integer pixel indices (x, y) unless stated.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

ROTATION_BINS = ((0.0, 15.0), (15.0, 30.0), (30.0, 60.0), (60.0, 180.0))
"""Relative-rotation bins (degrees) of view pairs (Probe3D's correspondence bins)."""


def camera_centres(viewmats: Tensor) -> Tensor:
    """World-space camera centres [C, 3] of world-to-camera matrices [C, 4, 4]."""
    rot, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -(rot.transpose(1, 2) @ t[..., None])[..., 0]


def opengl_to_opencv(c2w: ArrayT) -> ArrayT:
    """Camera-to-world [..., 4, 4] with OpenGL camera axes (x right, y up, z back: nerfstudio,
    instant-ngp, NeRF) -> the same cameras with OpenCV axes (x right, y down, z forward), and back
    (it is its own inverse): the camera's y and z axes (columns 1 and 2) are negated. A numpy
    array in gives a float64 copy, a tensor a copy of its dtype."""
    out = c2w.clone() if isinstance(c2w, Tensor) else np.array(c2w, dtype=np.float64)
    out[..., :3, 1:3] *= -1
    return out


def rotation_angle(rel: Tensor) -> Tensor:
    """Rotation angle in degrees of rotation matrices [..., 3, 3]."""
    tr = rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2]
    return torch.rad2deg(torch.acos(((tr - 1) / 2).clamp(-1.0, 1.0)))


def relative_rotation(viewmat0: Tensor, viewmat1: Tensor) -> float:
    """Angle in degrees of the rotation between two world-to-camera poses [4, 4]."""
    rel = viewmat1[:3, :3].double() @ viewmat0[:3, :3].double().T
    return float(rotation_angle(rel))


def rotation_bin(degrees: float) -> int:
    """Index into `ROTATION_BINS` of a relative rotation (the last bin is closed at 180)."""
    return next(k for k, (_, hi) in enumerate(ROTATION_BINS) if degrees < hi or hi >= 180)


def grid_pixels(height: int, width: int, stride: int = 4) -> Tensor:
    """Integer pixel coordinates [h*w, 2] (x, y), row-major, of the centres of a coarse grid of
    h = height // stride by w = width // stride cells laid over an H x W image (each cell's centre
    rounded to the nearest pixel). With stride = patch size these are a ViT's token centres."""
    h, w = max(height // stride, 1), max(width // stride, 1)
    ys = ((torch.arange(h) + 0.5) * height / h - 0.5).round().long().clamp(0, height - 1)
    xs = ((torch.arange(w) + 0.5) * width / w - 0.5).round().long().clamp(0, width - 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def reproject(
    xy0: Tensor, depth0: Tensor, K0: Tensor, K1: Tensor, viewmat0: Tensor, viewmat1: Tensor
) -> tuple[Tensor, Tensor]:
    """Project view-0 pixels xy0 [N, 2] (pixel indices) at depth depth0 [N] into view 1.

    K0, K1: [3, 3]; viewmat0, viewmat1: [4, 4] world-to-camera. Returns (xy1 [N, 2] in view-1
    pixel-index coordinates (float64), z1 [N]: depth in view 1).
    """
    xy0, depth0 = xy0.double() + 0.5, depth0.double()
    ones = torch.ones_like(depth0)
    rays = torch.linalg.solve(K0.double(), torch.stack([xy0[:, 0], xy0[:, 1], ones]))  # [3, N]
    cam0 = rays * depth0  # [3, N]
    rel = viewmat1.double() @ torch.linalg.inv(viewmat0.double())  # [4, 4] cam0 -> cam1
    cam1 = rel[:3, :3] @ cam0 + rel[:3, 3:]  # [3, N]
    z1 = cam1[2]
    proj = K1.double() @ cam1  # [3, N]
    xy1 = (proj[:2] / proj[2:].clamp_min(1e-9)).T - 0.5
    return xy1, z1


def visible(xy1: Tensor, z1: Tensor, depth1: Tensor, rel_tol: float = 0.05) -> Tensor:
    """Which reprojected points view 1 sees [N] bool: in front of it, inside the image (nearest
    pixel), and its depth map depth1 [H, W] agrees with z1 within `rel_tol` (not occluded).

    xy1: [N, 2] view-1 pixel coordinates and z1: [N] depths, as `reproject` returns them.
    """
    h1, w1 = depth1.shape
    px = xy1.round().long()
    inside = (z1 > 0) & (px[:, 0] >= 0) & (px[:, 0] < w1) & (px[:, 1] >= 0) & (px[:, 1] < h1)
    seen = torch.zeros_like(inside)
    p = px[inside]
    d1 = depth1[p[:, 1], p[:, 0]].double()
    seen[inside] = (d1 > 0) & ((d1 - z1[inside]).abs() < rel_tol * z1[inside])
    return seen


def covisibility(
    depth0: Tensor,
    depth1: Tensor,
    K0: Tensor,
    K1: Tensor,
    viewmat0: Tensor,
    viewmat1: Tensor,
    stride: int = 8,
    rel_tol: float = 0.05,
) -> float:
    """Fraction of view-0 valid grid pixels (1/stride grid) that view 1 sees (`visible`)."""
    h0, w0 = depth0.shape
    xy0 = grid_pixels(h0, w0, stride)
    d0 = depth0[xy0[:, 1], xy0[:, 0]]
    valid = d0 > 0
    if not valid.any():
        return 0.0
    xy1, z1 = reproject(xy0[valid], d0[valid], K0, K1, viewmat0, viewmat1)
    return float(visible(xy1, z1, depth1, rel_tol).double().mean())


def select_pairs(
    depths: list[Tensor],
    Ks: list[Tensor],
    viewmats: list[Tensor],
    num_pairs: int,
    min_overlap: float = 0.3,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """Up to num_pairs view pairs (i, j, rotation deg) with covisibility >= min_overlap.

    Pairs are drawn at random (seeded) round-robin across the rotation bins, so every bin that has
    candidates is represented.
    """
    bins: list[list[tuple[int, int, float]]] = [[] for _ in ROTATION_BINS]
    n = len(depths)
    for i in range(n):
        for j in range(i + 1, n):
            ov = covisibility(depths[i], depths[j], Ks[i], Ks[j], viewmats[i], viewmats[j])
            if ov < min_overlap:
                continue
            rot = relative_rotation(viewmats[i], viewmats[j])
            bins[rotation_bin(rot)].append((i, j, rot))
    gen = torch.Generator().manual_seed(seed)
    queues = [[c[k] for k in torch.randperm(len(c), generator=gen).tolist()] for c in bins]
    out: list[tuple[int, int, float]] = []
    while len(out) < num_pairs and any(queues):
        for q in queues:
            if q and len(out) < num_pairs:
                out.append(q.pop())
    return out
