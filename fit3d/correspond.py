"""Dense pixel correspondences between two views through depth (rendered from the lifted
Gaussians, or ground truth), and their precision against reference correspondences.

Conventions (as `fit3d.geometry`): viewmats are world-to-camera [4, 4] with OpenCV axes; K [3, 3]
puts pixel (x, y)'s centre at (x + 0.5, y + 0.5); depth is along the optical axis, 0 = invalid.
Pixel coordinates in and out of this module are in the integer-index convention: the centre of
pixel (x, y) is at (x, y), so a float location rounds to its nearest pixel.

The correspondence rule (`dense_correspondences`): every pixel of view a with depth is lifted to
3D and projected into view b. It is kept when (1) its nearest b pixel lies inside b, the point is
in front of b and b's depth at that nearest pixel agrees with the point's b camera-z within
`rel_tol` (`geometry.visible`: b sees the point), and (2) the b location, lifted with b's depth
there and projected back into a, lands within `cycle_px` of the a pixel (a sees b's surface at
that location, which rejects what the loose depth test lets through, e.g. a thin occluder in
front of the surface). For (2) b's depth at the continuous location is the bilinear interpolation
of inverse depth over the four surrounding pixels (exact on planes, linear extrapolation at the
image border) when those four are valid and agree within `rel_tol`, else the nearest pixel's
depth: it never blends across a depth edge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fit3d.gaussians import LiftedScene
from fit3d.geometry import reproject, visible


def scaled_intrinsics(K: Tensor, width: int, height: int, w: int, h: int) -> Tensor:
    """Intrinsics [3, 3] of a width x height view resized to w x h: diag(sx, sy, 1) @ K with
    sx = w / width, sy = h / height (pixel centres stay at +0.5)."""
    scale = torch.tensor([w / width, h / height, 1.0], dtype=K.dtype, device=K.device)
    return scale[:, None] * K


def _scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(w, h) = (round(scale * width), round(scale * height)), at least 1 each."""
    return max(1, round(scale * width)), max(1, round(scale * height))


@torch.no_grad()
def render_depth(
    scene: LiftedScene,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    scale: float = 0.25,
    min_alpha: float = 0.5,
    backend: str = "auto",
) -> Tensor:
    """Expected depth [h, w] (h = round(scale*height), w = round(scale*width)) of the lifted
    scene's Gaussians for a view, rendered directly at that resolution (K scaled so pixel centres
    stay consistent: K' = diag(sx, sy, 1) @ K with sx = w/width, sy = h/height); 0 where the
    accumulated opacity is below min_alpha (nothing solid there).

    viewmat: [4, 4] world-to-camera (OpenCV); K: [3, 3] for the width x height view. Renders on
    the device of the scene's tensors; returns float32 there.
    """
    from fit3d.render import rasterization

    if tuple(viewmat.shape) != (4, 4) or tuple(K.shape) != (3, 3):
        raise ValueError(f"viewmat {tuple(viewmat.shape)} / K {tuple(K.shape)}: need [4,4] / [3,3]")
    if width < 1 or height < 1 or scale <= 0:
        raise ValueError(f"bad size {width}x{height} or scale {scale}")
    w, h = _scaled_size(width, height, scale)
    g = scene.gaussians
    dev = g["means"].device
    K_small = scaled_intrinsics(K.to(dev, torch.float32), width, height, w, h)  # [3, 3]
    colors = g["means"].new_zeros(g["means"].shape[0], 1)  # [N, 1], unused in "ED" mode
    renders, alphas, _ = rasterization(
        g["means"],
        g["quats"],
        g["scales"],
        g["opacities"],
        colors,
        viewmat.to(dev, torch.float32)[None],
        K_small[None],
        w,
        h,
        render_mode="ED",
        backend=backend,
    )  # renders [1, h, w, 1], alphas [1, h, w, 1]
    depth = renders[0, :, :, 0].float()  # [h, w]
    solid = alphas[0, :, :, 0] >= min_alpha  # [h, w]
    return torch.where(solid, depth, torch.zeros_like(depth))


def resize_depth(depth: Tensor, w: int, h: int) -> Tensor:
    """Depth [H, W] -> [h, w] by taking, for every output pixel, the input pixel under its centre
    (output pixel (x, y) has its centre at input index coordinates ((x + 0.5) W / w - 0.5, ...):
    the input pixel is floor((x + 0.5) W / w), clamped). No blending and no min-pooling, so every
    output depth is a real surface depth on (within half an input pixel of) the output pixel's
    centre ray, the ray that `scaled_intrinsics` and `render_depth` use."""
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {tuple(depth.shape)}")
    H, W = depth.shape
    ys = ((torch.arange(h, device=depth.device) + 0.5) * H / h).floor().long().clamp(0, H - 1)
    xs = ((torch.arange(w, device=depth.device) + 0.5) * W / w).floor().long().clamp(0, W - 1)
    return depth[ys[:, None], xs[None, :]]  # [h, w]


def _sample_depth(depth: Tensor, xy: Tensor, rel_tol: float) -> Tensor:
    """Depth [N] of depth map [H, W] at float locations xy [N, 2] whose nearest pixel is inside:
    bilinear in inverse depth over the 2 x 2 pixels around xy (extrapolated at the border) where
    all four are valid and within rel_tol of each other, else the nearest pixel's depth."""
    H, W = depth.shape
    xy = xy.double()
    px = xy.round().long()  # [N, 2]
    nearest = depth[px[:, 1], px[:, 0]].double()  # [N]
    if H < 2 or W < 2:
        return nearest
    x0 = xy[:, 0].floor().long().clamp(0, W - 2)  # [N]
    y0 = xy[:, 1].floor().long().clamp(0, H - 2)  # [N]
    tx = xy[:, 0] - x0  # [N] in [-0.5, 1.5)
    ty = xy[:, 1] - y0  # [N]
    quad = torch.stack(
        [depth[y0, x0], depth[y0, x0 + 1], depth[y0 + 1, x0], depth[y0 + 1, x0 + 1]], dim=1
    ).double()  # [N, 4]
    lo, hi = quad.min(dim=1).values, quad.max(dim=1).values  # [N]
    smooth = (lo > 0) & (hi <= (1.0 + rel_tol) * lo)  # [N]
    inv = 1.0 / quad.clamp_min(1e-12)  # [N, 4]
    top = (1 - tx) * inv[:, 0] + tx * inv[:, 1]  # [N]
    bottom = (1 - tx) * inv[:, 2] + tx * inv[:, 3]  # [N]
    inv_depth = (1 - ty) * top + ty * bottom  # [N]
    smooth = smooth & (inv_depth > 0)
    return torch.where(smooth, 1.0 / inv_depth.clamp_min(1e-12), nearest)


def _check_camera(name: str, depth: Tensor, K: Tensor, viewmat: Tensor) -> None:
    """ValueError unless depth is [H, W], K [3, 3] and viewmat [4, 4]."""
    if depth.ndim != 2 or depth.shape[0] < 1 or depth.shape[1] < 1:
        raise ValueError(f"depth_{name} must be [H, W], got {tuple(depth.shape)}")
    if tuple(K.shape) != (3, 3):
        raise ValueError(f"K_{name} must be [3, 3], got {tuple(K.shape)}")
    if tuple(viewmat.shape) != (4, 4):
        raise ValueError(f"viewmat_{name} must be [4, 4], got {tuple(viewmat.shape)}")


def dense_correspondences(
    depth_a: Tensor,
    depth_b: Tensor,
    K_a: Tensor,
    K_b: Tensor,
    viewmat_a: Tensor,
    viewmat_b: Tensor,
    rel_tol: float = 0.05,
    cycle_px: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pixel correspondences from view a to view b, both ways checked (module docstring).

    depth_*: [H, W] (any resolution, a and b may differ; K_* for that resolution);
    viewmat_*: [4, 4] world-to-camera. Every pixel of a with depth > 0 is lifted and projected
    into b; kept when its nearest b pixel is inside b, the point is in front of b, b's depth at
    that nearest pixel agrees with its b camera-z within rel_tol, and the b location lifted with
    b's depth (edge-aware inverse-depth bilinear, else nearest) and projected back into a lands
    within cycle_px of the a pixel.

    Returns (xy_a [M, 2] long pixel indices (x, y) of a, row-major order; xy_b [M, 2] float pixel
    coordinates in b (depth_a's dtype if floating, else float32), in the same integer-index
    convention: the centre of pixel (x, y) is (x, y)). Math in float64 (`geometry.reproject`).
    """
    _check_camera("a", depth_a, K_a, viewmat_a)
    _check_camera("b", depth_b, K_b, viewmat_b)
    out_dtype = depth_a.dtype if depth_a.is_floating_point() else torch.float32
    ys, xs = torch.nonzero(depth_a > 0, as_tuple=True)  # [N] each, row-major
    xy_a = torch.stack([xs, ys], dim=1)  # [N, 2]
    z_a = depth_a[ys, xs]  # [N]
    # (1) a -> b: b sees the point (nearest pixel inside, in front, depth agrees)
    xy_b, z_b = reproject(xy_a, z_a, K_a, K_b, viewmat_a, viewmat_b)  # [N, 2] f64, [N]
    seen = visible(xy_b, z_b, depth_b, rel_tol)  # [N]
    xy_a, xy_b = xy_a[seen], xy_b[seen]  # [N', 2]
    # (2) b -> a: b's surface at that location projects back onto the a pixel
    d_b = _sample_depth(depth_b, xy_b, rel_tol)  # [N']
    xy_back, z_back = reproject(xy_b, d_b, K_b, K_a, viewmat_b, viewmat_a)  # [N', 2], [N']
    err = (xy_back - xy_a.double()).norm(dim=1)  # [N']
    keep = (z_back > 0) & (err <= cycle_px)  # [N']
    return xy_a[keep], xy_b[keep].to(out_dtype)


def _check_pairs(name: str, xy_a: Tensor, xy_b: Tensor) -> None:
    """ValueError unless xy_a, xy_b are [M, 2] with the same M and xy_a has no repeated pixel."""
    if xy_a.ndim != 2 or xy_a.shape[1] != 2 or xy_b.ndim != 2 or xy_b.shape[1] != 2:
        raise ValueError(
            f"{name}: need [M, 2] and [M, 2], got {tuple(xy_a.shape)}, {tuple(xy_b.shape)}"
        )
    if xy_a.shape[0] != xy_b.shape[0]:
        raise ValueError(f"{name}: {xy_a.shape[0]} a pixels but {xy_b.shape[0]} b locations")
    if xy_a.shape[0] != torch.unique(xy_a.long(), dim=0).shape[0]:
        raise ValueError(f"{name}: repeated a pixels")


def match_reference(
    xy_a: Tensor, xy_b: Tensor, gt_a: Tensor, gt_b: Tensor
) -> tuple[Tensor, Tensor]:
    """For every predicted correspondence (xy_a [M, 2] pixel indices -> xy_b [M, 2]) its reference
    one by a pixel (gt_a [G, 2] -> gt_b [G, 2]). Returns (has_ref [M] bool, error [M] float64:
    distance in b pixels between xy_b and the reference b location, inf without a reference).
    a pixels must not repeat within either set (ValueError)."""
    _check_pairs("predicted", xy_a, xy_b)
    _check_pairs("reference", gt_a, gt_b)
    dev = xy_a.device
    xy_a, gt_a, gt_b = xy_a.long(), gt_a.long().to(dev), gt_b.to(dev)
    error = torch.full((xy_a.shape[0],), float("inf"), dtype=torch.float64, device=dev)  # [M]
    if xy_a.shape[0] == 0 or gt_a.shape[0] == 0:
        return torch.zeros_like(error, dtype=torch.bool), error
    lo = torch.minimum(xy_a.min(dim=0).values, gt_a.min(dim=0).values)  # [2]
    span = int(torch.maximum(xy_a.max(dim=0).values, gt_a.max(dim=0).values)[0] - lo[0]) + 1
    key_pred = (xy_a[:, 1] - lo[1]) * span + (xy_a[:, 0] - lo[0])  # [M] unique pixel keys
    key_ref = (gt_a[:, 1] - lo[1]) * span + (gt_a[:, 0] - lo[0])  # [G]
    key_sorted, order = key_ref.sort()  # [G]
    pos = torch.searchsorted(key_sorted, key_pred).clamp(max=key_sorted.shape[0] - 1)  # [M]
    has_ref = key_sorted[pos] == key_pred  # [M]
    ref_b = gt_b[order[pos]].double()  # [M, 2]
    dist = (xy_b.double() - ref_b).norm(dim=1)  # [M]
    error = torch.where(has_ref, dist, error)
    return has_ref, error


def correspondence_precision(
    xy_a: Tensor, xy_b: Tensor, gt_a: Tensor, gt_b: Tensor, radius: float = 1.0
) -> dict[str, float]:
    """Precision of predicted correspondences (xy_a [M, 2] -> xy_b [M, 2]) against reference ones
    (gt_a [G, 2] -> gt_b [G, 2], e.g. from ground-truth depth at the same resolution), matched by
    a pixel. A predicted one is correct when its a pixel has a reference correspondence and the
    reference b location is within `radius` px; predicted ones whose a pixel has no reference
    correspondence count as wrong.

    Returns {'precision': correct / predicted, 'recall': correct / reference (reference ones
    recovered within radius), 'predicted': M, 'reference': G, 'correct', 'median_error_px':
    median (the lower one for an even count, as torch's) b-pixel error over predicted ones that
    have a reference}; the ratios and the median are nan when their denominator (or set) is
    empty. a pixels must not repeat (ValueError).
    """
    has_ref, error = match_reference(xy_a, xy_b, gt_a, gt_b)
    correct = int((error <= radius).sum())
    predicted, reference = int(xy_a.shape[0]), int(gt_a.shape[0])
    nan = float("nan")
    return {
        "precision": correct / predicted if predicted else nan,
        "recall": correct / reference if reference else nan,
        "predicted": float(predicted),
        "reference": float(reference),
        "correct": float(correct),
        "median_error_px": float(error[has_ref].median()) if has_ref.any() else nan,
    }
