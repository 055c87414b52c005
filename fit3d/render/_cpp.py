"""CPU kernels (`_project.cpp`, `_composite.cpp`) behind torch.autograd.Functions.

The extension is compiled on first use with `torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja, which gsplat already pulls in; ~1-2 min once, then cached under
~/.cache/torch_extensions, keyed by the sources and this CPU's flags). If that fails (or
FIT3D_RENDER_NO_CPP=1 is set), and always for float64 or non-CPU tensors, the renderer uses the
pure-torch path instead (a one-time warning says so).

Parallelism: the kernels run on `torch.get_num_threads()` threads of their own (std::threads taking
tiles or chunks of Gaussians from an atomic counter, see `_kernels.h`), so they use all cores
whichever OpenMP runtime torch links, and load none themselves.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._project import TILE, Intersections, Projected

_SOURCES = ("_bindings.cpp", "_project.cpp", "_composite.cpp")
_HEADERS = ("_kernels.h",)


def _build_tag() -> str:
    """Short hash of this CPU's feature flags and the kernel sources: the build uses -march=native,
    so a cache shared by machines with different CPUs (a cluster home directory) must not hand
    one's build to another, and torch's own rebuild check does not look at headers."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    h = hashlib.sha1(flags.encode())
    here = Path(__file__).parent
    for name in _SOURCES + _HEADERS:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:10]


@functools.cache
def _extension() -> ModuleType | None:
    """Build (or load the cached) extension; None when it cannot be built."""
    if os.environ.get("FIT3D_RENDER_NO_CPP"):
        return None
    # importing cpp_extension logs "No CUDA runtime is found" on CPU machines: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        return load(
            name=f"fit3d_render_cpu_{_build_tag()}",
            sources=[str(here / s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, build error: stay correct, just slower
        warnings.warn(
            f"fit3d.render: C++ kernels unavailable ({e}); using pure torch", stacklevel=2
        )
        return None


def usable(*tensors: Tensor) -> bool:
    """True when the C++ kernels can take these tensors (float32 on CPU) and are built."""
    ok = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
    return ok and _extension() is not None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, settings):
        width, height, near, far, eps2d = settings
        cam, gid, means2d, conics, depths, radii = _extension().project_forward(
            means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d
        )
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, cam, gid, conics)
        ctx.settings = settings
        ctx.mark_non_differentiable(cam, gid, radii)
        return cam, gid, means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, _cam, _gid, v_means2d, v_conics, v_depths, _radii):
        means, quats, scales, viewmats, Ks, cam, gid, conics = ctx.saved_tensors
        width, height, _, _, eps2d = ctx.settings
        m = cam.shape[0]
        v_means2d = means.new_zeros(m, 2) if v_means2d is None else v_means2d.contiguous()
        v_conics = means.new_zeros(m, 3) if v_conics is None else v_conics.contiguous()
        v_depths = means.new_zeros(m) if v_depths is None else v_depths.contiguous()
        v_means, v_quats, v_scales = _extension().project_backward(
            means, quats, scales, viewmats, Ks, width, height, eps2d, cam, gid, conics,
            v_means2d, v_conics, v_depths,
        )  # fmt: skip
        return v_means, v_quats, v_scales, None, None, None, None


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
    """Same contract as `_project.project`, computed by the C++ kernels."""
    settings = (width, height, float(near_plane), float(far_plane), float(eps2d))
    cam, gid, means2d, conics, depths, radii = _Project.apply(
        means.contiguous(), quats.contiguous(), scales.contiguous(),
        opacities.detach().contiguous(), viewmats.detach().contiguous(), Ks.detach().contiguous(),
        settings,
    )  # fmt: skip
    return Projected(cam, gid, means2d, conics, depths, opacities[gid], radii)


def intersect_tiles(proj: Projected, n_cams: int, width: int, height: int) -> Intersections:
    """Same contract as `_project.intersect_tiles`, computed by the C++ kernels."""
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    flat, offsets, per_gauss = _extension().intersect_tiles(
        proj.means2d.detach(), proj.radii, proj.depths.detach(), proj.camera_ids, n_cams,
        tiles_x, tiles_y,
    )  # fmt: skip
    return Intersections(flat, offsets, per_gauss, tiles_x, tiles_y)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, radii, isect, grid, geo_channels, absgrad):
        out, trans, last = _extension().composite_forward(
            means2d, conics, opacities, colors, radii, isect.flatten_ids, isect.offsets, *grid
        )
        ctx.save_for_backward(means2d, conics, opacities, colors, radii, trans, last)
        ctx.isect, ctx.grid, ctx.geo_channels, ctx.absgrad = isect, grid, geo_channels, absgrad
        return out, (1.0 - trans)[..., None]

    @staticmethod
    def backward(ctx, v_out, v_alpha):
        means2d, conics, opacities, colors, radii, trans, last = ctx.saved_tensors
        isect = ctx.isect
        v_geo, v_col = _extension().composite_backward(
            means2d, conics, opacities, colors, radii, isect.flatten_ids, isect.offsets, trans,
            last, v_out.contiguous(), v_alpha[..., 0].contiguous(), *ctx.grid, ctx.geo_channels,
        )  # fmt: skip
        if ctx.absgrad is not None:
            ctx.absgrad(v_geo[:, 6:8])
        return v_geo[:, :2], v_geo[:, 2:5], v_geo[:, 5], v_col, None, None, None, None, None


def composite(
    means2d: Tensor,  # [M, 2]
    conics: Tensor,  # [M, 3]
    opacities: Tensor,  # [M]
    colors: Tensor,  # [M, D]
    radii: Tensor,  # [M, 2] int32
    isect: Intersections,
    n_cams: int,
    width: int,
    height: int,
    geo_channels: int,
    absgrad: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite -> (colours [C, H, W, D], alphas [C, H, W, 1]).

    absgrad: called in the backward with the summed per-pixel |d loss / d means2d| [M, 2].
    """
    grid = (n_cams, width, height, isect.tiles_x, isect.tiles_y)
    return _Composite.apply(
        means2d.contiguous(), conics.contiguous(), opacities.contiguous(), colors.contiguous(),
        radii.contiguous(), isect, grid, geo_channels, absgrad,
    )  # fmt: skip
