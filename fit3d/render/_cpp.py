"""CPU kernels (`_project.cpp`, `_composite.cpp`, wrapped for torch by `_bindings.cpp`) behind
torch.autograd.Functions.

The extension is compiled on first use with `torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja, which gsplat already pulls in; ~1-2 min once, then cached under
~/.cache/torch_extensions, keyed by the sources and the target instruction set, and built from a
copy of the sources there, so every checkout on the machine shares the build). The target is
`-march=native` unless FIT3D_RENDER_MARCH names another (`x86-64-v3` = AVX2 + FMA, the kernels an
AVX2-only CPU builds, so an AVX-512 machine can run what an AVX2 one would). If that fails (or
FIT3D_RENDER_NO_CPP=1 is set), and always for float64 or non-CPU tensors, the renderer uses the
pure-torch path instead (a one-time warning says so).

Parallelism: every kernel runs on `torch.get_num_threads()` threads of its own (std::threads taking
tiles or chunks of Gaussians from an atomic counter, see `_kernels.h`), so it uses all cores
whichever OpenMP runtime torch links, and loads none itself.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._project import TILE, Intersections

_SOURCES = ("_bindings.cpp", "_project.cpp", "_composite.cpp")
_HEADERS = ("_kernels.h",)
# -fopenmp-simd only enables `omp simd` pragmas (no runtime); -ffp-contract=fast allows FMAs, which
# -std=c++17 (ISO mode) would otherwise forbid
_CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd"]
MARCH_ENV = "FIT3D_RENDER_MARCH"
"""Environment variable overriding the `-march=` target of the build (default `native`)."""


def _march() -> str:
    return os.environ.get(MARCH_ENV, "").strip() or "native"


def _build_tag() -> str:
    """Short hash of the target instruction set and the kernel sources. With -march=native that
    is this CPU's feature flags, so a cache shared by machines with different CPUs (a cluster home
    directory) does not hand one's build to another; torch's own rebuild check does not look at
    headers."""
    march = _march()
    flags = march
    if march == "native":
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


def _stable_sources(tag: str) -> list[str]:
    """The kernel sources, copied once into `<torch extensions root>/fit3d_src_<tag>/`: the build
    file torch writes names its sources by absolute path, so building from the checkout's own
    files would make every other checkout (a fresh clone, a CI clone) rebuild the cached
    extension (~25 s) even though nothing changed. The tag hashes their content, so the copy is
    written once (to a temporary folder, then renamed) and never differs."""
    from torch.utils.cpp_extension import get_default_build_root

    here = Path(__file__).parent
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's
    folder = Path(root) / f"fit3d_src_{tag}"
    if not all((folder / n).is_file() for n in _SOURCES + _HEADERS):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        for n in _SOURCES + _HEADERS:
            shutil.copyfile(here / n, tmp / n)
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return [str(folder / n) for n in _SOURCES]


@functools.cache
def _extension() -> ModuleType | None:
    """Build (or load the cached) extension; None when it cannot be built."""
    if os.environ.get("FIT3D_RENDER_NO_CPP"):
        return None
    # importing cpp_extension logs "No CUDA runtime is found" on CPU machines: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        tag = _build_tag()
        return load(
            name=f"fit3d_render_cpu_{tag}",
            sources=_stable_sources(tag),
            extra_cflags=[*_CFLAGS, f"-march={_march()}"],
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
        width, height, near, far, eps2d, packed = settings
        means2d, conics, depths, radii, rows, radii_dense = _extension().project_forward(
            means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, packed
        )
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, radii_dense, conics, rows)
        ctx.settings = settings
        ctx.mark_non_differentiable(radii, rows, radii_dense)
        return means2d, conics, depths, radii, rows, radii_dense

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _radii, _rows, _radii_dense):
        means, quats, scales, viewmats, Ks, radii_dense, conics, rows = ctx.saved_tensors
        width, height, _, _, eps2d, packed = ctx.settings
        shape = conics.shape[:-1]
        v_means2d = conics.new_zeros(*shape, 2) if v_means2d is None else v_means2d.contiguous()
        v_conics = torch.zeros_like(conics) if v_conics is None else v_conics.contiguous()
        v_depths = conics.new_zeros(shape) if v_depths is None else v_depths.contiguous()
        v_means, v_quats, v_scales = _extension().project_backward(
            means, quats, scales, viewmats, Ks, width, height, eps2d, radii_dense, conics, rows,
            packed, v_means2d, v_conics, v_depths,
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
    packed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection (rules of `_project.project`) -> means2d, conics, depths, radii, rows.

    Dense (gsplat's non-packed layout): means2d [C, N, 2], conics [C, N, 3], depths [C, N], radii
    [C, N, 2] int32, zero where culled. Packed: the same for the M visible (camera, Gaussian) rows
    only ([M, ...]). rows: [M] int64 visible rows c * N + n, ascending, in both layouts.
    """
    settings = (width, height, float(near_plane), float(far_plane), float(eps2d), packed)
    means2d, conics, depths, radii, rows, _ = _Project.apply(
        means.contiguous(), quats.contiguous(), scales.contiguous(),
        opacities.detach().contiguous(), viewmats.detach().contiguous(), Ks.detach().contiguous(),
        settings,
    )  # fmt: skip
    return means2d, conics, depths, radii, rows


def intersect_tiles(
    means2d: Tensor,  # [C, N, 2] | [M, 2]
    radii: Tensor,  # [C, N, 2] | [M, 2] int32
    depths: Tensor,  # [C, N] | [M]
    rows: Tensor,  # [M]
    packed: bool,
    n_gauss: int,
    n_cams: int,
    width: int,
    height: int,
) -> Intersections:
    """16x16 tile lists, front to back; flatten_ids index the layout's rows (c * N + n when
    dense, packed entries when packed), as gsplat's do."""
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    flat, offsets, per_entry = _extension().intersect_tiles(
        means2d.detach(), radii, depths.detach(), rows, packed, n_gauss, n_cams, tiles_x, tiles_y
    )
    return Intersections(flat, offsets, per_entry, tiles_x, tiles_y)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, means2d, conics, depths, opacities, colors, radii, grow, isect, grid, geo, absgrad
    ):
        out, trans, last, splats = _extension().composite_forward(
            means2d, conics, radii, depths, grow, opacities, colors, isect.flatten_ids,
            isect.offsets, *grid,
        )  # fmt: skip
        ctx.save_for_backward(means2d, conics, depths, opacities, colors, radii, grow, trans, last)
        ctx.splats, ctx.isect, ctx.grid, ctx.geo, ctx.absgrad = splats, isect, grid, geo, absgrad
        ctx.out_shape = out.shape
        return out, (1.0 - trans)[..., None]

    @staticmethod
    def backward(ctx, v_out, v_alpha):
        means2d, conics, depths, opacities, colors, radii, grow, trans, last = ctx.saved_tensors
        isect = ctx.isect
        v_out = trans.new_zeros(ctx.out_shape) if v_out is None else v_out
        v_alpha = trans.new_zeros(trans.shape) if v_alpha is None else v_alpha[..., 0]
        v_m2, v_con, v_z, v_op, v_col, v_abs = _extension().composite_backward(
            means2d, conics, radii, depths, grow, opacities, colors, isect.flatten_ids,
            isect.offsets, *ctx.grid, ctx.geo, ctx.splats, trans, last, v_out.contiguous(),
            v_alpha.contiguous(), ctx.absgrad is not None,
        )  # fmt: skip
        if ctx.absgrad is not None:
            ctx.absgrad(v_abs)
        return v_m2, v_con, v_z, v_op, v_col, None, None, None, None, None, None


def composite(
    means2d: Tensor,  # [R, 2] rows (any leading shape)
    conics: Tensor,  # [R, 3]
    depths: Tensor | None,  # [R]: add the depth channel (last, feeds geometry); None: no depth
    opacities: Tensor,  # [N]
    colors: Tensor,  # [Rc, D] colour table
    radii: Tensor,  # [R, 2] int32
    grow: Tensor | None,  # [R] global row c * N + n of each row; None: the row index itself
    isect: Intersections,
    n_cams: int,
    width: int,
    height: int,
    geo_channels: int,
    absgrad: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite -> (colours [C, H, W, D (+1)], alphas [C, H, W, 1]).

    Row r draws with opacity opacities[g % N] and colour colors[g % Rc], g = grow[r] (or r): the
    tables are read in place, never gathered per row. The first `geo_channels` colour channels
    (and depth) send gradient to geometry. absgrad: called in the backward with the summed
    per-pixel |d loss / d means2d|, shaped like means2d.
    """
    grid = (n_cams, width, height, isect.tiles_x, isect.tiles_y)
    return _Composite.apply(
        means2d.contiguous(), conics.contiguous(),
        None if depths is None else depths.contiguous(), opacities.contiguous(),
        colors.contiguous(), radii.contiguous(), grow, isect, grid, geo_channels, absgrad,
    )  # fmt: skip
