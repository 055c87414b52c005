"""fit3d.lift.model, the per-scene Gaussian model of stage 1, against independent references
(brute force, hand values, which parameters each loss reaches)."""

from __future__ import annotations

import math

import pytest
import torch

from fit3d.lift.model import (
    activated,
    decode_at,
    feature_pixels,
    frustum_points,
    init_params,
    initial_points,
    knn_log_scales,
    render,
    scene_extent,
    upsample_at,
)
from fit3d.losses import masked_l1, rgb_loss, upsample


def _look(centre: list[float]) -> torch.Tensor:
    """World-to-camera of an axis-aligned camera at `centre` looking along +z."""
    vm = torch.eye(4)
    vm[:3, 3] = -torch.tensor(centre)
    return vm


def test_knn_log_scales_brute_force():
    gen = torch.Generator().manual_seed(2)
    xyz = torch.rand(60, 3, generator=gen)
    d = torch.cdist(xyz.double(), xyz.double())
    d.fill_diagonal_(float("inf"))
    ref = d.topk(3, largest=False).values.mean(1).log().float()
    got = knn_log_scales(xyz)
    assert got.shape == (60, 3)
    assert torch.allclose(got, ref[:, None].expand(60, 3), atol=1e-5)


def test_knn_log_scales_with_too_few_neighbours():
    """Two points: the one neighbour's distance; a lone point: the documented 0.01."""
    two = knn_log_scales(torch.tensor([[0.0, 0, 0], [0, 3, 4]]))
    assert torch.allclose(two, torch.full((2, 3), math.log(5.0)))
    assert torch.allclose(knn_log_scales(torch.zeros(1, 3)), torch.full((1, 3), math.log(0.01)))


def test_scene_extent():
    vms = torch.stack([_look([0.0, 0.0, 0.0]), _look([2.0, 0.0, 0.0]), _look([1.0, 3.0, 0.0])])
    # mean centre (1, 1, 0); farthest camera (1, 3, 0) at distance 2
    assert scene_extent(vms) == pytest.approx(2.2)
    assert scene_extent(vms[:1]) == pytest.approx(1e-3)  # one camera: the floor


def test_frustum_points_project_inside_an_image():
    vms = torch.stack([_look([0.0, 0.0, 0.0]), _look([5.0, 0.0, 0.0])])
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    Ks = torch.stack([K, K])
    pts = frustum_points(vms, Ks, [(64, 48), (64, 48)], 400, 4.0, torch.Generator().manual_seed(0))
    inside = torch.zeros(400, dtype=torch.bool)
    for vm in vms:
        cam = pts @ vm[:3, :3].T + vm[:3, 3]
        uv = cam[:, :2] / cam[:, 2:] * 50.0 + torch.tensor([32.0, 24.0])
        ok = (cam[:, 2] >= 0.2 - 1e-4) & (cam[:, 2] <= 4.0 + 1e-4)
        ok &= (uv[:, 0] >= 0) & (uv[:, 0] <= 64) & (uv[:, 1] >= 0) & (uv[:, 1] <= 48)
        inside |= ok
    assert inside.all()


def test_init_params_follow_the_reference():
    xyz = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    rgb = torch.full((5, 3), 0.75)
    params = init_params(xyz, rgb, feature_dim=4, sh_degree=3, init_opacity=0.1)
    act = activated(params)
    assert torch.allclose(act["opacities"], torch.full((5,), 0.1))
    assert torch.equal(act["quats"], torch.tensor([[1.0, 0, 0, 0]] * 5))
    assert act["sh"].shape == (5, 16, 3) and torch.all(act["sh"][:, 1:] == 0)
    # DC term reproduces the colour: 0.28209479 * dc + 0.5
    assert torch.allclose(0.28209479177387814 * act["sh"][:, 0] + 0.5, rgb)
    assert torch.equal(act["features"], torch.zeros(5, 4))
    # point 0: neighbours at distance 1, 1, 1 -> scale 1
    assert torch.allclose(act["scales"][0], torch.ones(3))


def test_initial_points_caps_sparse_points_and_falls_back_to_grey_frusta():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.arange(30.0).reshape(10, 3)
    rgb = torch.arange(30.0).reshape(10, 3) / 30
    vms = torch.stack([_look([0.0, 0.0, 0.0]), _look([1.0, 0.0, 0.0])])
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    Ks, sizes = torch.stack([K, K]), [(64, 48), (64, 48)]
    kept, kept_rgb, how = initial_points((xyz, rgb), vms, Ks, sizes, 4, 99, gen)
    assert how == "sparse" and kept.shape == (4, 3)
    rows = (kept[:, None] == xyz[None]).all(-1).float().argmax(1)  # [4] source row of each point
    assert len(set(rows.tolist())) == 4 and torch.equal(kept_rgb, rgb[rows])  # colours follow
    assert torch.equal(initial_points((xyz, rgb), vms, Ks, sizes, 0, 99, gen)[0], xyz)
    empty = (torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.warns(UserWarning, match="scene s9: no sparse points"):
        pts, cols, how = initial_points(empty, vms, Ks, sizes, 4, 50, gen, "s9")
    assert (
        how == "random-frusta"
        and pts.shape == (50, 3)
        and torch.equal(cols, torch.full_like(pts, 0.5))
    )
    # every fallback point lies in front of a camera, within 0.05..1 x the scene extent
    depth = torch.stack([(pts @ vm[:3, :3].T + vm[:3, 3])[:, 2] for vm in vms])  # [2, 50]
    extent = scene_extent(vms)
    assert ((depth >= 0.05 * extent - 1e-5) & (depth <= extent + 1e-5)).any(0).all()


def test_render_colours_from_the_sh_dc_term_and_features_alongside():
    """One large opaque Gaussian straight ahead, SH degree 0: where it covers a pixel, rgb / alpha
    is max(SH_C0 * dc + 0.5, 0) (the clamp at 0 included) and features / alpha its features."""
    colour = torch.tensor([0.2, 0.9, -0.3])  # the last channel is clamped to 0
    params = torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter(torch.tensor([[0.0, 0.0, 3.0]])),
            "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]])),
            "scales": torch.nn.Parameter(torch.full((1, 3), math.log(0.5))),
            "opacities": torch.nn.Parameter(torch.tensor([3.0])),  # sigmoid: 0.95
            "sh0": torch.nn.Parameter(((colour - 0.5) / 0.28209479177387814)[None, None]),
            "shN": torch.nn.Parameter(torch.zeros(1, 0, 3)),
            "features": torch.nn.Parameter(torch.tensor([[1.5, -2.0]])),
        }
    )
    K = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])
    with torch.no_grad():
        rgb, feat, alpha, _ = render(params, _look([0.0, 0.0, 0.0]), K, 48, 32, 0, "torch")
    assert rgb.shape == (32, 48, 3) and feat.shape == (2, 32, 48) and alpha.shape == (32, 48, 1)
    assert alpha[16, 24, 0] > 0.9 and alpha[0, 0, 0] < alpha[16, 24, 0]
    covered = alpha[..., 0] > 0.05  # [H, W]
    want = colour.clamp_min(0)
    assert torch.allclose(
        rgb[covered] / alpha[covered], want.expand(int(covered.sum()), 3), atol=1e-5
    )
    feats = feat.permute(1, 2, 0)[covered] / alpha[covered]  # [P, 2]
    assert torch.allclose(feats, torch.tensor([1.5, -2.0]).expand_as(feats), atol=1e-5)


def _scene_params(n: int = 200, d: int = 6) -> torch.nn.ParameterDict:
    gen = torch.Generator().manual_seed(3)
    xyz = torch.rand(n, 3, generator=gen) * torch.tensor([2.0, 1.5, 0.5]) + torch.tensor(
        [-1.0, -0.75, 2.0]
    )
    params = init_params(xyz, torch.rand(n, 3, generator=gen), d, 3, 0.5)
    with torch.no_grad():
        params["features"].copy_(torch.randn(n, d, generator=gen))
        params["shN"].copy_(0.1 * torch.randn(n, 15, 3, generator=gen))
    return params


@pytest.mark.parametrize("backend", ["torch", "torch-python"])
def test_feature_loss_puts_zero_gradient_on_geometry(backend):
    """Decoupling (docs/method.md, "Stage 1: lifting"): features/decoder only; RGB still drives
    geometry."""
    params = _scene_params()
    K = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])
    decoder = torch.nn.Conv2d(6, 10, 3, padding=1, bias=False)
    rgb, feat, _, info = render(params, _look([0.0, 0.0, 0.0]), K, 48, 32, 3, backend)
    info["means2d"].retain_grad()
    target = torch.randn(10, 32, 48)
    masked_l1(decoder(feat[None])[0], target, None).backward()
    geometry = ("means", "quats", "scales", "opacities", "sh0", "shN")
    for k in geometry:
        assert params[k].grad is None or torch.count_nonzero(params[k].grad) == 0, k
    assert info["means2d"].grad is None or torch.count_nonzero(info["means2d"].grad) == 0
    assert params["features"].grad.abs().sum() > 0 and decoder.weight.grad.abs().sum() > 0
    # the RGB loss of the same render does reach every geometry parameter (the test is not void)
    for p in params.values():
        p.grad = None
    rgb, feat, _, info = render(params, _look([0.0, 0.0, 0.0]), K, 48, 32, 3, backend)
    rgb_loss(rgb, torch.rand(32, 48, 3), None, 0.2).backward()
    for k in geometry:
        assert params[k].grad.abs().sum() > 0, k
    assert params["features"].grad is None or torch.count_nonzero(params["features"].grad) == 0


def test_feature_pixels_are_a_reproducible_uniform_subset():
    assert feature_pixels(7, 9, 1.0, seed=3) is None  # every pixel
    a, b = feature_pixels(20, 30, 0.25, seed=3), feature_pixels(20, 30, 0.25, seed=3)
    assert torch.equal(a, b) and len(a) == 150 and len(a.unique()) == 150
    assert (a[1:] > a[:-1]).all() and 0 <= int(a.min()) and int(a.max()) < 600
    assert not torch.equal(a, feature_pixels(20, 30, 0.25, seed=4))
    # uniform: over many draws every pixel is picked about `fraction` of the time
    hits = torch.zeros(600)
    for seed in range(400):
        hits[feature_pixels(20, 30, 0.25, seed)] += 1
    assert (
        abs(float(hits.mean()) - 100.0) < 1e-9 and 60 < float(hits.min()) <= float(hits.max()) < 140
    )


def test_decode_at_is_the_decoder_conv_at_those_pixels_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(5, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    pixels = torch.tensor([0, 7, 8, 20, 40, 47])  # corners and borders (zero padding) + inside
    full = torch.nn.functional.conv2d(feat[None], weight, padding=1)[0].flatten(1)  # [7, 48]
    picked = decode_at(feat, weight, pixels)  # [7, 6]
    assert torch.allclose(picked, full[:, pixels], atol=1e-12)
    up = torch.randn(7, 6, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((picked * up).sum(), [feat, weight])
    refs = torch.autograd.grad((full[:, pixels] * up).sum(), [feat, weight])
    for got, ref in zip(grads, refs, strict=True):
        assert torch.allclose(got, ref, atol=1e-12)


def test_upsample_at_is_the_bilinear_upsample_at_those_pixels():
    tokens = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    pixels = torch.arange(0, 11 * 17, 5)
    full = upsample(tokens, 11, 17).flatten(1)  # [4, 187]
    assert torch.allclose(upsample_at(tokens, 11, 17, pixels), full[:, pixels], atol=1e-6)
