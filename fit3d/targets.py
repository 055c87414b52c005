"""Stage-2 targets: decoded features rendered from a lifted scene, at the backbone's token grid.

docs/method.md, "Stage 2: fine-tuning": render the scene's D-channel features for a view (no grad),
decode them with the scene's `Conv2d(D, C, 3, padding=1)` at image resolution, then bilinearly
downsample (align_corners=False, no antialias) to the h x w token grid; the anonymisation mask is
resized the same way (a soft mask, as FiT3D does) and weights `fit3d.losses.masked_l1`.

Downsampling without antialias reads only 2 x 2 pixels per token, so `decode_to_tokens` evaluates
`downsample(conv(render))` exactly without running the convolution over the whole image: per
kernel offset it gathers the two source rows and columns of every token from the padded render
and mixes the D channels only there (at 876x584 and C=384 that skips ~110 GFLOP per view).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.gaussians import LiftedScene


@functools.lru_cache(maxsize=64)
def resample_taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """Two-tap form of 1D bilinear resizing n_in -> n_out (align_corners=False, no antialias).

    Returns (index [n_out, 2] long, weight [n_out, 2] float32) with
    `out[i] = sum_k weight[i, k] * in[index[i, k]]`, read off `F.interpolate` applied to the
    identity so the semantics are exactly PyTorch's.
    """
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # [1, n_in (channels), n_in (length)]
    mat = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T  # [n_out, n_in]
    # the two largest taps, the lower index first among equal ones (`topk` leaves ties unordered)
    weight, index = mat.sort(dim=1, descending=True, stable=True)
    weight, index = weight[:, : min(2, n_in)], index[:, : min(2, n_in)]
    if n_in == 1:
        index, weight = index.repeat(1, 2), torch.cat([weight, torch.zeros_like(weight)], 1)
    return index, weight.float()


def _gather_rows(x: Tensor, index: Tensor, weight: Tensor, dim: int) -> Tensor:
    """Two-tap gather along `dim`: out[.., i, ..] = sum_k w[i, k] * x[.., idx[i, k], ..]."""
    shape = [1] * x.ndim
    shape[dim] = -1
    a = x.index_select(dim, index[:, 0]) * weight[:, 0].view(shape)
    b = x.index_select(dim, index[:, 1]) * weight[:, 1].view(shape)
    return a + b


def decode_to_tokens(render: Tensor, weight: Tensor, grid: tuple[int, int]) -> Tensor:
    """Exactly `interpolate(conv2d(render, weight, padding=1), grid, bilinear)` without the
    full-resolution convolution.

    render: [B, D, H, W] rendered features; weight: [C, D, 3, 3] decoder; grid: (h, w).
    Returns [B, C, h, w].
    """
    _, _, H, W = render.shape
    h, w = grid
    iy, wy = (t.to(render.device) for t in resample_taps(H, h))  # [h, 2]
    ix, wx = (t.to(render.device) for t in resample_taps(W, w))  # [w, 2]
    wy, wx = wy.to(render.dtype), wx.to(render.dtype)
    padded = F.pad(render, (1, 1, 1, 1))  # [B, D, H+2, W+2]
    taps = []
    for u in range(3):  # conv output row y reads padded rows y + u
        rows = _gather_rows(padded, iy + u, wy, dim=2)  # [B, D, h, W+2]
        taps.append(torch.stack([_gather_rows(rows, ix + v, wx, dim=3) for v in range(3)], 2))
    z = torch.stack(taps, 2)  # [B, D, 3 (u), 3 (v), h, w]
    return torch.einsum("cduv,bduvhw->bchw", weight.to(render.dtype), z)


def mask_to_tokens(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Valid-pixel mask [B, H, W] (bool or float) -> soft mask [B, h, w] in [0, 1], bilinear."""
    m = mask.float()[:, None]  # [B, 1, H, W]
    return F.interpolate(m, size=grid, mode="bilinear", align_corners=False, antialias=False)[:, 0]


@torch.no_grad()
def render_token_target(
    scene: LiftedScene,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    grid: tuple[int, int],
    backend: str = "auto",
) -> Tensor:
    """Decoded target features [C, h, w] of one view of a lifted scene at the token grid.

    viewmat: [4, 4] world-to-camera (OpenCV); K: [3, 3]; (width, height): image size in pixels.
    Rendering happens on the device of the scene's tensors.
    """
    from fit3d.render import rasterization

    g = scene.gaussians
    dev = g["means"].device
    renders, _, _ = rasterization(
        g["means"],
        g["quats"],
        g["scales"],
        g["opacities"],
        g["features"],
        viewmat.to(dev, torch.float32)[None],
        K.to(dev, torch.float32)[None],
        width,
        height,
        backend=backend,
    )  # [1, H, W, D]
    render = renders.permute(0, 3, 1, 2)  # [1, D, H, W]
    return decode_to_tokens(render, scene.decoder.weight, grid)[0]
