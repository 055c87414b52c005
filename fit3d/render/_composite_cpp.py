"""C++ tile compositor (`_composite.cpp`) behind a torch.autograd.Function.

The extension is compiled on first use with `torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja, which gsplat already pulls in; ~1 min once, then cached under ~/.cache/torch_extensions).
If that fails, or for float64/non-CPU tensors, `composite` falls back to the pure-torch compositor
with a one-time warning. Projection stays in torch autograd; only compositing is hand-written.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._composite_torch import composite_torch
from ._project import Intersections


@functools.cache
def _extension() -> ModuleType | None:
    """Build (or load the cached) extension; None when it cannot be built."""
    if os.environ.get("FIT3D_RENDER_NO_CPP"):
        return None
    # importing cpp_extension logs "No CUDA runtime is found" on CPU machines: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("_composite.cpp")
        return load(
            name="fit3d_render_composite",
            sources=[str(src)],
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, build error: stay correct, just slower
        warnings.warn(
            f"fit3d.render: C++ compositor unavailable ({e}); using pure torch", stacklevel=2
        )
        return None


def cpp_available() -> bool:
    """True when the C++ compositor is built and loadable."""
    return _extension() is not None


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, radii, isect, grid, geo_channels):
        ext = _extension()
        out, trans, last = ext.forward(
            means2d, conics, opacities, colors, radii, isect.flatten_ids, isect.offsets, *grid
        )
        ctx.save_for_backward(means2d, conics, opacities, colors, radii, trans, last)
        ctx.isect, ctx.grid, ctx.geo_channels = isect, grid, geo_channels
        return out, (1.0 - trans)[..., None]

    @staticmethod
    def backward(ctx, v_out, v_alpha):
        means2d, conics, opacities, colors, radii, trans, last = ctx.saved_tensors
        isect = ctx.isect
        v_geo, v_col = _extension().backward(
            means2d, conics, opacities, colors, radii, isect.flatten_ids, isect.offsets, trans,
            last, v_out.contiguous(), v_alpha[..., 0].contiguous(), *ctx.grid, ctx.geo_channels,
        )  # fmt: skip
        return v_geo[:, :2], v_geo[:, 2:5], v_geo[:, 5], v_col, None, None, None, None


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
) -> tuple[Tensor, Tensor]:
    """Alpha-composite -> (colours [C, H, W, D], alphas [C, H, W, 1])."""
    fast = means2d.dtype == torch.float32 and means2d.device.type == "cpu"
    if not (fast and _extension() is not None):
        return composite_torch(
            means2d, conics, opacities, colors, isect, n_cams, width, height, geo_channels
        )
    grid = (n_cams, width, height, isect.tiles_x, isect.tiles_y)
    return _Composite.apply(
        means2d.contiguous(), conics.contiguous(), opacities.contiguous(), colors.contiguous(),
        radii.contiguous(), isect, grid, geo_channels,
    )  # fmt: skip
