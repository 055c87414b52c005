"""Pictures of features and images: one PCA-to-RGB for every feature picture of every stage.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`), which needs no
backend selection and has no import-time side effects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from fit3d.io import atomic_path


def pca_rgb(
    maps: list[torch.Tensor], max_samples: int = 20000, seed: int = 0
) -> list[torch.Tensor]:
    """Feature maps [C, H, W] -> RGB maps [H, W, 3] in [0, 1] through one shared 3-component PCA.

    The basis and the colour range (1st-99th percentile per component) are fitted on the pixels of
    all maps together (a seeded sample of at most `max_samples` of them), so equal features get
    equal colours across pictures; the same maps always give the same colours. Fewer than 3
    channels are padded with zero components.
    """
    flat = [m.detach().float().cpu().flatten(1).T for m in maps]  # each [HW, C]
    allpix = torch.cat(flat)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(allpix), generator=gen)[:max_samples]
    sample = allpix[pick]
    mean = sample.mean(0)
    q = min(3, allpix.shape[1])
    with torch.random.fork_rng(devices=[]):  # pca_lowrank is randomised: seed it, leave global RNG
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(sample - mean, q=q, center=False)  # v [C, q]
    proj = [F.pad((f - mean) @ v, (0, 3 - q)) for f in flat]  # each [HW, 3]
    fitted = torch.cat(proj)[pick]
    lo, hi = torch.quantile(fitted, 0.01, dim=0), torch.quantile(fitted, 0.99, dim=0)
    return [
        ((p - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1).reshape(m.shape[1], m.shape[2], 3)
        for p, m in zip(proj, maps, strict=True)
    ]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8 array."""
    return (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
