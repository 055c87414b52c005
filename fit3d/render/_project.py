"""EWA projection of 3D Gaussians and 16-px tile binning in differentiable pure torch: the fallback
and float64 path of the CPU renderer, and the statement of the rules `_project.cpp` implements.

Rules follow gsplat's classic pinhole path: a Gaussian is culled when its camera depth is outside
[near, far], its blurred 2D covariance is not positive, its opacity is below 1/255, or its pixel
box misses the image. The 2D covariance gets `eps2d` added on the diagonal; the Jacobian uses the
camera-space x/z and y/z clamped to 1.3x the field of view; the pixel box half-size per axis is
`ceil(k * sqrt(cov2d_ii))` with `k = min(3.33, sqrt(2 ln(255 opacity)))`, which contains every pixel
where `opacity * G >= 1/255`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
TILE = 16


@dataclass
class Projected:
    """Visible (camera, Gaussian) entries, packed: M rows, all valid."""

    camera_ids: Tensor  # [M] int64
    gaussian_ids: Tensor  # [M] int64
    means2d: Tensor  # [M, 2] pixels (differentiable)
    conics: (
        Tensor  # [M, 3] inverse 2D covariance (a, b, c): sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2
    )
    depths: Tensor  # [M] camera z (differentiable)
    opacities: Tensor  # [M] (differentiable)
    radii: Tensor  # [M, 2] int32 pixel box half-sizes


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] wxyz (any norm) -> [..., 3, 3] rotation."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> Projected:
    """Project every Gaussian into every camera and keep the visible entries."""
    rot_w, t_w = viewmats[:, :3, :3], viewmats[:, :3, 3]  # [C, 3, 3], [C, 3]
    with torch.no_grad():
        z_all = torch.einsum("cj,nj->cn", rot_w[:, 2], means) + t_w[:, 2:3]  # [C, N]
        cam_ids, gids = torch.nonzero((z_all >= near_plane) & (z_all <= far_plane), as_tuple=True)
    rot, t, K = rot_w[cam_ids], t_w[cam_ids], Ks[cam_ids]  # [M, 3, 3], [M, 3], [M, 3, 3]
    mean_c = (rot @ means[gids, :, None])[..., 0] + t  # [M, 3]
    m = quat_to_rotmat(quats[gids]) * scales[gids, None, :]  # [M, 3, 3] = R S
    rm = rot @ m  # camera-space: cov_c = rm rm^T
    x, y, z = mean_c.unbind(-1)
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    # J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]; rows of J @ rm:
    j0 = (fx / z)[:, None] * rm[:, 0] - (fx * tx / (z * z))[:, None] * rm[:, 2]  # [M, 3]
    j1 = (fy / z)[:, None] * rm[:, 1] - (fy * ty / (z * z))[:, None] * rm[:, 2]  # [M, 3]
    ca = (j0 * j0).sum(-1) + eps2d
    cb = (j0 * j1).sum(-1)
    cc = (j1 * j1).sum(-1) + eps2d
    det = ca * cc - cb * cb
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # [M, 2]
    opac = opacities[gids]
    with torch.no_grad():
        ok = (det > 0) & (opac >= ALPHA_MIN)
        extend = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(3.33)
        rx = torch.ceil(extend * torch.sqrt(ca))
        ry = torch.ceil(extend * torch.sqrt(cc))
        mx, my = means2d.unbind(-1)
        ok &= (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        keep = torch.nonzero(ok)[:, 0]
        radii = torch.stack([rx, ry], -1)[keep].to(torch.int32)
    det_k = det[keep]
    conics = torch.stack([cc[keep] / det_k, -cb[keep] / det_k, ca[keep] / det_k], -1)
    return Projected(
        camera_ids=cam_ids[keep],
        gaussian_ids=gids[keep],
        means2d=means2d[keep],
        conics=conics,
        depths=z[keep],
        opacities=opac[keep],
        radii=radii,
    )


@dataclass
class Intersections:
    """(entry, tile) pairs sorted by global tile id, then depth (front to back)."""

    flatten_ids: Tensor  # [P] int64 rows into the Projected entries
    offsets: Tensor  # [C * tiles_y * tiles_x + 1] int64 start of each tile's run
    tiles_per_gauss: Tensor  # [M] int64
    tiles_x: int
    tiles_y: int


@torch.no_grad()
def intersect_tiles(proj: Projected, n_cams: int, width: int, height: int) -> Intersections:
    """Bin entries into the 16x16 tiles their pixel box touches, like gsplat's isect_tiles."""
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    centre = proj.means2d.detach() / TILE  # [M, 2]
    rad = proj.radii.to(centre.dtype) / TILE
    hi = torch.tensor([tiles_x, tiles_y], device=centre.device)
    tmin = torch.minimum(torch.floor(centre - rad).long().clamp_min(0), hi)  # [M, 2]
    tmax = torch.minimum(torch.ceil(centre + rad).long().clamp_min(0), hi)
    span = tmax - tmin  # [M, 2]
    counts = span[:, 0] * span[:, 1]  # [M]
    # entries in depth order so that a stable sort by tile keeps depth order inside a tile
    order = torch.argsort(proj.depths.detach(), stable=True)
    ent = torch.repeat_interleave(order, counts[order])  # [P]
    start = torch.cumsum(counts[order], 0) - counts[order]
    local = torch.arange(ent.numel(), device=ent.device) - torch.repeat_interleave(
        start, counts[order]
    )
    w = span[ent, 0]
    tile = (tmin[ent, 1] + local // w) * tiles_x + tmin[ent, 0] + local % w
    tile = tile + proj.camera_ids[ent] * (tiles_x * tiles_y)
    tile_sorted, perm = torch.sort(tile, stable=True)
    n_tiles = n_cams * tiles_x * tiles_y
    offsets = torch.zeros(n_tiles + 1, dtype=torch.long, device=ent.device)
    offsets[1:] = torch.cumsum(torch.bincount(tile_sorted, minlength=n_tiles), 0)
    return Intersections(ent[perm], offsets, counts, tiles_x, tiles_y)
