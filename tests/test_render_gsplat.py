"""The `gsplat` backend of fit3d.render: its two-pass geometry/feature split, background handling,
channel order and argument passing, on CPU with `gsplat.rasterization` replaced by a stand-in with
gsplat 1.5.3's semantics (our CPU rasteriser called the way gsplat's `rasterization` behaves);
and, marked `gpu` (skipped without CUDA), the real gsplat against our CPU backend."""

from __future__ import annotations

import inspect

import gsplat
import pytest
import torch
from _brute_force_render import render_one
from test_render import PARAMS, H, W, _cams, _scene

from fit3d.render import rasterization

MODES = ["RGB", "D", "ED", "RGB+D", "RGB+ED"]
GEOMETRY = PARAMS[:4]  # means, quats, scales, opacities


def gsplat_stand_in(
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4]
    scales: torch.Tensor,  # [N, 3]
    opacities: torch.Tensor,  # [N]
    colors: torch.Tensor,  # [(C,) N, D] | [(C,) N, K, 3]
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: torch.Tensor | None = None,  # [C, D]
    render_mode: str = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    channel_chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """gsplat 1.5.3's `rasterization` (no batch dimensions) on CPU: its defaults (packed=True),
    its shape assertions, its refusal of 0 or > 513 rendered channels, then our CPU renderer."""
    n, n_cams = means.shape[0], viewmats.shape[0]
    assert means.shape == (n, 3) and quats.shape == (n, 4) and scales.shape == (n, 3)
    assert opacities.shape == (n,) and Ks.shape == (n_cams, 3, 3)
    assert (radius_clip, tile_size, rasterize_mode, sparse_grad) == (0.0, 16, "classic", False)
    d = 3 if sh_degree is not None else colors.shape[-1]
    with_rgb = render_mode in ("RGB", "RGB+D", "RGB+ED")
    channels = (d if with_rgb else 0) + (render_mode != "RGB")
    if backgrounds is not None and with_rgb:  # gsplat pads the depth channel's background itself
        assert backgrounds.shape == (n_cams, d), backgrounds.shape
    if channels == 0 or channels > 513:  # rasterize_to_pixels
        raise ValueError(f"Unsupported number of color channels: {channels}")
    if absgrad and channels > channel_chunk:  # gsplat keeps one chunk's absgrad: not modelled
        raise AssertionError("stand-in: absgrad over several channel chunks")
    STAND_IN_CALLS.append(
        dict(packed=packed, render_mode=render_mode, absgrad=absgrad, channels=channels,
             geometry_grad=[t.requires_grad for t in (means, quats, scales, opacities)])
    )  # fmt: skip
    return rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
        packed=packed, backgrounds=backgrounds, render_mode=render_mode, absgrad=absgrad,
        backend="torch",
    )  # fmt: skip


STAND_IN_CALLS: list[dict] = []


@pytest.fixture(autouse=True)
def _stand_in(monkeypatch, request) -> None:
    """Every CPU test here renders through the stand-in; gpu tests keep the real gsplat."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(gsplat, "rasterization", gsplat_stand_in)
    STAND_IN_CALLS.clear()


def _inputs(seed: int, d: int, n_cams: int = 2, per_cam: bool = False) -> dict:
    """Leaf parameters of a random scene (per-camera colours optional) and its cameras."""
    s = _scene(seed, n=60, d=d)
    if per_cam:
        g = torch.Generator().manual_seed(seed + 100)
        s["colors"] = torch.rand(n_cams, s["means"].shape[0], d, generator=g)
    params = {k: s[k].clone().requires_grad_(True) for k in PARAMS}
    viewmats, Ks = _cams(n_cams)
    return dict(params=params, viewmats=viewmats, Ks=Ks)


def _render(x: dict, backend: str, colors: torch.Tensor | None = None, **kw):
    p = x["params"]
    c = p["colors"] if colors is None else colors
    return rasterization(
        *(p[k] for k in GEOMETRY), c, x["viewmats"], x["Ks"], W, H, backend=backend, **kw
    )


def _weights(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _grads(x: dict, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every parameter (zeros where none arrives)."""
    p = x["params"]
    got = torch.autograd.grad(loss, list(p.values()), allow_unused=True, retain_graph=True)
    return {k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(p, got, strict=True)}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.detach().abs().max())))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("per_cam", [False, True])
def test_split_render_equals_one_render(mode: str, packed: bool, per_cam: bool) -> None:
    """Features rendered on detached geometry: the same pixels and alphas as one render of all
    channels (gsplat, no split) and as the CPU backend's one-pass split."""
    x = _inputs(0, 8, per_cam=per_cam)
    bg = torch.rand(2, 8)
    kw = dict(render_mode=mode, packed=packed, backgrounds=bg)
    split, split_a, split_info = _render(x, "gsplat", geometry_grad_channels=3, **kw)
    whole, whole_a, _ = _render(x, "gsplat", **kw)
    cpu, cpu_a, _ = _render(x, "torch", geometry_grad_channels=3, **kw)
    d_out = {"RGB": 8, "D": 1, "ED": 1}.get(mode, 9)
    assert split.shape == whole.shape == (2, H, W, d_out)
    assert _close(split, whole) and _close(split_a, whole_a)
    assert _close(split, cpu) and _close(split_a, cpu_a)
    assert (split_info["camera_ids"] is not None) == packed


@pytest.mark.parametrize("mode", ["RGB", "RGB+D", "RGB+ED"])
@pytest.mark.parametrize("packed", [False, True])
def test_split_geometry_gradients_equal_the_rgb_only_render(mode: str, packed: bool) -> None:
    """A loss on every channel and the alphas: geometry (and means2d) gradients equal those of
    rendering the first k channels (and depth) alone; every gradient equals the CPU backend's."""
    x = _inputs(1, 8)
    bg = torch.rand(2, 8)
    kw = dict(render_mode=mode, packed=packed)
    img, alpha, info = _render(x, "gsplat", geometry_grad_channels=3, backgrounds=bg, **kw)
    w, w_a = _weights(img.shape), _weights(alpha.shape, 8)
    g_split = _grads(x, (img * w).sum() + (alpha * w_a).sum())
    m2d_split = torch.autograd.grad((img * w).sum() + (alpha * w_a).sum(), info["means2d"])[0]

    rgb, rgb_a, rgb_info = gsplat_stand_in(
        *(x["params"][k] for k in GEOMETRY), x["params"]["colors"][:, :3], x["viewmats"],
        x["Ks"], W, H, backgrounds=bg[:, :3], **kw,
    )  # fmt: skip
    w_rgb = torch.cat([w[..., :3], w[..., 8:]], -1)  # RGB weights, then the depth weight
    loss_rgb = (rgb * w_rgb).sum() + (rgb_a * w_a).sum()
    g_rgb = _grads(x, loss_rgb)
    m2d_rgb = torch.autograd.grad(loss_rgb, rgb_info["means2d"])[0]
    for k in GEOMETRY:
        assert _close(g_split[k], g_rgb[k]), k
    assert _close(m2d_split, m2d_rgb)

    cpu, cpu_a, _ = _render(x, "torch", geometry_grad_channels=3, backgrounds=bg, **kw)
    g_cpu = _grads(x, (cpu * w).sum() + (cpu_a * w_a).sum())
    for k in PARAMS:
        assert _close(g_split[k], g_cpu[k]), k


@pytest.mark.parametrize("mode", ["RGB", "RGB+ED"])
@pytest.mark.parametrize("packed", [False, True])
def test_feature_gradients_reach_features_and_nothing_else(mode: str, packed: bool) -> None:
    x = _inputs(2, 8, per_cam=True)
    bg = torch.rand(2, 8)
    img, _, info = _render(
        x, "gsplat", geometry_grad_channels=3, backgrounds=bg, render_mode=mode, packed=packed
    )
    w = _weights(img[..., 3:8].shape)
    loss = (img[..., 3:8] * w).sum()
    g = _grads(x, loss)
    for k in GEOMETRY:
        assert g[k].abs().max() == 0, k
    m2d = torch.autograd.grad(loss, info["means2d"], allow_unused=True)[0]
    assert m2d is None or m2d.abs().max() == 0
    assert g["colors"][..., :3].abs().max() == 0
    # the features' own gradient: that of rendering them alone
    feat, _, _ = gsplat_stand_in(
        *(x["params"][k] for k in GEOMETRY), x["params"]["colors"][..., 3:], x["viewmats"],
        x["Ks"], W, H, backgrounds=bg[:, 3:], packed=packed,
    )  # fmt: skip
    ref = torch.autograd.grad((feat * w).sum(), x["params"]["colors"])[0]
    assert g["colors"][..., 3:].abs().max() > 0 and _close(g["colors"], ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k", [None, 0, 3])
def test_channel_order_and_backgrounds(mode: str, packed: bool, k: int | None) -> None:
    """Uniform colours c_j and backgrounds b_j give alpha c_j + (1 - alpha) b_j in channel j
    (analytic); the depth channel comes last and equals gsplat's "D"/"ED" render."""
    x = _inputs(3, 6)
    c = torch.linspace(0.1, 0.6, 6)
    colors = c.expand(60, 6).clone()  # [N, 6]
    bg = torch.stack([torch.linspace(1.0, 2.0, 6), torch.linspace(3.0, 4.0, 6)])  # [2, 6]
    img, alpha, _ = _render(
        x, "gsplat", colors, geometry_grad_channels=k, backgrounds=bg, render_mode=mode,
        packed=packed,
    )  # fmt: skip
    expect = []
    if mode in ("RGB", "RGB+D", "RGB+ED"):
        expect.append(alpha * c + (1 - alpha) * bg[:, None, None, :])  # [2, H, W, 6]
    if mode != "RGB":
        depth_mode = "ED" if "ED" in mode else "D"
        depth, _, _ = gsplat_stand_in(
            *(x["params"][q] for q in GEOMETRY), colors, x["viewmats"], x["Ks"], W, H,
            render_mode=depth_mode,
        )  # fmt: skip
        expect.append(depth)
    expected = torch.cat(expect, -1)
    assert img.shape == expected.shape
    assert _close(img, expected)
    assert 0 < float(alpha.detach().mean()) < 1  # a scene with covered and uncovered pixels


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "RGB+D"])
def test_absgrad_comes_from_the_geometry_channels(packed: bool, mode: str) -> None:
    x = _inputs(4, 8)
    img, _, info = _render(
        x, "gsplat", geometry_grad_channels=3, render_mode=mode, packed=packed, absgrad=True
    )
    w = _weights(img.shape)
    (img * w).sum().backward()
    rgb, _, rgb_info = gsplat_stand_in(
        *(x["params"][k].detach().requires_grad_(True) for k in GEOMETRY),
        x["params"]["colors"][:, :3], x["viewmats"], x["Ks"], W, H, render_mode=mode,
        packed=packed, absgrad=True,
    )  # fmt: skip
    (rgb * torch.cat([w[..., :3], w[..., 8:]], -1)).sum().backward()
    assert info["means2d"].absgrad.abs().max() > 0
    assert _close(info["means2d"].absgrad, rgb_info["means2d"].absgrad)
    cpu, _, cpu_info = _render(
        x, "torch", geometry_grad_channels=3, render_mode=mode, packed=packed, absgrad=True
    )
    (cpu * w).sum().backward()
    assert _close(info["means2d"].absgrad, cpu_info["means2d"].absgrad)


@pytest.mark.parametrize("k", [0, 1])
def test_sh_colours_split_like_the_cpu_backend(k: int) -> None:
    """With SH colours and k < 3 the split acts on the evaluated RGB, as on CPU."""
    x = _inputs(5, 3)
    sh = (torch.randn(60, 4, 3) * 0.4).requires_grad_(True)
    kw = dict(sh_degree=1, geometry_grad_channels=k, backgrounds=torch.rand(2, 3))
    img, alpha, _ = _render(x, "gsplat", sh, **kw)
    cpu, cpu_a, _ = _render(x, "torch", sh, **kw)
    assert _close(img, cpu) and _close(alpha, cpu_a)
    w = _weights(img.shape)
    loss, cpu_loss = (img * w).sum() + alpha.sum(), (cpu * w).sum() + cpu_a.sum()
    g, g_cpu = _grads(x, loss), _grads(x, cpu_loss)
    for name in GEOMETRY:
        assert _close(g[name], g_cpu[name]), name
    assert _close(torch.autograd.grad(loss, sh)[0], torch.autograd.grad(cpu_loss, sh)[0])
    assert len(STAND_IN_CALLS) == 2 and STAND_IN_CALLS[1]["geometry_grad"] == [False] * 4


def test_zero_geometry_channels_render_a_placeholder() -> None:
    """k=0 in "RGB": gsplat refuses zero channels, so the geometry pass renders one constant
    channel; colours then never reach geometry, the alphas still do (as on CPU)."""
    x = _inputs(6, 4)
    img, alpha, _ = _render(x, "gsplat", geometry_grad_channels=0)
    cpu, cpu_a, _ = _render(x, "torch", geometry_grad_channels=0)
    assert img.shape == (2, H, W, 4) and _close(img, cpu) and _close(alpha, cpu_a)
    assert [c["channels"] for c in STAND_IN_CALLS] == [1, 4]
    g_colours = _grads(x, (img * _weights(img.shape)).sum())
    assert all(g_colours[k].abs().max() == 0 for k in GEOMETRY)
    g_alpha, g_alpha_cpu = _grads(x, alpha.square().sum()), _grads(x, cpu_a.square().sum())
    for k in GEOMETRY:
        assert g_alpha[k].abs().max() > 0 and _close(g_alpha[k], g_alpha_cpu[k]), k


def test_passes_and_defaults_reach_gsplat_explicitly() -> None:
    """Our packed=False default overrides gsplat's True; the feature pass gets detached geometry,
    "RGB" mode and no absgrad; depth-only modes render once."""
    x = _inputs(7, 8)
    _, _, info = _render(x, "gsplat", geometry_grad_channels=3, render_mode="RGB+D", absgrad=True)
    assert info["radii"].shape == (2, 60, 2) and info["camera_ids"] is None
    geo, feat = STAND_IN_CALLS
    assert geo == dict(packed=False, render_mode="RGB+D", absgrad=True, channels=4,
                       geometry_grad=[True] * 4)  # fmt: skip
    assert feat == dict(packed=False, render_mode="RGB", absgrad=False, channels=5,
                        geometry_grad=[False] * 4)  # fmt: skip
    STAND_IN_CALLS.clear()
    _, _, packed = _render(x, "gsplat", packed=True)
    assert packed["radii"].shape[0] == packed["camera_ids"].shape[0] and len(STAND_IN_CALLS) == 1
    for mode in ("D", "ED"):
        STAND_IN_CALLS.clear()
        img, _, _ = _render(x, "gsplat", geometry_grad_channels=3, render_mode=mode)
        assert img.shape == (2, H, W, 1) and len(STAND_IN_CALLS) == 1


def test_gsplat_only_arguments_are_forwarded(monkeypatch) -> None:
    seen: list[dict] = []

    def record(*args, **kw):
        seen.append(kw)
        cpu = dict(radius_clip=0.0, tile_size=16, rasterize_mode="classic", sparse_grad=False)
        return gsplat_stand_in(*args, **{**kw, **cpu})

    monkeypatch.setattr(gsplat, "rasterization", record)
    knobs = dict(radius_clip=0.5, tile_size=8, rasterize_mode="antialiased", channel_chunk=4,
                 sparse_grad=True, near_plane=0.2, far_plane=50.0, eps2d=0.1)  # fmt: skip
    _render(_inputs(8, 8), "gsplat", geometry_grad_channels=3, packed=True, **knobs)
    assert len(seen) == 2
    for kw in seen:
        assert {k: kw[k] for k in ("radius_clip", "tile_size", "rasterize_mode", "channel_chunk",
                                   "near_plane", "far_plane", "eps2d")} == {
            k: v for k, v in knobs.items() if k != "sparse_grad"
        }  # fmt: skip
        assert kw["packed"] is True
    assert seen[0]["sparse_grad"] is True and seen[1].get("sparse_grad", False) is False


def test_means2d_gradient_is_retained_on_the_gsplat_path(monkeypatch) -> None:
    """gsplat returns means2d as a non-leaf without retain_grad; ours retains it (as on CPU),
    so densification can read `info["means2d"].grad` without a strategy hook."""

    def bare(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw):
        means2d = (means[None, :, :2] * 10.0).expand(viewmats.shape[0], -1, -1)  # [C, N, 2]
        value = means2d.sum() + opacities.sum() + colors.sum()
        img = value * torch.ones(viewmats.shape[0], height, width, colors.shape[-1])
        return img, torch.ones(viewmats.shape[0], height, width, 1), {"means2d": means2d}

    monkeypatch.setattr(gsplat, "rasterization", bare)
    x = _inputs(9, 3)
    img, _, info = _render(x, "gsplat")
    img.sum().backward()
    assert info["means2d"].grad is not None
    assert torch.all(info["means2d"].grad == 2 * H * W * 3)  # every pixel of C=2 images, D=3


def test_signature_follows_gsplat() -> None:
    """gsplat's arguments in gsplat's order and defaults (but packed=False), ours keyword-only;
    the stand-in has gsplat's own defaults."""
    from gsplat.rendering import rasterization as real_rasterization  # not the stand-in

    real = list(inspect.signature(real_rasterization).parameters.values())
    ours = list(inspect.signature(rasterization).parameters.values())
    stand_in = list(inspect.signature(gsplat_stand_in).parameters.values())
    shared = [p.name for p in ours if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert shared == [p.name for p in real[: len(shared)]] == [p.name for p in stand_in]
    assert shared[-1] == "channel_chunk"
    for a, b, s in zip(ours, real, stand_in, strict=False):
        assert s.default == b.default, a.name
        if a.name != "packed":
            assert a.default == b.default, a.name
    assert real[shared.index("packed")].default is True
    keyword_only = [p.name for p in ours if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["backend", "geometry_grad_channels"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(radius_clip=1.0),
        dict(tile_size=8),
        dict(rasterize_mode="antialiased"),
        dict(sparse_grad=True),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "torch-python"])
def test_cpu_backends_refuse_gsplat_only_arguments(kw: dict, backend: str) -> None:
    x = _inputs(10, 3)
    (name,) = kw
    with pytest.raises(ValueError, match=f"{name}=.*gsplat backend"):
        _render(x, backend, **kw)


@pytest.mark.parametrize("backend", ["torch", "gsplat"])
def test_bad_arguments_raise_on_every_backend(backend: str) -> None:
    x = _inputs(11, 3)
    p = x["params"]
    with pytest.raises(ValueError, match="batch dimensions"):
        rasterization(
            *(p[k][None] for k in PARAMS), x["viewmats"][None], x["Ks"][None], W, H,
            backend=backend,
        )  # fmt: skip
    bad = [
        (dict(channel_chunk=0), "channel_chunk"),
        (dict(geometry_grad_channels=-1), "geometry_grad_channels"),
        (dict(rasterize_mode="fast"), "rasterize_mode"),
        (dict(render_mode="RGBD"), "render_mode"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            _render(x, backend, **kw)
    with pytest.raises(TypeError):  # gsplat arguments beyond channel_chunk are not taken
        _render(x, backend, camera_model="fisheye")
    assert STAND_IN_CALLS == []


def test_camera_gradients_on_cpu_like_gsplat() -> None:
    """gsplat differentiates through viewmats; so does the torch backend (brute force reference),
    and the other gradients stay those of fixed cameras."""
    s = _scene(12, n=30, d=3)
    viewmats, Ks = _cams(2)
    viewmats = viewmats[1:].clone().requires_grad_(True)  # the rotated, shifted camera
    params = [s[k].clone().requires_grad_(True) for k in PARAMS]
    img, alpha, _ = rasterization(*params, viewmats, Ks[:1], W, H, backend="torch")
    w = _weights(img.shape)
    grads = torch.autograd.grad((img * w).sum() + alpha.sum(), [*params, viewmats])
    ref = [s[k].double().requires_grad_(True) for k in PARAMS]
    ref_view = viewmats.detach()[0].double().requires_grad_(True)
    out, a, _ = render_one(*ref, ref_view, Ks[0].double(), W, H)
    ref_grads = torch.autograd.grad((out * w[0].double()).sum() + a.sum(), [*ref, ref_view])
    grads = [*grads[:-1], grads[-1][0]]  # viewmats: [1, 4, 4] -> [4, 4]
    for name, g, r in zip([*PARAMS, "viewmats"], grads, ref_grads, strict=True):
        scale = float(r.abs().max())
        assert scale > 0 and float((g.double() - r).abs().max()) < 1e-3 * scale, name


# --- GPU: the real gsplat against our CPU backend -------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_scene(seed: int, n: int, width: int, height: int, d: int) -> dict:
    """n Gaussians spread over the view of two cameras (1 to ~20 px footprints), d channels."""
    g = torch.Generator().manual_seed(seed)
    f = 0.9 * width
    z = 2.0 + 4.0 * torch.rand(n, generator=g)  # [N]
    u = (torch.rand(n, generator=g) * 1.2 - 0.1) * width
    v = (torch.rand(n, generator=g) * 1.2 - 0.1) * height
    means = torch.stack([(u - width / 2) / f * z, (v - height / 2) / f * z, z], -1)  # [N, 3]
    log_scale = torch.empty(n, 3).uniform_(-5.3, -2.8, generator=g)  # 5 mm to 6 cm
    viewmats, _ = _cams(2)
    Ks = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]).repeat(2, 1, 1)
    return dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=log_scale.exp(),
        opacities=torch.rand(n, generator=g) * 0.9 + 0.05,
        colors=torch.rand(n, d, generator=g),
        viewmats=viewmats,
        Ks=Ks,
        backgrounds=torch.rand(2, d, generator=g),
    )


def _on(scene: dict, device: str) -> tuple[dict, dict]:
    """(leaf parameters, cameras) of a scene on a device."""
    params = {k: scene[k].detach().to(device).clone().requires_grad_(True) for k in PARAMS}
    cams = {k: scene[k].to(device) for k in ("viewmats", "Ks", "backgrounds")}
    return params, cams


def _dense(info: dict, values: torch.Tensor, n: int) -> torch.Tensor:
    """[C, N, ...] from info's dense or packed [nnz, ...] layout (packed row order may differ)."""
    if info["camera_ids"] is None:
        return values
    out = values.new_zeros((info["n_cameras"], n, *values.shape[1:]))
    out[info["camera_ids"].long(), info["gaussian_ids"].long()] = values
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# (n, width, height, channels, geometry_grad_channels, packed, render_mode, backgrounds)
GPU_CASES = [
    (300, 64, 48, 3, None, False, "RGB", False),
    (300, 64, 48, 3, None, True, "RGB+D", True),
    (3000, 160, 120, 64, None, False, "RGB", True),
    (3000, 160, 120, 67, 3, False, "RGB", False),
    (3000, 160, 120, 67, 3, True, "RGB+ED", True),
    (20000, 320, 240, 3, None, False, "RGB", False),
    (20000, 320, 240, 67, 3, True, "RGB+D", True),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,width,height,d,k,packed,mode,with_bg", GPU_CASES)
def test_gpu_gsplat_matches_the_cpu_backend(
    n: int, width: int, height: int, d: int, k: int | None, packed: bool, mode: str,
    with_bg: bool,
) -> None:  # fmt: skip
    """Same random scene on both: pixels within 1e-4 (of max(1, |value|)), every gradient and
    means2d's (and absgrad where gsplat computes it over all geometry channels) within 1e-3
    relative (L2)."""
    scene = _gpu_scene(n + d, n, width, height, d)
    geo_channels = (d if k is None else k) * (mode != "D") + (mode != "RGB")
    absgrad = geo_channels <= 32  # gsplat keeps one channel chunk's absgrad beyond that
    out = {}
    for device, backend in (("cpu", "torch"), ("cuda", "gsplat")):
        params, cams = _on(scene, device)
        img, alpha, info = rasterization(
            *params.values(), cams["viewmats"], cams["Ks"], width, height,
            backgrounds=cams["backgrounds"] if with_bg else None, render_mode=mode,
            packed=packed, absgrad=absgrad, backend=backend, geometry_grad_channels=k,
        )  # fmt: skip
        w = _weights(img.shape).to(device)
        w_a = _weights(alpha.shape, 8).to(device)
        ((img * w).sum() + (alpha * w_a).sum()).backward()
        m2d = info["means2d"]
        out[backend] = dict(
            img=img.detach().cpu(), alpha=alpha.detach().cpu(),
            grads={k_: p.grad.cpu() for k_, p in params.items()},
            means2d=_dense(info, m2d.grad, n).cpu(),
            absgrad=_dense(info, m2d.absgrad, n).cpu() if absgrad else None,
        )  # fmt: skip
    cpu, gpu = out["torch"], out["gsplat"]
    assert 0 < float(cpu["alpha"].mean()) < 1
    for name in ("img", "alpha"):
        diff = (gpu[name] - cpu[name]).abs()
        tol = 1e-4 * max(1.0, float(cpu[name].abs().max()))
        # __expf (CUDA) and expf may put a rare alpha on the other side of 1/255
        assert int((diff > tol).sum()) <= max(2, diff.numel() // 100_000), (name, diff.max())
    for name, grad in cpu["grads"].items():
        assert _rel(gpu["grads"][name], grad) < 1e-3, name
    assert _rel(gpu["means2d"], cpu["means2d"]) < 1e-3
    if absgrad:
        assert _rel(gpu["absgrad"], cpu["absgrad"]) < 1e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["RGB", "RGB+D"])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_feature_loss_gives_exactly_zero_geometry_gradient(mode: str, packed: bool) -> None:
    scene = _gpu_scene(0, 2000, 128, 96, 67)
    params, cams = _on(scene, "cuda")
    img, _, info = rasterization(
        *params.values(), cams["viewmats"], cams["Ks"], 128, 96, render_mode=mode, packed=packed,
        backgrounds=cams["backgrounds"], backend="gsplat", geometry_grad_channels=3,
    )  # fmt: skip
    (img[..., 3:67] * _weights(img[..., 3:67].shape).cuda()).sum().backward()
    for name in GEOMETRY:
        grad = params[name].grad
        assert grad is None or int(torch.count_nonzero(grad)) == 0, name
    m2d = info["means2d"].grad
    assert m2d is None or int(torch.count_nonzero(m2d)) == 0
    assert int(torch.count_nonzero(params["colors"].grad[:, :3])) == 0
    assert int(torch.count_nonzero(params["colors"].grad[:, 3:])) > 0
    # and an RGB loss does reach geometry and the retained means2d
    img, _, info = rasterization(
        *params.values(), cams["viewmats"], cams["Ks"], 128, 96, render_mode=mode, packed=packed,
        backend="gsplat", geometry_grad_channels=3,
    )  # fmt: skip
    img[..., :3].sum().backward()
    assert float(params["means"].grad.abs().max()) > 0
    assert info["means2d"].grad is not None and float(info["means2d"].grad.abs().max()) > 0
