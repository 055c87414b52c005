"""Feature pictures: several [C,H,W] maps projected on one shared PCA basis to RGB."""

from __future__ import annotations

import numpy as np
import torch


def pca_rgb(maps: list[torch.Tensor], max_samples: int = 20000, seed: int = 0) -> list[np.ndarray]:
    """Project each map [C,H,W] on the top-3 principal components of all maps' pixels together.

    One basis and one colour scale (1st-99th percentile per component) for all maps, so equal
    features get equal colours across pictures. Returns uint8 images [H,W,3].
    """
    flat = [m.detach().float().cpu().flatten(1).T for m in maps]  # each [HW, C]
    allpix = torch.cat(flat)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(allpix), generator=gen)[:max_samples]
    sample = allpix[pick]
    mean = sample.mean(0)
    _, _, v = torch.pca_lowrank(sample - mean, q=3, center=False)  # v [C, 3]
    proj = [(f - mean) @ v for f in flat]  # each [HW, 3]
    both = torch.cat(proj)
    lo = torch.quantile(both[pick], 0.01, dim=0)
    hi = torch.quantile(both[pick], 0.99, dim=0)
    out = []
    for p, m in zip(proj, maps, strict=True):
        img = ((p - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
        out.append((img.reshape(m.shape[1], m.shape[2], 3).numpy() * 255).round().astype(np.uint8))
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float in [0,1] -> uint8 array."""
    return (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
