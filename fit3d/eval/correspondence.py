"""Zero-shot multiview correspondence (Probe3D protocol, REFERENCE.md section 4).

For a view pair (0, 1): dense features are bilinearly upsampled (align_corners=False) to 1/4 of
the image resolution and L2-normalised; every view-0 grid pixel with valid depth is matched to its
nearest view-1 grid pixel by cosine similarity; each match is weighted by 1 - d1/d2 (d1, d2 = the
distances to the nearest and second nearest neighbour, L2 on unit vectors; the ranking is the same
for squared distances) and the 1000 best are kept. The error of a match is the distance, in
full-resolution pixels of view 1, between the matched pixel and the ground-truth reprojection of
the view-0 pixel through its depth and the relative pose.

Pixel convention: pixel (x, y) of an image (integer indices) has its centre at (x + 0.5, y + 0.5)
in the coordinates of K (COLMAP / gsplat, as `fit3d.scenes` returns it). Grid pixel (r, c) of a
1/4 grid sits at the full-resolution pixel nearest to its centre, `round((c + 0.5) * W / w - 0.5)`,
and its depth is read there (no interpolation across depth edges).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.eval.metrics import ROTATION_BINS, rotation_angle


def grid_pixels(height: int, width: int, stride: int = 4) -> Tensor:
    """Full-resolution integer pixel coordinates [h*w, 2] (x, y) of the 1/stride grid, row-major."""
    h, w = max(height // stride, 1), max(width // stride, 1)
    ys = ((torch.arange(h) + 0.5) * height / h - 0.5).round().long().clamp(0, height - 1)
    xs = ((torch.arange(w) + 0.5) * width / w - 0.5).round().long().clamp(0, width - 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def dense_unit_features(feat: Tensor, height: int, width: int, stride: int = 4) -> Tensor:
    """Token map [C, h, w] -> unit features [h4*w4, C] on the 1/stride grid of an HxW image."""
    size = (max(height // stride, 1), max(width // stride, 1))
    up = F.interpolate(feat[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return F.normalize(up.flatten(1).T, dim=1)


def ratio_matches(f0: Tensor, f1: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Nearest neighbour in f1 [N1, C] of every row of f0 [N0, C] (unit vectors).

    Returns (index [N0] into f1, weight [N0] = 1 - d1/d2).
    """
    idx, weight = [], []
    for start in range(0, f0.shape[0], chunk):
        sim = f0[start : start + chunk] @ f1.T  # [n, N1]
        top = sim.topk(min(2, f1.shape[0]), dim=1)
        dist = (2 - 2 * top.values).clamp_min(0).sqrt()  # [n, 2]
        d2 = dist[:, -1]
        ratio = torch.where(d2 > 0, dist[:, 0] / d2.clamp_min(1e-12), torch.ones_like(d2))
        idx.append(top.indices[:, 0])
        weight.append(1 - ratio)
    return torch.cat(idx), torch.cat(weight)


def reproject(
    xy0: Tensor, depth0: Tensor, K0: Tensor, K1: Tensor, viewmat0: Tensor, viewmat1: Tensor
) -> tuple[Tensor, Tensor]:
    """Project view-0 pixels xy0 [N, 2] (pixel indices) at depth depth0 [N] into view 1.

    K0, K1: [3, 3] (pixel centres at +0.5); viewmat0, viewmat1: [4, 4] world-to-camera (OpenCV).
    Returns (xy1 [N, 2] in view-1 pixel indices, z1 [N]: depth in view 1).
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


def relative_rotation(viewmat0: Tensor, viewmat1: Tensor) -> float:
    """Angle in degrees of the rotation between two world-to-camera poses [4, 4]."""
    rel = viewmat1[:3, :3].double() @ viewmat0[:3, :3].double().T
    return float(rotation_angle(rel))


def pair_errors(
    feat0: Tensor,
    feat1: Tensor,
    depth0: Tensor,
    K0: Tensor,
    K1: Tensor,
    viewmat0: Tensor,
    viewmat1: Tensor,
    size1: tuple[int, int],
    top_k: int = 1000,
    stride: int = 4,
) -> Tensor:
    """Reprojection errors [M <= top_k] (pixels of view 1) of the best-weighted feature matches.

    feat0, feat1: token maps [C, h, w]; depth0: [H0, W0] metres (0 = invalid); size1: (H1, W1).
    """
    h0, w0 = depth0.shape
    h1, w1 = size1
    xy0 = grid_pixels(h0, w0, stride)  # [N0, 2]
    xy1_grid = grid_pixels(h1, w1, stride)  # [N1, 2]
    d0 = depth0[xy0[:, 1], xy0[:, 0]]  # [N0]
    valid = d0 > 0
    if not valid.any():
        return torch.zeros(0, dtype=torch.float64)
    f0 = dense_unit_features(feat0, h0, w0, stride)[valid]
    f1 = dense_unit_features(feat1, h1, w1, stride)
    idx, weight = ratio_matches(f0, f1)
    keep = weight.topk(min(top_k, weight.numel())).indices
    gt_xy1, _ = reproject(xy0[valid][keep], d0[valid][keep], K0, K1, viewmat0, viewmat1)
    return (xy1_grid[idx[keep]].double() - gt_xy1).norm(dim=1)


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
    """Fraction of view-0 valid grid pixels seen in view 1 (inside the image, depth agrees)."""
    h0, w0 = depth0.shape
    h1, w1 = depth1.shape
    xy0 = grid_pixels(h0, w0, stride)
    d0 = depth0[xy0[:, 1], xy0[:, 0]]
    valid = d0 > 0
    if not valid.any():
        return 0.0
    xy1, z1 = reproject(xy0[valid], d0[valid], K0, K1, viewmat0, viewmat1)
    px = xy1.round().long()
    inside = (z1 > 0) & (px[:, 0] >= 0) & (px[:, 0] < w1) & (px[:, 1] >= 0) & (px[:, 1] < h1)
    seen = torch.zeros_like(inside)
    p = px[inside]
    d1 = depth1[p[:, 1], p[:, 0]].double()
    seen[inside] = (d1 > 0) & ((d1 - z1[inside]).abs() < rel_tol * z1[inside])
    return float(seen.double().mean())


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
            b = next(k for k, (lo, hi) in enumerate(ROTATION_BINS) if rot < hi or hi >= 180)
            bins[b].append((i, j, rot))
    gen = torch.Generator().manual_seed(seed)
    queues = [[c[k] for k in torch.randperm(len(c), generator=gen).tolist()] for c in bins]
    out: list[tuple[int, int, float]] = []
    while len(out) < num_pairs and any(queues):
        for q in queues:
            if q and len(out) < num_pairs:
                out.append(q.pop())
    return out
