"""Gaussian splatting renderer with gsplat's API: gsplat on CUDA, our own exact CPU rasteriser."""

from ._rasterization import rasterization
from ._sh import spherical_harmonics

__all__ = ["rasterization", "spherical_harmonics"]
