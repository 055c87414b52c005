"""fit3d.render against an independent brute-force renderer, scipy's spherical harmonics, autograd
gradcheck, and gsplat's densification strategies running on CPU renders."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _brute_force_render import render_one

from fit3d.render import rasterization, spherical_harmonics

BACKENDS = ["torch", "torch-python"]
W, H = 40, 30
K1 = torch.tensor([[36.0, 0.0, 20.0], [0.0, 36.0, 15.0], [0.0, 0.0, 1.0]])


def _scene(seed: int, n: int = 40, d: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.7, 0.5, 0.8]) + torch.tensor(
        [0, 0, 3.0]
    )
    return dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.rand(n, 3, generator=g) * 0.12 + 0.01,
        opacities=torch.rand(n, generator=g) * 0.9 + 0.05,
        colors=torch.rand(n, d, generator=g),
    )


def _edge_scene(d: int = 3) -> dict:
    """Behind the camera, beyond far (8 m), partly off-screen, sub-pixel, huge, opaque stacks."""
    rows = [
        # x, y, z, scale, opacity
        (0.0, 0.0, -1.0, 0.2, 0.9),  # behind the camera
        (0.1, 0.1, 0.005, 0.2, 0.9),  # closer than near
        (0.0, 0.0, 10.0, 1.0, 0.9),  # beyond far_plane=8
        (-1.8, 0.0, 3.0, 0.3, 0.8),  # centre left of the image, spills in
        (1.5, 1.3, 3.0, 0.25, 0.7),  # bottom-right corner
        (0.3, -0.2, 2.0, 1e-4, 0.9),  # sub-pixel (eps2d dominates)
        (0.0, 0.0, 6.0, 4.0, 0.5),  # huge: covers the whole image
        (-0.4, 0.2, 2.5, 0.3, 1.0),  # fully opaque stack ...
        (-0.4, 0.2, 2.6, 0.3, 1.0),
        (-0.4, 0.2, 2.7, 0.3, 1.0),
        (0.5, 0.1, 2.2, 0.2, 0.004),  # below 1/255 opacity: culled
        (0.5, 0.3, 4.0, 0.3, 0.3),
    ]
    t = torch.tensor(rows)
    n = t.shape[0]
    g = torch.Generator().manual_seed(3)
    return dict(
        means=t[:, :3],
        quats=torch.randn(n, 4, generator=g),
        scales=t[:, 3:4] * (0.6 + 0.8 * torch.rand(n, 3, generator=g)),
        opacities=t[:, 4],
        colors=torch.rand(n, d, generator=g),
    )


def _cams(n_cams: int) -> tuple[torch.Tensor, torch.Tensor]:
    viewmats = torch.eye(4).repeat(n_cams, 1, 1)
    if n_cams > 1:  # second camera: rotated 10 degrees about y and shifted
        a = math.radians(10)
        viewmats[1, :3, :3] = torch.tensor(
            [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
        )
        viewmats[1, :3, 3] = torch.tensor([0.3, -0.1, 0.2])
    return viewmats, K1.repeat(n_cams, 1, 1)


PARAMS = ("means", "quats", "scales", "opacities", "colors")


def _compare(
    scene: dict,
    backend: str,
    n_cams: int = 1,
    far: float = 1e10,
    size: tuple[int, int] = (W, H),
    Ks: torch.Tensor | None = None,
    **kw,
) -> None:
    """Forward within 1e-4, every gradient within 1e-3 of the float64 brute force."""
    viewmats, Ks1 = _cams(n_cams)
    Ks = Ks1 if Ks is None else Ks
    width, height = size
    ours = [scene[k].clone().requires_grad_(True) for k in PARAMS]
    ref = [scene[k].double().clone().requires_grad_(True) for k in PARAMS]
    img, alpha, _ = rasterization(
        *ours, viewmats, Ks, width, height, far_plane=far, backend=backend, **kw
    )
    ref_img, ref_alpha = [], []
    for c in range(n_cams):
        out, a, _ = render_one(*ref, viewmats[c].double(), Ks[c].double(), width, height, far=far)
        ref_img.append(out)
        ref_alpha.append(a)
    ref_img, ref_alpha = torch.stack(ref_img), torch.stack(ref_alpha)
    assert img.shape == ref_img.shape and alpha.shape == ref_alpha.shape
    assert (img.double() - ref_img).abs().max() < 1e-4
    assert (alpha.double() - ref_alpha).abs().max() < 1e-4
    g = torch.Generator().manual_seed(1)
    g_img, g_alpha = torch.randn(img.shape, generator=g), torch.randn(alpha.shape, generator=g)
    loss = (img * g_img).sum() + (alpha * g_alpha).sum()
    ref_loss = (ref_img * g_img.double()).sum() + (ref_alpha * g_alpha.double()).sum()
    grads = torch.autograd.grad(loss, ours, allow_unused=True)
    if ref_loss.requires_grad:
        ref_grads = torch.autograd.grad(ref_loss, ref, allow_unused=True)
    else:  # nothing visible: every gradient is zero
        ref_grads = [torch.zeros_like(r) for r in ref]
    for name, gr, rg in zip(PARAMS, grads, ref_grads, strict=True):
        gr = torch.zeros_like(rg) if gr is None else gr.double()
        rg = torch.zeros_like(gr) if rg is None else rg
        scale = max(rg.abs().max().item(), 1e-6)
        assert (gr - rg).abs().max().item() / scale < 1e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scenes_match_brute_force(backend: str, seed: int) -> None:
    _compare(_scene(seed), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 3, 64, 65])
def test_edge_cases_and_channel_counts(backend: str, d: int) -> None:
    _compare(_edge_scene(d), backend, far=8.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_cameras_and_dense_scene(backend: str) -> None:
    _compare(_scene(5, n=120, d=8), backend, n_cams=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [3, 40])
def test_gaussians_wider_than_three_tiles(backend: str, d: int) -> None:
    """On 112x80 (7x5 tiles) some Gaussians' boxes span 4+ tiles: the C++ backward sums those
    through per-intersection slots instead of straight into their rows."""
    s = _scene(12, n=60, d=d)
    s["scales"][::4] *= 8.0  # every 4th Gaussian: tens of pixels wide
    Ks = torch.tensor([[100.0, 0.0, 56.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])[None]
    _compare(s, backend, size=(112, 80), Ks=Ks)


def test_cpp_gradients_are_deterministic() -> None:
    """Lock-free accumulation sums in a fixed order: two backwards on several threads agree bit
    for bit (two cameras, so Gaussians collect sums from both; wide ones through slots)."""
    s = _scene(13, n=200, d=5)
    s["scales"][::5] *= 6.0
    viewmats, Ks = _cams(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        grads = []
        for _ in range(2):
            params = [s[k].clone().requires_grad_(True) for k in PARAMS]
            img, alpha, _ = rasterization(*params, viewmats, Ks, W, H, backend="torch")
            g = torch.Generator().manual_seed(2)
            loss = (img * torch.randn(img.shape, generator=g)).sum() + alpha.sum()
            grads.append(torch.autograd.grad(loss, params))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_scene(backend: str) -> None:
    s = _scene(0, n=4)
    s["means"][:, 2] = -2.0  # all behind the camera
    _compare(s, backend)
    z = {k: v[:0] for k, v in s.items()}
    img, alpha, info = rasterization(*(z[k] for k in PARAMS), *_cams(1), W, H, backend=backend)
    assert img.shape == (1, H, W, 3) and img.abs().max() == 0 and alpha.abs().max() == 0
    assert info["radii"].shape == (1, 0, 2)


def test_gradcheck_float64() -> None:
    s = _scene(4, n=5, d=2)
    s["scales"] = s["scales"] * 2
    inputs = [s[k].double().requires_grad_(True) for k in PARAMS]
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = torch.tensor([[10.0, 0, 6], [0, 10.0, 4.5], [0, 0, 1]], dtype=torch.float64)[None]

    def render(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, alpha, _ = rasterization(*args, viewmats, Ks, 12, 9, backend="torch-python")
        return img, alpha

    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["D", "ED", "RGB+D", "RGB+ED"])
def test_depth_modes(backend: str, mode: str) -> None:
    s = _scene(6)
    viewmats, Ks = _cams(1)
    img, alpha, _ = rasterization(*(s[k] for k in PARAMS), viewmats, Ks, W, H, render_mode=mode,
                                  backend=backend)  # fmt: skip
    ref, ref_a, ref_d = render_one(*(s[k].double() for k in PARAMS), viewmats[0].double(),
                                   Ks[0].double(), W, H)  # fmt: skip
    depth = ref_d / ref_a.clamp_min(1e-10) if "ED" in mode else ref_d
    expected = torch.cat([ref, depth], -1) if mode.startswith("RGB") else depth
    assert img.shape == (1, H, W, expected.shape[-1])
    assert (img[0].double() - expected).abs().max() < 1e-4 * max(1.0, depth.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backgrounds(backend: str) -> None:
    s = _scene(7, d=4)
    viewmats, Ks = _cams(2)
    bg = torch.rand(2, 4)
    img, alpha, _ = rasterization(*(s[k] for k in PARAMS), viewmats, Ks, W, H, backgrounds=bg,
                                  backend=backend)  # fmt: skip
    for c in range(2):
        ref, ref_a, _ = render_one(*(s[k].double() for k in PARAMS), viewmats[c].double(),
                                   Ks[c].double(), W, H)  # fmt: skip
        expected = ref + (1 - ref_a) * bg[c].double()
        assert (img[c].double() - expected).abs().max() < 1e-4


def _scipy_real_sh(degree: int, dirs: np.ndarray) -> np.ndarray:
    """gsplat's real SH basis from scipy's complex harmonics (Condon-Shortley phase included)."""
    from scipy.special import sph_harm_y

    d = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    theta = np.arccos(np.clip(d[:, 2], -1, 1))
    phi = np.arctan2(d[:, 1], d[:, 0])
    cols = []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            y = sph_harm_y(l, abs(m), theta, phi)
            cols.append(np.sqrt(2) * (y.imag if m < 0 else y.real) if m != 0 else y.real)
    return np.stack(cols, -1)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_match_scipy(degree: int) -> None:
    dirs = torch.randn(50, 3, dtype=torch.float64) * 3
    coeffs = torch.randn(50, 16, 3, dtype=torch.float64)
    basis = torch.from_numpy(_scipy_real_sh(degree, dirs.numpy()))  # [50, (degree + 1) ** 2]
    expected = (basis[..., None] * coeffs[:, : (degree + 1) ** 2]).sum(1)
    assert torch.allclose(spherical_harmonics(degree, dirs, coeffs), expected, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_colours_in_rasterization(backend: str, degree: int) -> None:
    s = _scene(8)
    sh = torch.randn(s["means"].shape[0], 16, 3) * 0.4
    viewmats, Ks = _cams(2)
    img, _, _ = rasterization(*(s[k] for k in PARAMS[:4]), sh, viewmats, Ks, W, H,
                              sh_degree=degree, backend=backend)  # fmt: skip
    for c in range(2):
        campos = torch.linalg.inv(viewmats[c].double())[:3, 3]
        basis = torch.from_numpy(_scipy_real_sh(degree, (s["means"].double() - campos).numpy()))
        rgb = ((basis[..., None] * sh.double()[:, : (degree + 1) ** 2]).sum(1) + 0.5).clamp_min(0)
        ref, _, _ = render_one(*(s[k].double() for k in PARAMS[:4]), rgb, viewmats[c].double(),
                               Ks[c].double(), W, H)  # fmt: skip
        assert (img[c].double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometry_grad_channels(backend: str) -> None:
    s = _scene(9, d=67)  # RGB + 64 features
    viewmats, Ks = _cams(1)
    params = [s[k].clone().requires_grad_(True) for k in PARAMS]
    img, _, info = rasterization(*params, viewmats, Ks, W, H, backend=backend,
                                 geometry_grad_channels=3)  # fmt: skip
    # a feature-only loss reaches colours but not geometry (nor means2d), exactly
    torch.autograd.backward(img[..., 3:].square().sum())
    for p in params[:4]:
        assert p.grad is not None and p.grad.abs().max() == 0
    assert info["means2d"].grad.abs().max() == 0
    assert params[4].grad[:, 3:].abs().max() > 0
    # an RGB loss gives the geometry gradient of rendering RGB alone (brute force)
    for p in params:
        p.grad = None
    img, _, _ = rasterization(*params, viewmats, Ks, W, H, backend=backend,
                              geometry_grad_channels=3)  # fmt: skip
    g = torch.randn(img.shape)
    torch.autograd.backward((img * g).sum())
    ref = [s[k].double().requires_grad_(True) for k in PARAMS]
    out, _, _ = render_one(*ref[:4], ref[4][:, :3], viewmats[0].double(), Ks[0].double(), W, H)
    feat, _, _ = render_one(*(r.detach() for r in ref[:4]), ref[4][:, 3:], viewmats[0].double(),
                            Ks[0].double(), W, H)  # fmt: skip
    ((out * g[0, ..., :3].double()).sum() + (feat * g[0, ..., 3:].double()).sum()).backward()
    for p, r in zip(params, ref, strict=True):
        assert (p.grad.double() - r.grad).abs().max() / r.grad.abs().max() < 1e-3


def test_info_layout_and_radii() -> None:
    s = _scene(10)
    viewmats, Ks = _cams(2)
    args = [s[k].requires_grad_(True) for k in PARAMS]
    img, _, info = rasterization(*args, viewmats, Ks, W, H)
    _, _, packed = rasterization(*args, viewmats, Ks, W, H, packed=True)
    n = s["means"].shape[0]
    assert info["radii"].shape == (2, n, 2) and info["radii"].dtype == torch.int32
    assert info["means2d"].shape == (2, n, 2) and info["n_cameras"] == 2
    assert (info["width"], info["height"]) == (W, H)
    visible = (info["radii"] > 0).all(-1)
    cam, gid = packed["camera_ids"], packed["gaussian_ids"]
    assert torch.equal(visible.nonzero().T, torch.stack([cam, gid]))
    assert torch.equal(info["radii"][cam, gid], packed["radii"])
    # radius = ceil(min(3.33, sqrt(2 ln(255 o))) * sqrt(cov2d_ii)), cov2d = inverse of the conic
    conic = packed["conics"].double()
    det = conic[:, 0] * conic[:, 2] - conic[:, 1] ** 2
    cov_xx, cov_yy = conic[:, 2] / det, conic[:, 0] / det
    k = torch.sqrt(2 * torch.log(255 * s["opacities"][gid].double())).clamp_max(3.33)
    expected = torch.stack([torch.ceil(k * cov_xx.sqrt()), torch.ceil(k * cov_yy.sqrt())], -1)
    assert torch.equal(packed["radii"].double(), expected)
    img.sum().backward()
    assert info["means2d"].grad is not None and info["means2d"].grad.abs().sum() > 0


def _strategy_setup(n: int = 300):
    s = _scene(11, n=n)
    params = torch.nn.ParameterDict(
        {
            "means": s["means"],
            "quats": s["quats"],
            "scales": torch.log(s["scales"]),
            "opacities": torch.logit(s["opacities"]),
            "colors": s["colors"],
            "features": torch.zeros(n, 8),
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    return params, optimizers


def _render_params(params, packed: bool, absgrad: bool = False):
    viewmats, Ks = _cams(1)
    colors = torch.cat([params["colors"], params["features"]], -1)
    return rasterization(
        params["means"], params["quats"], torch.exp(params["scales"]),
        torch.sigmoid(params["opacities"]), colors, viewmats, Ks, W, H, packed=packed,
        geometry_grad_channels=3, absgrad=absgrad,
    )  # fmt: skip


@pytest.mark.parametrize("packed,absgrad", [(False, False), (True, False), (False, True)])
def test_default_strategy_densifies_cpu_renders(packed: bool, absgrad: bool) -> None:
    from gsplat.strategy import DefaultStrategy

    params, optimizers = _strategy_setup()
    strategy = DefaultStrategy(
        refine_start_iter=2, refine_every=2, reset_every=1000, grow_grad2d=1e-9, prune_opa=0.0,
        absgrad=absgrad,
    )  # fmt: skip
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    n0 = params["means"].shape[0]
    target = torch.rand(1, H, W, 11)
    for step in range(5):
        img, _, info = _render_params(params, packed, absgrad)
        strategy.step_pre_backward(params, optimizers, state, step, info)
        (img - target).abs().mean().backward()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=packed)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    n1 = params["means"].shape[0]
    assert n1 > n0  # duplicated/split Gaussians carry every parameter, features included
    assert all(p.shape[0] == n1 for p in params.values())
    assert state["grad2d"] is None or state["grad2d"].shape[0] == n1


def test_mcmc_strategy_needs_cuda_for_relocation() -> None:
    """MCMC's pre-backward hook works on CPU renders; its post-backward noise injection and
    relocation call gsplat CUDA ops (quat_scale_to_covar_preci, compute_relocation)."""
    from gsplat.strategy import MCMCStrategy

    params, optimizers = _strategy_setup()
    strategy = MCMCStrategy(refine_start_iter=0, refine_every=1, verbose=False)
    state = strategy.initialize_state()
    img, _, info = _render_params(params, packed=False)
    strategy.step_pre_backward(params, optimizers, state, 0, info)
    img.mean().backward()
    assert params["means"].grad is not None and params["means"].grad.abs().sum() > 0
    with pytest.raises(Exception):  # noqa: B017 - gsplat raises from its missing CUDA kernels
        strategy.step_post_backward(params, optimizers, state, 1, info, lr=1e-3)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpp_kernels_build_where_a_compiler_exists() -> None:
    """Otherwise the `torch` backend tests above would silently exercise the fallback."""
    from fit3d.render import _cpp

    assert _cpp.usable(torch.zeros(1))


@pytest.mark.parametrize("packed", [False, True])
def test_absgrad_matches_per_pixel_sum(packed: bool) -> None:
    """One Gaussian, loss = sum of alphas: each pixel adds |alpha_p (a dx + b dy)| (x) and
    |alpha_p (b dx + c dy)| (y), dx = mean - pixel centre."""
    s = _edge_scene()
    one = [s[k][4:5].clone().requires_grad_(True) for k in PARAMS]  # partly off-screen
    _, alpha, info = rasterization(*one, *_cams(1), W, H, packed=packed, absgrad=True)
    alpha.sum().backward()
    m2d = info["means2d"]
    absgrad = m2d.absgrad.reshape(-1, 2)[0].double()
    a, b, c = info["conics"].reshape(-1, 3)[0].double()
    mx, my = m2d.reshape(-1, 2)[0].detach().double()
    o = s["opacities"][4].double()
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    dx, dy = mx - xs.double(), my - ys.double()
    al = o * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
    al = torch.where(al >= 1 / 255, al, 0.0)
    expected = torch.stack(
        [(al * (a * dx + b * dy)).abs().sum(), (al * (b * dx + c * dy)).abs().sum()]
    )
    assert torch.allclose(absgrad, expected, rtol=1e-4)
    assert (absgrad >= m2d.grad.reshape(-1, 2)[0].abs().double() - 1e-6).all()


def test_kernel_build_target_is_overridable_and_cached_apart(monkeypatch):
    """FIT3D_RENDER_MARCH picks the C++ kernels' -march (an AVX-512 machine builds what an AVX2
    one would); each target has its own build name, so neither build replaces the other."""
    from fit3d.render import _cpp

    monkeypatch.delenv(_cpp.MARCH_ENV, raising=False)
    native = _cpp._build_tag()
    assert _cpp._march() == "native"
    monkeypatch.setenv(_cpp.MARCH_ENV, "x86-64-v3")
    avx2 = _cpp._build_tag()
    assert _cpp._march() == "x86-64-v3"
    monkeypatch.setenv(_cpp.MARCH_ENV, "x86-64-v2")
    assert len({native, avx2, _cpp._build_tag()}) == 3


def test_kernel_sources_build_from_one_copy_outside_the_checkout(monkeypatch, tmp_path):
    """The build names its sources by path: they are copied once per content tag into the
    extensions root, so another checkout of the same sources reuses the cached build."""
    from fit3d.render import _cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = _cpp._stable_sources("abc123")
    assert [Path(p).parent for p in first] == [tmp_path / "fit3d_src_abc123"] * len(first)
    here = Path(_cpp.__file__).parent
    for name in _cpp._SOURCES + _cpp._HEADERS:
        assert (tmp_path / "fit3d_src_abc123" / name).read_bytes() == (here / name).read_bytes()
    stamp = (tmp_path / "fit3d_src_abc123" / _cpp._SOURCES[0]).stat().st_mtime_ns
    assert _cpp._stable_sources("abc123") == first  # the copy is reused, not rewritten
    assert (tmp_path / "fit3d_src_abc123" / _cpp._SOURCES[0]).stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
