"""Independent brute-force 3DGS renderer for tests: every Gaussian at every pixel, no tiles.

Written from the rules (gsplat classic mode), not from fit3d.render: full 3x3 matrix algebra,
a generic quaternion-to-matrix formula, `torch.linalg.inv` for the conic, a per-camera depth sort
and a Python loop compositing one Gaussian at a time. Differentiable by autograd. Slow by design.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotation(q: Tensor) -> Tensor:
    """R = (w^2 - v.v) I + 2 v v^T + 2 w [v]_x for the unit quaternion (w, v)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, v = q[..., :1], q[..., 1:]
    eye = torch.eye(3, dtype=q.dtype)
    vx = torch.stack(
        [
            torch.stack([0 * w[..., 0], -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], 0 * w[..., 0], -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], 0 * w[..., 0]], -1),
        ],
        -2,
    )
    vv = (v * v).sum(-1)[..., None, None]
    return (
        (w[..., None] ** 2 - vv) * eye
        + 2 * v[..., :, None] * v[..., None, :]
        + 2 * w[..., None] * vx
    )


def render_one(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D]
    viewmat: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor]:
    """One camera -> (colours [H, W, D], alpha [H, W, 1], accumulated depth [H, W, 1])."""
    dt = means.dtype
    W, t = viewmat[:3, :3], viewmat[:3, 3]
    p_cam = means @ W.T + t  # [N, 3]
    R = _rotation(quats)
    S = torch.diag_embed(scales)
    cov = R @ S @ S @ R.transpose(-1, -2)  # [N, 3, 3]
    cov_c = W @ cov @ W.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dt) + 0.5, torch.arange(width, dtype=dt) + 0.5, indexing="ij"
    )
    out = torch.zeros(height, width, colors.shape[1], dtype=dt)
    depth = torch.zeros(height, width, dtype=dt)
    T = torch.ones(height, width, dtype=dt)
    done = torch.zeros(height, width, dtype=torch.bool)
    order = torch.argsort(p_cam[:, 2].detach(), stable=True)
    for i in order.tolist():
        x, y, z = p_cam[i]
        if not (near <= float(z.detach()) <= far) or float(opacities[i].detach()) < 1 / 255:
            continue
        # Jacobian with the view direction clamped to 1.3x the field of view (gsplat)
        lim_xp = (width - cx) / fx + 0.15 * width / fx
        lim_xn = cx / fx + 0.15 * width / fx
        lim_yp = (height - cy) / fy + 0.15 * height / fy
        lim_yn = cy / fy + 0.15 * height / fy
        u = torch.clamp(x / z, -lim_xn, lim_xp)
        v = torch.clamp(y / z, -lim_yn, lim_yp)
        zero = 0 * z
        J = torch.stack(
            [torch.stack([fx / z, zero, -fx * u / z]), torch.stack([zero, fy / z, -fy * v / z])]
        )
        cov2 = J @ cov_c[i] @ J.T + eps2d * torch.eye(2, dtype=dt)
        if float(torch.linalg.det(cov2.detach())) <= 0:
            continue
        P = torch.linalg.inv(cov2)
        mx, my = fx * x / z + cx, fy * y / z + cy
        dx, dy = mx - xs, my - ys
        sigma = 0.5 * (P[0, 0] * dx * dx + P[1, 1] * dy * dy) + 0.5 * (P[0, 1] + P[1, 0]) * dx * dy
        alpha = torch.clamp(opacities[i] * torch.exp(-sigma), max=0.999)
        use = (alpha >= 1 / 255) & (sigma >= 0) & ~done
        t_next = T * (1 - alpha)
        stop = use & (t_next <= 1e-4)
        use = use & ~stop
        done = done | stop
        w = torch.where(use, alpha * T, torch.zeros_like(T))
        out = out + w[..., None] * colors[i]
        depth = depth + w * z
        T = torch.where(use, t_next, T)
    return out, (1 - T)[..., None], depth[..., None]
