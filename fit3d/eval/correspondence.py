"""Zero-shot multiview correspondence (Probe3D's protocol).

docs/method.md, "Evaluation: 3D-awareness probes (Probe3D)".

For a view pair (0, 1): dense features are bilinearly upsampled (align_corners=False) to 1/4 of
the image resolution and L2-normalised; every view-0 grid pixel with valid depth is matched to its
nearest view-1 grid pixel by cosine similarity; each match is weighted by 1 - d1/d2 (d1, d2 = the
distances to the nearest and second nearest neighbour, L2 on unit vectors; the ranking is the same
for squared distances) and the 1000 best are kept. The error of a match is the distance, in
full-resolution pixels of view 1, between the matched pixel and the ground-truth reprojection of
the view-0 pixel through its depth and the relative pose.

Grid pixel (r, c) of the 1/4 grid sits at the full-resolution pixel nearest to its centre
(`fit3d.geometry.grid_pixels`) and its depth is read there (no interpolation across depth edges).
Reprojection and pixel conventions: `fit3d.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.geometry import grid_pixels, reproject


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
