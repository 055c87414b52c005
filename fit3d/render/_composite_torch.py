"""Pure-torch tile compositor (the fallback when the C++ kernels cannot be built).

Tiles are walked front to back in chunks of `chunk` depth-sorted Gaussians; a chunk evaluates a
dense [tiles, 256 px, chunk] block, and tiles whose pixels are all finished drop out. Each chunk
runs under activation checkpointing, so the backward recomputes it and memory stays at one chunk
plus the per-chunk transmittance carried between chunks (it grows with Gaussian-tile pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._project import ALPHA_MIN, TILE, Intersections

T_MIN = 1e-4


def _chunk(
    t0: Tensor,  # [A, P] transmittance entering the chunk
    live: Tensor,  # [A, P] bool, pixel still compositing
    pix: Tensor,  # [A, P, 2] pixel centres
    mean: Tensor,  # [A, K, 2]
    conic: Tensor,  # [A, K, 3]
    opac: Tensor,  # [A, K] (0 for padding)
    col_geo: Tensor,  # [A, K, Dg] colours whose gradient reaches geometry
    col_free: Tensor,  # [A, K, Df] colours whose gradient stops at geometry
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx = mean[:, None, :, 0] - pix[..., 0:1]  # [A, P, K]
    dy = mean[:, None, :, 1] - pix[..., 1:2]
    a, b, c = (conic[:, None, :, i] for i in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (opac[:, None, :] * torch.exp(-sigma)).clamp_max(0.999)
    use = (sigma >= 0) & (alpha >= ALPHA_MIN) & live[..., None]
    alpha = torch.where(use, alpha, torch.zeros_like(alpha))
    t_incl = t0[..., None] * torch.cumprod(1.0 - alpha, -1)  # [A, P, K]
    t_excl = torch.cat([t0[..., None], t_incl[..., :-1]], -1)
    before_stop = t_incl > T_MIN  # a prefix along K
    w = torch.where(before_stop, alpha * t_excl, torch.zeros_like(alpha))  # [A, P, K]
    n_used = before_stop.sum(-1, keepdim=True)  # [A, P, 1]
    t_out = torch.gather(torch.cat([t0[..., None], t_incl], -1), -1, n_used)[..., 0]
    live_out = live & before_stop[..., -1]
    out = torch.cat([torch.bmm(w, col_geo), torch.bmm(w.detach(), col_free)], -1)  # [A, P, D]
    return out, t_out, live_out, w.sum(-1)


def composite_torch(
    means2d: Tensor,  # [M, 2]
    conics: Tensor,  # [M, 3]
    opacities: Tensor,  # [M]
    colors: Tensor,  # [M, D]
    isect: Intersections,
    n_cams: int,
    width: int,
    height: int,
    geo_channels: int,
    chunk: int = 32,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite -> (colours [C, H, W, D], alphas [C, H, W, 1])."""
    dev, dt = means2d.device, means2d.dtype
    d = colors.shape[1]
    tx, ty = isect.tiles_x, isect.tiles_y
    n_tiles = n_cams * tx * ty
    counts = isect.offsets[1:] - isect.offsets[:-1]  # [T]
    tiles = torch.nonzero(counts > 0)[:, 0]
    ly, lx = torch.meshgrid(
        torch.arange(TILE, device=dev), torch.arange(TILE, device=dev), indexing="ij"
    )
    local = torch.stack([lx.reshape(-1), ly.reshape(-1)], -1).to(dt) + 0.5  # [P, 2]
    in_img = tiles % (tx * ty)
    origin = torch.stack([in_img % tx, in_img // tx], -1).to(dt) * TILE  # [A, 2]
    pix = origin[:, None, :] + local  # [A, P, 2]
    live = (pix[..., 0] < width) & (pix[..., 1] < height)  # [A, P]
    t_cur = torch.ones(live.shape, device=dev, dtype=dt)
    # padding row: opacity 0 never contributes
    means2d = torch.cat([means2d, means2d.new_zeros(1, 2)])
    conics = torch.cat([conics, conics.new_zeros(1, 3)])
    opacities = torch.cat([opacities, opacities.new_zeros(1)])
    colors = torch.cat([colors, colors.new_zeros(1, d)])
    pad = means2d.shape[0] - 1
    rows = torch.arange(chunk, device=dev)
    outs, accs, ids = [], [], []
    start = 0
    while tiles.numel() > 0:
        k = start + rows  # [K]
        valid = k[None] < counts[tiles, None]  # [A, K]
        pos = (isect.offsets[tiles, None] + k[None]).clamp_max(
            max(isect.flatten_ids.numel() - 1, 0)
        )
        g = torch.where(valid, isect.flatten_ids[pos], torch.full_like(pos, pad))  # [A, K]
        col = colors[g]
        out, t_cur, live, acc = checkpoint(
            _chunk,
            t_cur,
            live,
            pix,
            means2d[g],
            conics[g],
            opacities[g],
            col[..., :geo_channels],
            col[..., geo_channels:],
            use_reentrant=False,
        )
        outs.append(out)
        accs.append(acc)
        ids.append(tiles)
        start += chunk
        keep = (counts[tiles] > start) & live.any(-1)
        tiles, pix, live, t_cur = tiles[keep], pix[keep], live[keep], t_cur[keep]
    img = means2d.new_zeros(n_tiles, TILE * TILE, d)
    acc = means2d.new_zeros(n_tiles, TILE * TILE)
    if ids:
        all_ids = torch.cat(ids)
        img = img.index_add(0, all_ids, torch.cat(outs))
        acc = acc.index_add(0, all_ids, torch.cat(accs))
    else:  # nothing visible: zero images that still belong to the autograd graph
        img = img + 0.0 * colors.sum()
        acc = acc + 0.0 * (opacities.sum() + means2d.sum() + conics.sum())
    img = img.reshape(n_cams, ty, tx, TILE, TILE, d).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(n_cams, ty * TILE, tx * TILE, d)[:, :height, :width]
    acc = acc.reshape(n_cams, ty, tx, TILE, TILE).permute(0, 1, 3, 2, 4)
    acc = acc.reshape(n_cams, ty * TILE, tx * TILE, 1)[:, :height, :width]
    return img, acc
