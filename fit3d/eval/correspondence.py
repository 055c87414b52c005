"""Zero-shot multiview correspondence, computed as Probe3D computes it.

docs/method.md, "Evaluation: 3D-awareness probes (Probe3D)". For a view pair (0, 1):
- both depth maps go to 1/4 resolution by nearest-neighbour resizing (`F.interpolate`, scale
  0.25: pixel (i, j) of the small map is pixel (4i, 4j) of the full one) and both intrinsics are
  scaled by 1/4 (K[:2] *= 0.25), so pixel centres stay at +0.5 (docs/method.md "Conventions");
- every 1/4-resolution pixel with depth > 0, in either view, is a 3D point; its feature is the
  token map bilinearly resampled (align_corners=False) at its pixel centre, L2-normalised;
- each view-0 point is matched to the view-1 point of highest cosine similarity, weighted by
  1 - d1/d2 with d = 1 - cosine to the nearest and second nearest view-1 point, and the
  `top_k` (1000) best-weighted matches are kept;
- a match's error is the distance, in pixels of the 1/4-resolution image, between the view-0
  point projected into view 1 (relative pose, scaled K1) and the matched view-1 pixel centre.
Recall is then taken at 5, 10 and 20 of those pixels (`fit3d.eval.metrics.correspondence_recall`),
so Probe3D's "10 px" is 40 full-resolution pixels. No visibility test is made: an occluded view-0
point counts as Probe3D counts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.geometry import reproject

SCALE = 0.25
"""Probe3D's correspondence resolution (a quarter of the image)."""


def quarter(depth: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """depth [H, W] -> ([H//4, W//4] nearest-resized depth, K [3, 3] with rows 0, 1 x 0.25)."""
    small = F.interpolate(depth[None, None].float(), scale_factor=SCALE, mode="nearest")[0, 0]
    Kq = K.double().clone()
    Kq[:2] *= SCALE
    return small, Kq


def unit_features(feat: Tensor, size: tuple[int, int]) -> Tensor:
    """Token map [C, h, w] -> L2-normalised features [H4*W4, C] at the pixel centres of an
    H4 x W4 image (bilinear, align_corners=False), row-major."""
    up = F.interpolate(feat[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return F.normalize(up.flatten(1).T, dim=1)


def ratio_matches(f0: Tensor, f1: Tensor, max_elems: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Nearest neighbour in f1 [N1, C] of every row of f0 [N0, C] (unit vectors) by cosine.

    Returns (index [N0] into f1, weight [N0] = 1 - d1/d2, d = 1 - cosine clamped at 1e-9).
    """
    chunk = max(max_elems // max(f1.shape[0], 1), 1)
    idx, weight = [], []
    for start in range(0, f0.shape[0], chunk):
        sim = f0[start : start + chunk] @ f1.T  # [n, N1]
        top = sim.topk(min(2, f1.shape[0]), dim=1)
        dist = (1 - top.values).clamp_min(1e-9)  # [n, 1 or 2]
        ratio = dist[:, 0] / dist[:, -1] if dist.shape[1] == 2 else torch.ones_like(dist[:, 0])
        idx.append(top.indices[:, 0])
        weight.append(1 - ratio)
    return torch.cat(idx), torch.cat(weight)


def pair_errors(
    feat0: Tensor,
    feat1: Tensor,
    depth0: Tensor,
    depth1: Tensor,
    K0: Tensor,
    K1: Tensor,
    viewmat0: Tensor,
    viewmat1: Tensor,
    top_k: int = 1000,
) -> Tensor:
    """Errors [M <= top_k] of the best-weighted matches, in 1/4-resolution pixels of view 1.

    feat0, feat1: token maps [C, h, w]; depth0, depth1: [H, W] metres (0 = invalid) at full
    resolution; K0, K1: [3, 3] full-resolution intrinsics; viewmat0, viewmat1: [4, 4]
    world-to-camera.
    """
    d0, K0q = quarter(depth0, K0)
    d1, K1q = quarter(depth1, K1)
    v0, v1 = d0.flatten() > 0, d1.flatten() > 0
    if not v0.any() or not v1.any():
        return torch.zeros(0, dtype=torch.float64)
    f0 = unit_features(feat0, tuple(d0.shape))[v0]
    f1 = unit_features(feat1, tuple(d1.shape))[v1]
    idx, weight = ratio_matches(f0, f1)
    keep = weight.topk(min(top_k, weight.numel())).indices
    w0, w1 = d0.shape[1], d1.shape[1]
    pix0 = v0.nonzero()[:, 0][keep]  # flat indices into the 1/4 map of view 0
    pix1 = v1.nonzero()[:, 0][idx[keep]]
    xy0 = torch.stack([pix0 % w0, pix0 // w0], 1)  # [M, 2] pixel indices (x, y)
    xy1 = torch.stack([pix1 % w1, pix1 // w1], 1).double()
    gt_xy1, _ = reproject(xy0, d0.flatten()[pix0], K0q, K1q, viewmat0, viewmat1)
    return (gt_xy1 - xy1).norm(dim=1)
