"""Real spherical harmonics up to degree 3 in gsplat's sign convention (Condon-Shortley phase kept).

Basis order per degree l is m = -l..l; e.g. degree 1 is (-c y, c z, -c x) with c = sqrt(3 / 4pi).
"""

from __future__ import annotations

import torch
from torch import Tensor

_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))
_C1 = 0.4886025119029199  # sqrt(3 / 4pi)
_C2 = (1.0925484305920792, 0.31539156525252005, 0.5462742152960396)
_C3 = (
    0.5900435899266435,
    2.890611442640554,
    0.4570457994644658,
    0.3731763325901154,
    1.445305721320277,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Basis values at `dirs` [..., 3] (normalised here) -> [..., (degree + 1) ** 2]."""
    out = [torch.full_like(dirs[..., 0], _C0)]
    if degree >= 1:
        x, y, z = torch.nn.functional.normalize(dirs, dim=-1).unbind(-1)
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _C2[0] * x * y,
            -_C2[0] * y * z,
            _C2[1] * (3.0 * zz - 1.0),
            -_C2[0] * x * z,
            _C2[2] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            -_C3[0] * y * (3.0 * xx - yy),
            _C3[1] * x * y * z,
            -_C3[2] * y * (5.0 * zz - 1.0),
            _C3[3] * z * (5.0 * zz - 3.0),
            -_C3[2] * x * (5.0 * zz - 1.0),
            _C3[4] * z * (xx - yy),
            -_C3[0] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, -1)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate SH colours like `gsplat.spherical_harmonics`.

    degree: bands to use (0..3), needs `(degree + 1) ** 2 <= K`.
    dirs: [..., 3] view directions (Gaussian centre minus camera centre; need not be unit).
    coeffs: [..., K, 3] coefficients.
    Returns [..., 3] raw values (`rasterization` adds 0.5 and clamps at 0, as gsplat does).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in 0..3, got {degree}")
    n_bases = (degree + 1) ** 2
    if coeffs.shape[-2] < n_bases:
        raise ValueError(f"sh degree {degree} needs {n_bases} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, dirs)  # [..., n_bases]
    return (basis[..., None] * coeffs[..., :n_bases, :]).sum(-2)
