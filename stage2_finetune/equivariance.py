"""The equivariance term of stage 2: features of one 3D point should agree across views.

Items 2k and 2k+1 of a batch are two views of one lifted scene (`ShuffledSampler`'s view pairs),
each with its depth rendered from the scene's Gaussians at 1/4 resolution, the intrinsics of that
grid, its world-to-camera matrix, its whole token grid (h, w) and, after a crop, the crop's first
token (docs/method.md, "Stage-2 objectives"). `pair_points` matches the two depth grids
(`fit3d.correspond.dense_correspondences`, checked both ways), maps both ends into the token maps
the student produced for the (flipped, cropped) images, keeps at most one point per token of the
first view and at most `max_points` of them; `pair_loss` samples both token maps there and
scores them with `fit3d.losses.correspondence_infonce`.

Token coordinates are continuous, in token units: token (i, j) covers [j, j + 1) x [i, i + 1) and
its centre is (j + 0.5, i + 0.5); a pixel centre (x + 0.5, y + 0.5) of a W x H grid lies at
((x + 0.5) w / W, (y + 0.5) h / H) of the whole token map (the backbone resizes the image to
(h p) x (w p) before cutting patches). A horizontal flip maps u to w - u; a crop subtracts its
first token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.correspond import dense_correspondences
from fit3d.losses import correspondence_infonce

MIN_POINTS = 8
"""Fewer correspondences than this inside both crops: the pair adds nothing to the term."""


class Points(NamedTuple):
    """Token coordinates (x, y) of M matched points in two items' token maps, and which
    off-diagonal pairs count as negatives."""

    ua: Tensor  # [M, 2]
    ub: Tensor  # [M, 2]
    negatives: Tensor  # [M, M] bool


def to_tokens(xy: Tensor, batch: dict[str, Tensor], i: int, size: tuple[int, int]) -> Tensor:
    """Pixel indices xy [M, 2] (x, y) of item i's depth grid -> token coordinates [M, 2] in the
    item's student token map of `size` (h', w') (after its flip and crop)."""
    H4, W4 = batch["depth"].shape[-2:]
    h, w = (int(v) for v in batch["grid"][i])
    u = (xy[:, 0].float() + 0.5) * w / W4
    v = (xy[:, 1].float() + 0.5) * h / H4
    if bool(batch["key"][i, 2]):  # flipped horizontally
        u = w - u
    oy, ox = (int(t) for t in batch["origin"][i])
    return torch.stack([u - ox, v - oy], 1)


def _inside(uv: Tensor, size: tuple[int, int]) -> Tensor:
    """Which token coordinates [M, 2] fall inside a token map of `size` (h, w) [M] bool."""
    h, w = size
    return (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)


@torch.no_grad()
def pair_points(
    batch: dict[str, Tensor],
    a: int,
    b: int,
    sizes: tuple[tuple[int, int], tuple[int, int]],
    max_points: int,
    gen: torch.Generator,
) -> Points | None:
    """Matched points of items a and b (module docstring), or None when fewer than MIN_POINTS.

    sizes: the (h', w') of a's and b's student token maps. Negatives: point pairs whose
    locations are more than one token apart in both views (closer ones are not told apart).
    """
    xy_a, xy_b = dense_correspondences(
        batch["depth"][a].float().cpu(), batch["depth"][b].float().cpu(),
        batch["depth_K"][a].cpu(), batch["depth_K"][b].cpu(),
        batch["viewmat"][a].cpu(), batch["viewmat"][b].cpu(),
    )  # fmt: skip
    ua = to_tokens(xy_a, batch, a, sizes[0])
    ub = to_tokens(xy_b, batch, b, sizes[1])
    keep = _inside(ua, sizes[0]) & _inside(ub, sizes[1])
    ua, ub = ua[keep], ub[keep]
    if len(ua) < MIN_POINTS:
        return None
    order = torch.randperm(len(ua), generator=gen)  # a random point per token of view a
    cell = ua[order].floor().long()
    cell_id = cell[:, 1] * sizes[0][1] + cell[:, 0]
    seen: set[int] = set()
    first = []  # positions in `order` of each cell's first point
    for k, c in enumerate(cell_id.tolist()):
        if c not in seen:
            seen.add(c)
            first.append(k)
    pick = order[first][:max_points]
    if len(pick) < MIN_POINTS:
        return None
    ua, ub = ua[pick], ub[pick]
    apart = (torch.cdist(ua, ua) > 1.0) & (torch.cdist(ub, ub) > 1.0)  # [M, M]
    return Points(ua, ub, apart)


def sample_tokens(tokens: Tensor, uv: Tensor) -> Tensor:
    """Bilinear samples [M, C] of a token map tokens [C, h, w] at token coordinates uv [M, 2]."""
    h, w = tokens.shape[-2:]
    grid = torch.stack([uv[:, 0] / w * 2 - 1, uv[:, 1] / h * 2 - 1], -1).to(tokens)  # [M, 2]
    out = F.grid_sample(
        tokens[None], grid[None, None], mode="bilinear", padding_mode="border", align_corners=False
    )  # [1, C, 1, M]
    return out[0, :, 0].T


def pair_loss(ta: Tensor, tb: Tensor, points: Points, temperature: float) -> Tensor:
    """InfoNCE of one view pair: student token maps ta, tb [C, h, w] at its matched points."""
    ua, ub, apart = points
    return correspondence_infonce(
        sample_tokens(ta, ua), sample_tokens(tb, ub), temperature, negatives=apart
    )
