"""Per-scene Gaussian model for stage 1: initialisation, activation, rendering RGB + features.

Parameters live in a `torch.nn.ParameterDict` with gsplat's conventions so that
`gsplat.strategy.DefaultStrategy` can clone/split/prune them in place: `means [N,3]`,
`quats [N,4]` (wxyz, unnormalised), `scales [N,3]` (log), `opacities [N]` (logit), `sh0 [N,1,3]`,
`shN [N,K-1,3]` and `features [N,D]` (a parameter too, so densification carries it).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.spatial import cKDTree

from fit3d.geometry import camera_centres
from fit3d.render import rasterization, spherical_harmonics
from fit3d.targets import resample_taps

SH_C0 = 0.28209479177387814
"""Zeroth-order real SH basis constant: colour = SH_C0 * dc + 0.5."""


def scene_extent(viewmats: torch.Tensor) -> float:
    """1.1 x the largest distance of a camera centre from the mean centre (3DGS); >= 1e-3."""
    centres = camera_centres(viewmats)  # [C, 3]
    radius = (centres - centres.mean(0)).norm(dim=-1).max().item()
    return max(1.1 * radius, 1e-3)


def frustum_points(
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    sizes: list[tuple[int, int]],
    n: int,
    extent: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """`n` random points [n,3] in the union of the camera frusta, depth in [0.05, 1] x extent.

    The fallback initialisation for scenes without sparse points: each point picks a camera, a
    uniform pixel and a uniform depth, and is back-projected to world space.
    """
    cams = torch.randint(len(viewmats), (n,), generator=generator)
    uv = torch.rand(n, 2, generator=generator)
    wh = torch.tensor(sizes, dtype=torch.float32)[cams]  # [n, 2]
    depth = extent * (0.05 + 0.95 * torch.rand(n, generator=generator))
    pix = torch.cat([uv * wh, torch.ones(n, 1)], -1)  # [n, 3] homogeneous pixels
    rays = (torch.linalg.inv(Ks[cams]) @ pix[..., None])[..., 0]  # [n, 3], z = 1
    p_cam = rays * depth[:, None]
    c2w = torch.linalg.inv(viewmats[cams])  # [n, 4, 4]
    return (c2w[:, :3, :3] @ p_cam[..., None])[..., 0] + c2w[:, :3, 3]


def knn_log_scales(xyz: torch.Tensor) -> torch.Tensor:
    """log of the mean distance to the 3 nearest neighbours, per point, repeated on xyz: [N,3]."""
    pts = xyz.double().numpy()
    k = min(4, len(pts))
    if k < 2:
        return torch.full((len(pts), 3), math.log(0.01))
    dist, _ = cKDTree(pts).query(pts, k=k)  # [N, k], column 0 is the point itself
    mean = np.maximum(dist[:, 1:].mean(1), 1e-7)
    return torch.from_numpy(np.log(mean)).float()[:, None].repeat(1, 3)


def init_params(
    xyz: torch.Tensor,
    rgb: torch.Tensor,
    feature_dim: int,
    sh_degree: int,
    init_opacity: float,
) -> torch.nn.ParameterDict:
    """Gaussians at points xyz [N,3] with colours rgb [N,3] in [0,1] (docs/method.md, "Stage 1:
    lifting").

    Identity rotations, log-scales from 3-NN distances, opacity logit(init_opacity), SH DC from the
    colour with higher orders 0, features 0.
    """
    n = len(xyz)
    n_sh = (sh_degree + 1) ** 2
    sh0 = ((rgb - 0.5) / SH_C0)[:, None, :]  # [N, 1, 3]
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    logit = math.log(init_opacity / (1.0 - init_opacity))
    return torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter(xyz.float().clone()),
            "quats": torch.nn.Parameter(quats),
            "scales": torch.nn.Parameter(knn_log_scales(xyz)),
            "opacities": torch.nn.Parameter(torch.full((n,), logit)),
            "sh0": torch.nn.Parameter(sh0.float().clone()),
            "shN": torch.nn.Parameter(torch.zeros(n, n_sh - 1, 3)),
            "features": torch.nn.Parameter(torch.zeros(n, feature_dim)),
        }
    )


def initial_points(
    points: tuple[torch.Tensor, torch.Tensor],
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    sizes: list[tuple[int, int]],
    max_points: int,
    fallback_points: int,
    generator: torch.Generator,
    scene_id: str = "",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Sparse points (randomly capped at `max_points`, 0 = all) or, when there are none, the
    documented fallback: `fallback_points` random points in the frusta, grey, with a warning.

    Returns xyz [N,3], rgb [N,3], and "sparse" or "random-frusta".
    """
    xyz, rgb = points
    if len(xyz) > 0:
        if 0 < max_points < len(xyz):
            keep = torch.randperm(len(xyz), generator=generator)[:max_points]
            xyz, rgb = xyz[keep], rgb[keep]
        return xyz.float(), rgb.float(), "sparse"
    warnings.warn(
        f"scene {scene_id}: no sparse points; initialising {fallback_points} random Gaussians "
        "in the train-view frusta (depth 0.05..1 x scene extent, grey)",
        stacklevel=2,
    )
    extent = scene_extent(viewmats)
    xyz = frustum_points(viewmats, Ks, sizes, fallback_points, extent, generator)
    return xyz, torch.full_like(xyz, 0.5), "random-frusta"


def activated(params: torch.nn.ParameterDict) -> dict[str, torch.Tensor]:
    """Detached activated tensors in the stage-1 output format (see fit3d.gaussians)."""
    with torch.no_grad():
        return {
            "means": params["means"].detach().clone(),
            "quats": torch.nn.functional.normalize(params["quats"].detach(), dim=-1),
            "scales": params["scales"].detach().exp(),
            "opacities": params["opacities"].detach().sigmoid(),
            "sh": torch.cat([params["sh0"], params["shN"]], 1).detach().clone(),
            "features": params["features"].detach().clone(),
        }


def render(
    params: torch.nn.ParameterDict,
    viewmat: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    sh_degree: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Render one view in one pass: RGB from SH colours and the D feature channels.

    Only the RGB channels send gradient to geometry (`geometry_grad_channels=3`), so the feature
    loss reaches features and decoder only (docs/method.md, "Stage 1: lifting"). Uncovered
    pixels are 0.
    Returns rgb [H,W,3], features [D,H,W], alpha [H,W,1], info.
    """
    means = params["means"]
    sh = torch.cat([params["sh0"], params["shN"]], 1)  # [N, K, 3]
    dirs = means - camera_centres(viewmat[None])[0]  # [N, 3]
    n_sh = (sh_degree + 1) ** 2
    rgb = torch.clamp_min(spherical_harmonics(sh_degree, dirs, sh[:, :n_sh]) + 0.5, 0.0)
    colors = torch.cat([rgb, params["features"]], -1)  # [N, 3 + D]
    out, alpha, info = rasterization(
        means,
        params["quats"],
        params["scales"].exp(),
        params["opacities"].sigmoid(),
        colors,
        viewmat[None],
        K[None],
        width,
        height,
        backend=backend,
        geometry_grad_channels=3,
    )
    return out[0, ..., :3], out[0, ..., 3:].permute(2, 0, 1), alpha[0], info


def feature_pixels(height: int, width: int, fraction: float, seed: int) -> torch.Tensor | None:
    """The pixels (flat indices [P], sorted) where one step's feature loss is evaluated:
    `round(fraction x H x W)` distinct pixels drawn uniformly with `seed`; None when fraction >= 1
    (every pixel). Stateless, so a resumed run draws the same pixels."""
    if fraction >= 1.0:
        return None
    n = height * width
    gen = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * n))
    return torch.randperm(n, generator=gen)[:count].sort().values


def decode_at(feat: torch.Tensor, weight: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The decoder `Conv2d(D, C, 3, padding=1, bias=False)` evaluated at some pixels only:
    exactly `conv2d(feat[None], weight, padding=1)[0].flatten(1)[:, pixels]`.

    feat: [D, H, W]; weight: [C, D, 3, 3]; pixels: [P] flat indices (y * W + x). Returns [C, P].
    The 3x3 windows are gathered as whole D-channel rows of the pixel-major padded map (a row
    gather and, backwards, a row scatter-add: ~10x faster on a CPU than gathering along D's
    stride).
    """
    d, h, w = feat.shape
    rows = torch.nn.functional.pad(feat.permute(1, 2, 0), (0, 0, 1, 1, 1, 1))  # [H+2, W+2, D]
    y, x = pixels.div(w, rounding_mode="floor"), pixels.remainder(w)
    corner = y * (w + 2) + x  # [P] the 3x3 window's top-left in padded coordinates
    taps = torch.tensor([u * (w + 2) + v for u in range(3) for v in range(3)], device=feat.device)
    index = (corner[:, None] + taps[None, :]).reshape(-1)  # [P * 9], tap k = 3u + v
    cols = rows.reshape(-1, d).index_select(0, index).reshape(len(pixels), 9 * d)  # [P, 9D]
    mat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * d)  # [C, 9D], (tap, channel)
    return (cols @ mat.T).T  # [C, P]


def upsample_at(
    tokens: torch.Tensor, height: int, width: int, pixels: torch.Tensor
) -> torch.Tensor:
    """`fit3d.losses.upsample(tokens, height, width)` (bilinear, align_corners=False) at some
    pixels only. tokens: [C, h, w]; pixels: [P] flat indices. Returns [C, P] float32."""
    _, h, w = tokens.shape
    iy, wy = resample_taps(h, height)  # [H, 2]
    ix, wx = resample_taps(w, width)  # [W, 2]
    y, x = pixels.div(width, rounding_mode="floor").cpu(), pixels.remainder(width).cpu()
    flat = tokens.float().reshape(tokens.shape[0], -1).T.contiguous()  # [h * w, C]
    out = torch.zeros(len(pixels), tokens.shape[0], device=tokens.device)  # [P, C]
    for a in range(2):
        for b in range(2):
            src = (iy[y, a] * w + ix[x, b]).to(tokens.device)  # [P]
            wt = (wy[y, a] * wx[x, b]).to(tokens.device)  # [P]
            out += flat.index_select(0, src) * wt[:, None]
    return out.T
