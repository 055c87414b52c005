"""`rasterization`: gsplat's classic 3DGS rasteriser API with a CPU backend of our own.

gsplat has no CPU path (its kernels are CUDA-only), so the `torch` backend reimplements the same
rules: EWA projection, 16x16 tile binning (depth-sorted per tile) and front-to-back compositing,
by C++ kernels with hand-written backwards (`_project.cpp`, `_composite.cpp`, compiled on first
use, multi-threaded and SIMD, see `_cpp`) or, without a compiler, by pure torch (`_project.py`,
`_composite_torch.py`, also the float64 reference). The C++ path works in gsplat's layouts
directly: the projection fills the dense [C, N] info arrays (or the packed [nnz] ones) and the
compositor reads colours and opacities from the caller's tensors by row, so no per-Gaussian
gather or scatter runs in torch. SH colours are evaluated in torch (`_sh`). On CUDA tensors the
`gsplat` backend calls `gsplat.rasterization` itself.

Stopping feature gradients at geometry (`geometry_grad_channels=k`): only the first k channels of
`colors` (and the depth channel of the D/ED modes) send gradient into means, quats, scales and
opacities (and `info["means2d"]`, so densification statistics come from them alone); the other
channels still get their own gradient. The torch backend does this inside one pass: the backward
computes the geometry gradient from the first k channels of the output gradient only, which is
exactly what rendering those channels again on detached geometry would give. The gsplat backend
does that second render (features on detached means/quats/scales/opacities).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from . import _cpp, _project
from ._composite_torch import composite_torch
from ._project import TILE
from ._sh import spherical_harmonics

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "gsplat", "torch", "torch-python"]
RasterizeMode = Literal["classic", "antialiased"]


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] | [C, N, D] | SH [N, K, 3] | [C, N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = False,
    tile_size: int = TILE,
    backgrounds: Tensor | None = None,  # [C, D]
    render_mode: RenderMode = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: RasterizeMode = "classic",
    channel_chunk: int = 32,
    *,
    backend: Backend = "auto",
    geometry_grad_channels: int | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Render 3D Gaussians into C pinhole cameras (gsplat 1.5 `rasterization`, pinhole cameras).

    The arguments up to `channel_chunk` are gsplat's, in gsplat's order; `backend` and
    `geometry_grad_channels` are ours (keyword only).

    Args:
        means: [N, 3] centres. quats: [N, 4] wxyz rotations, any norm. scales: [N, 3] activated
            scales. opacities: [N] activated opacities in [0, 1].
        colors: [N, D] or [C, N, D] values to blend, or with `sh_degree` SH coefficients
            [N, K, 3] / [C, N, K, 3] turned into RGB as `max(SH(dir) + 0.5, 0)`.
        viewmats: [C, 4, 4] world-to-camera, OpenCV axes. Ks: [C, 3, 3] pinhole intrinsics.
        width, height: image size in pixels.
        near_plane, far_plane: camera-depth range kept. eps2d: 2D low-pass added to covariances.
        radius_clip: Gaussians whose 2D radius is <= this many pixels are skipped (gsplat only).
        packed: info holds [nnz] rows with `camera_ids`/`gaussian_ids` instead of [C, N] arrays.
        tile_size: tile edge in pixels (16; other values gsplat only).
        backgrounds: [C, D] colour behind the Gaussians (zero for the depth channel).
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth = D / alpha), "RGB+D",
            "RGB+ED" (depth as the last channel).
        sparse_grad: COO gradients for means/quats/scales (gsplat only, with `packed`).
        absgrad: also store gsplat's absolute means2d gradient (per-pixel |grad| summed) as
            `info["means2d"].absgrad` after backward (not with "torch-python").
        rasterize_mode: "classic", or "antialiased" (opacity compensation, gsplat only).
        channel_chunk: gsplat composites at most this many channels per kernel call; the CPU
            backends composite all channels in one pass (same values).
        backend: "gsplat" (CUDA), "torch" (CPU: C++ kernels, pure torch if they cannot be built),
            "torch-python" (CPU, always pure torch), "auto" (gsplat on CUDA tensors, else torch).
        geometry_grad_channels: k >= 0 -> only the first k colour channels (and the depth
            channel) send gradient to geometry (module docstring); None -> all of them.

    Returns:
        renders [C, H, W, D'] (D' = D, 1 or D + 1 by mode), alphas [C, H, W, 1], info dict with
        `means2d` (gradient retained, on every backend), `radii` (int32), `depths`, `conics`,
        `opacities`, `width`, `height`, `n_cameras`, `n_batches`, `tile_size`, `tile_width`,
        `tile_height`, `tiles_per_gauss`, `flatten_ids`, `isect_offsets`, and
        `batch_ids`/`camera_ids`/`gaussian_ids` when packed.

    Differences from gsplat 1.5.3's `rasterization` (an argument we cannot honour raises):
        - `packed` defaults to False (gsplat: True): callers such as the stage-1 densification
          read the dense [C, N] info. The gsplat backend passes `packed` explicitly.
        - No batch dimensions: means [N, 3] and viewmats [C, 4, 4] only (gsplat takes
          [..., N, 3] / [..., C, 4, 4]); loop over the batch instead.
        - gsplat's later arguments (distributed, camera_model, segmented, covars, with_ut,
          with_eval3d, distortion and rolling-shutter coefficients) are not accepted.
        - The CPU backends support only radius_clip=0, tile_size=16, rasterize_mode="classic",
          sparse_grad=False; other values raise ValueError (gsplat on CUDA has them).
        - The CPU info has no `isect_ids`. Its `means2d.absgrad` sums over all channels;
          gsplat's sums over one `channel_chunk` only when the rendered channels (depth
          included) exceed `channel_chunk`, as every chunk's backward overwrites it.
        - Camera gradients: `viewmats` that require grad get theirs, as on gsplat, through the
          pure torch path (the C++ kernels have none), so not with `absgrad`.
        - `info["means2d"]` retains its gradient on every backend (gsplat leaves that to the
          caller, e.g. a strategy's `step_pre_backward`).
    """
    _check_args(means, viewmats, render_mode, rasterize_mode, channel_chunk, geometry_grad_channels)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend == "gsplat":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
            far_plane, sh_degree, backgrounds, render_mode, packed, absgrad, eps2d,
            geometry_grad_channels, radius_clip, tile_size, rasterize_mode, channel_chunk,
            sparse_grad,
        )  # fmt: skip
    if backend not in ("torch", "torch-python"):
        raise ValueError(f"unknown backend {backend!r}")
    cpu_only = {
        "radius_clip": (radius_clip, 0.0),
        "tile_size": (tile_size, TILE),
        "rasterize_mode": (rasterize_mode, "classic"),
        "sparse_grad": (sparse_grad, False),
    }
    for name, (value, supported) in cpu_only.items():
        if value != supported:
            raise ValueError(
                f"{name}={value!r} needs the gsplat backend (CUDA tensors); the CPU backends "
                f"support only {name}={supported!r}"
            )
    return _rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
        far_plane, sh_degree, backgrounds, render_mode, packed, absgrad, eps2d,
        geometry_grad_channels, python_only=backend == "torch-python",
    )  # fmt: skip


def _check_args(
    means: Tensor,
    viewmats: Tensor,
    render_mode: str,
    rasterize_mode: str,
    channel_chunk: int,
    geometry_grad_channels: int | None,
) -> None:
    """Argument checks shared by every backend (ValueError, one line each)."""
    if render_mode not in get_args(RenderMode):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    if rasterize_mode not in get_args(RasterizeMode):
        raise ValueError(f"unknown rasterize_mode {rasterize_mode!r}")
    if means.dim() != 2 or viewmats.dim() != 3:
        raise ValueError(
            f"means {tuple(means.shape)} / viewmats {tuple(viewmats.shape)}: batch dimensions "
            "are not supported (means [N, 3], viewmats [C, 4, 4]); loop over the batch"
        )
    if channel_chunk < 1:
        raise ValueError(f"channel_chunk must be >= 1, got {channel_chunk}")
    if geometry_grad_channels is not None and geometry_grad_channels < 0:
        raise ValueError(f"geometry_grad_channels must be >= 0, got {geometry_grad_channels}")


def _check_colors(colors: Tensor, n_cams: int, n: int, sh_degree: int | None) -> bool:
    """Validate the colour shape; True when colours are per camera ([C, N, ...])."""
    per_cam = colors.dim() == (4 if sh_degree is not None else 3)
    if per_cam and colors.shape[:2] != (n_cams, n):
        raise ValueError(f"colors {tuple(colors.shape)} do not match C={n_cams}, N={n}")
    if not per_cam and colors.shape[0] != n:
        raise ValueError(f"colors {tuple(colors.shape)} do not match N={n}")
    return per_cam


def _sh_colors(colors: Tensor, means: Tensor, viewmats: Tensor, sh_degree: int) -> Tensor:
    """SH evaluated towards every camera -> RGB [C, N, 3] (max(SH + 0.5, 0), as gsplat)."""
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[None] - campos[:, None]  # [C, N, 3]
    return torch.clamp_min(spherical_harmonics(sh_degree, dirs, colors) + 0.5, 0.0)


def _entry_colors(
    colors: Tensor, means: Tensor, viewmats: Tensor, sh_degree: int | None, cam: Tensor, gid: Tensor
) -> Tensor:
    """Per visible entry colours [M, D] (SH evaluated towards each entry's camera)."""
    per_cam = _check_colors(colors, viewmats.shape[0], means.shape[0], sh_degree)
    picked = colors[cam, gid] if per_cam else colors[gid]
    if sh_degree is None:
        return picked
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[gid] - campos[cam]
    return torch.clamp_min(spherical_harmonics(sh_degree, dirs, picked) + 0.5, 0.0)


def _finish(
    img: Tensor,  # [C, H, W, D'] colours then depth
    alphas: Tensor,  # [C, H, W, 1]
    backgrounds: Tensor | None,
    render_mode: RenderMode,
    d_rgb: int,
    k: int,
) -> Tensor:
    """Backgrounds behind the colours (only the first k channels' fill depends on alpha for the
    gradient) and expected depth."""
    if backgrounds is not None and d_rgb > 0:
        bg = backgrounds[:, None, None, :]  # [C, 1, 1, D]
        fill_geo = (1.0 - alphas) * bg[..., :k]
        fill_free = (1.0 - alphas.detach()) * bg[..., k:]
        fill = torch.cat([fill_geo, fill_free], -1)
        img = torch.cat([img[..., :d_rgb] + fill, img[..., d_rgb:]], -1)
    if render_mode in ("ED", "RGB+ED"):
        img = torch.cat([img[..., :-1], img[..., -1:] / alphas.clamp_min(1e-10)], -1)
    return img


def _rasterize_torch(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
    sh_degree, backgrounds, render_mode, packed, absgrad, eps2d, geometry_grad_channels,
    python_only,
) -> tuple[Tensor, Tensor, dict]:  # fmt: skip
    # the C++ projection has no camera gradient: pose gradients (gsplat has them) take pure torch
    camera_grad = torch.is_grad_enabled() and viewmats.requires_grad
    fast = not python_only and not camera_grad
    fast = fast and _cpp.usable(means, quats, scales, opacities, viewmats, Ks, colors)
    if fast:
        return _rasterize_cpp(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
            far_plane, sh_degree, backgrounds, render_mode, packed, absgrad, eps2d,
            geometry_grad_channels,
        )  # fmt: skip
    if absgrad:
        raise NotImplementedError("absgrad needs the C++ kernels (float32 CPU) or gsplat")
    n_cams, n = viewmats.shape[0], means.shape[0]
    proj = _project.project(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d
    )
    cam, gid = proj.camera_ids, proj.gaussian_ids
    if packed:
        means2d = proj.means2d
    else:  # dense [C, N, 2] leaf of the rendering graph, as gsplat returns it
        means2d = proj.means2d.new_zeros(n_cams, n, 2).index_put((cam, gid), proj.means2d)
    if means2d.requires_grad:
        means2d.retain_grad()
    m2d = means2d if packed else means2d[cam, gid]  # [M, 2]

    want_rgb = render_mode in ("RGB", "RGB+D", "RGB+ED")
    want_depth = render_mode != "RGB"
    rgb = _entry_colors(colors, means, viewmats, sh_degree, cam, gid) if want_rgb else None
    d_rgb = rgb.shape[1] if rgb is not None else 0
    k = d_rgb if geometry_grad_channels is None else min(geometry_grad_channels, d_rgb)
    parts = [] if rgb is None else [rgb[:, :k]]
    if want_depth:
        parts.append(proj.depths[:, None])
    if rgb is not None:
        parts.append(rgb[:, k:])
    entry_cols = torch.cat(parts, 1) if parts else proj.means2d.new_zeros(0, 0)
    isect = _project.intersect_tiles(proj, n_cams, width, height)
    img, alphas = composite_torch(
        m2d, proj.conics, proj.opacities, entry_cols, isect, n_cams, width, height, k + want_depth
    )
    if want_depth:  # back to the caller's channel order: colours, then depth
        depth = img[..., k : k + 1]
        img = torch.cat([img[..., :k], img[..., k + 1 :], depth], -1)
    img = _finish(img, alphas, backgrounds, render_mode, d_rgb, k)

    radii, depths, conics = proj.radii, proj.depths, proj.conics
    opac = proj.opacities
    if not packed:
        radii = radii.new_zeros(n_cams, n, 2).index_put((cam, gid), radii)
        depths = depths.new_zeros(n_cams, n).index_put((cam, gid), depths)
        conics = conics.new_zeros(n_cams, n, 3).index_put((cam, gid), conics)
        opac = torch.broadcast_to(opacities, (n_cams, n))
        tiles_per_gauss = isect.tiles_per_gauss.new_zeros(n_cams, n).index_put(
            (cam, gid), isect.tiles_per_gauss
        )
        flatten_ids = (cam * n + gid)[isect.flatten_ids]
    else:
        tiles_per_gauss, flatten_ids = isect.tiles_per_gauss, isect.flatten_ids
    info = _info(
        packed, cam, gid, radii, means2d, depths, conics, opac, tiles_per_gauss, flatten_ids, isect,
        width, height, n_cams,
    )  # fmt: skip
    return img, alphas, info


def _info(
    packed, cam, gid, radii, means2d, depths, conics, opacities, tiles_per_gauss, flatten_ids,
    isect, width, height, n_cams,
) -> dict:  # fmt: skip
    """gsplat's info dict."""
    return {
        "batch_ids": torch.zeros_like(cam) if packed else None,
        "camera_ids": cam if packed else None,
        "gaussian_ids": gid if packed else None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities,
        "tile_width": isect.tiles_x,
        "tile_height": isect.tiles_y,
        "tiles_per_gauss": tiles_per_gauss,
        "flatten_ids": flatten_ids,
        "isect_offsets": isect.offsets[:-1].reshape(n_cams, isect.tiles_y, isect.tiles_x),
        "width": width,
        "height": height,
        "tile_size": TILE,
        "n_batches": 1,
        "n_cameras": n_cams,
    }


def _rasterize_cpp(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
    sh_degree, backgrounds, render_mode, packed, absgrad, eps2d, geometry_grad_channels,
) -> tuple[Tensor, Tensor, dict]:  # fmt: skip
    """The C++ path: dense or packed layouts throughout, colour tables read in place."""
    n_cams, n = viewmats.shape[0], means.shape[0]
    want_rgb = render_mode in ("RGB", "RGB+D", "RGB+ED")
    want_depth = render_mode != "RGB"
    per_cam = _check_colors(colors, n_cams, n, sh_degree) if want_rgb else False
    means2d, conics, depths, radii, rows = _cpp.project(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
        packed,
    )  # fmt: skip
    if means2d.requires_grad:
        means2d.retain_grad()
    if not want_rgb:
        table = means.new_zeros(n, 0)
    elif sh_degree is not None:
        table = _sh_colors(colors, means, viewmats, sh_degree).reshape(n_cams * n, 3)
    elif per_cam:
        table = colors.reshape(n_cams * n, colors.shape[-1])
    else:
        table = colors
    d_rgb = table.shape[1]
    k = d_rgb if geometry_grad_channels is None else min(geometry_grad_channels, d_rgb)
    isect = _cpp.intersect_tiles(means2d, radii, depths, rows, packed, n, n_cams, width, height)

    def store_absgrad(v_abs: Tensor) -> None:  # laid out like info["means2d"]
        means2d.absgrad = v_abs

    img, alphas = _cpp.composite(
        means2d, conics, depths if want_depth else None, opacities, table, radii,
        rows if packed else None, isect, n_cams, width, height, k,
        store_absgrad if absgrad else None,
    )  # fmt: skip
    img = _finish(img, alphas, backgrounds, render_mode, d_rgb, k)
    cam, gid = (rows // n, rows % n) if packed else (None, None)
    opac = opacities[gid] if packed else torch.broadcast_to(opacities, (n_cams, n))
    info = _info(
        packed, cam, gid, radii, means2d, depths, conics, opac, isect.tiles_per_gauss,
        isect.flatten_ids, isect, width, height, n_cams,
    )  # fmt: skip
    return img, alphas, info


def _rasterize_gsplat(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
    sh_degree, backgrounds, render_mode, packed, absgrad, eps2d, geometry_grad_channels,
    radius_clip, tile_size, rasterize_mode, channel_chunk, sparse_grad,
) -> tuple[Tensor, Tensor, dict]:  # fmt: skip
    """gsplat on CUDA; a split colour tensor renders twice (features on detached geometry).

    Every gsplat default we differ from (packed) is passed explicitly. The geometry pass renders
    colours [..., :k] (plus depth) with absgrad; its alphas and info are returned. The feature
    pass renders colours [..., k:] in "RGB" mode on detached geometry.
    """
    import gsplat

    common = dict(
        width=width, height=height, near_plane=near_plane, far_plane=far_plane,
        radius_clip=radius_clip, eps2d=eps2d, packed=packed, tile_size=tile_size,
        rasterize_mode=rasterize_mode, channel_chunk=channel_chunk,
    )  # fmt: skip
    want_rgb = render_mode in ("RGB", "RGB+D", "RGB+ED")
    d_rgb = 3 if sh_degree is not None else colors.shape[-1]
    k = geometry_grad_channels
    if not want_rgb or k is None or k >= d_rgb:  # one pass: every channel feeds geometry
        img, alphas, info = gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, sh_degree=sh_degree,
            backgrounds=backgrounds, render_mode=render_mode, sparse_grad=sparse_grad,
            absgrad=absgrad, **common,
        )  # fmt: skip
        return img, alphas, _retain_means2d(info)
    if sh_degree is not None:  # split the evaluated RGB, as the CPU backends do
        colors = _sh_colors(colors, means, viewmats, sh_degree)  # [C, N, 3]
    placeholder = k == 0 and render_mode == "RGB"  # gsplat renders at least one channel
    if placeholder:
        geo_colors = colors.new_zeros(colors.shape[:-1] + (1,))  # [..., N, 1], no gradient
        bg_geo = None
    else:
        geo_colors = colors[..., :k]
        bg_geo = backgrounds[..., :k] if backgrounds is not None else None
    img_geo, alphas, info = gsplat.rasterization(
        means, quats, scales, opacities, geo_colors, viewmats, Ks, backgrounds=bg_geo,
        render_mode=render_mode, sparse_grad=sparse_grad, absgrad=absgrad, **common,
    )  # fmt: skip
    if placeholder:
        img_geo = img_geo[..., :0]
    bg_free = backgrounds[..., k:] if backgrounds is not None else None
    img_free, _, _ = gsplat.rasterization(
        means.detach(), quats.detach(), scales.detach(), opacities.detach(), colors[..., k:],
        viewmats, Ks, backgrounds=bg_free, render_mode="RGB", **common,
    )  # fmt: skip
    if render_mode == "RGB":
        img = torch.cat([img_geo, img_free], -1)
    else:  # colours, then depth last
        img = torch.cat([img_geo[..., :-1], img_free, img_geo[..., -1:]], -1)
    return img, alphas, _retain_means2d(info)


def _retain_means2d(info: dict) -> dict:
    """Keep `info["means2d"].grad` after backward, as the CPU backends do."""
    if info["means2d"].requires_grad:
        info["means2d"].retain_grad()
    return info
