"""Stage-1 building blocks against independent references (brute force, skimage, hand values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from fit3d.lift.model import (
    activated,
    camera_centres,
    frustum_points,
    init_params,
    knn_log_scales,
    render,
    scene_extent,
)
from fit3d.losses import feature_cosine, masked_l1, psnr, rgb_loss, ssim_map, upsample
from stage1_lift.loop import view_for_step


def _look(centre: list[float]) -> torch.Tensor:
    """World-to-camera of an axis-aligned camera at `centre` looking along +z."""
    vm = torch.eye(4)
    vm[:3, 3] = -torch.tensor(centre)
    return vm


def test_ssim_map_matches_skimage_inside_the_border():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(3, 40, 50, generator=gen)
    b = (a + 0.2 * torch.rand(3, 40, 50, generator=gen)).clamp(0, 1)
    ours = ssim_map(a, b).numpy()
    _, ref = structural_similarity(
        a.permute(1, 2, 0).double().numpy(),
        b.permute(1, 2, 0).double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
        full=True,
    )
    ref = ref.mean(-1)
    # both use an 11x11 window; they differ only in border padding (5 px)
    assert np.allclose(ours[5:-5, 5:-5], ref[5:-5, 5:-5], atol=1e-4)


def test_masked_losses_and_metrics_by_hand():
    pred = torch.zeros(2, 2, 3)
    target = torch.zeros(2, 2, 3)
    target[0, 0] = 1.0  # one wrong pixel, masked out below
    target[1, 1] = 0.1
    mask = torch.tensor([[False, True], [True, True]])
    # MSE over valid pixels: (3 * 0.01) / (3 valid px * 3 channels)
    assert psnr(pred, target, mask) == pytest.approx(-10 * math.log10(0.01 / 3), rel=1e-5)
    p, t = pred.permute(2, 0, 1), target.permute(2, 0, 1)
    assert float(masked_l1(p, t, mask)) == pytest.approx(0.3 / 9, rel=1e-5)
    assert float(masked_l1(p, t, None)) == pytest.approx(3.3 / 12, rel=1e-5)
    # identical images: the loss is exactly zero whatever the mask
    image = torch.rand(16, 16, 3)
    assert float(rgb_loss(image, image, torch.rand(16, 16) > 0.5, 0.2)) == pytest.approx(
        0, abs=1e-6
    )
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [C=2, H=1, W=2]: vectors (1,0), (0,1)
    g = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])  # (1,0), (1,1)
    assert feature_cosine(f, g, None) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, rel=1e-5)
    assert feature_cosine(f, g, torch.tensor([[False, True]])) == pytest.approx(1 / math.sqrt(2))


def test_upsample_is_align_corners_false_bilinear():
    tokens = torch.tensor([[[0.0, 1.0]]])  # [1, 1, 2]
    up = upsample(tokens, 1, 4)[0, 0]
    # output pixel centres at (j + 0.5) / 2 - 0.5 in token units: -0.25, 0.25, 0.75, 1.25
    assert torch.allclose(up, torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_knn_log_scales_brute_force():
    gen = torch.Generator().manual_seed(2)
    xyz = torch.rand(60, 3, generator=gen)
    d = torch.cdist(xyz.double(), xyz.double())
    d.fill_diagonal_(float("inf"))
    ref = d.topk(3, largest=False).values.mean(1).log().float()
    got = knn_log_scales(xyz)
    assert got.shape == (60, 3)
    assert torch.allclose(got, ref[:, None].expand(60, 3), atol=1e-5)


def test_scene_extent_and_camera_centres():
    vms = torch.stack([_look([0.0, 0.0, 0.0]), _look([2.0, 0.0, 0.0]), _look([1.0, 3.0, 0.0])])
    assert torch.allclose(camera_centres(vms), torch.tensor([[0.0, 0, 0], [2, 0, 0], [1, 3, 0]]))
    # mean centre (1, 1, 0); farthest camera (1, 3, 0) at distance 2
    assert scene_extent(vms) == pytest.approx(2.2)


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


def test_every_epoch_visits_each_train_view_once():
    train = [0, 2, 3, 5, 8]
    for epoch in range(3):
        seen = [view_for_step(epoch * 5 + k, train, seed=4) for k in range(5)]
        assert sorted(seen) == train
    assert [view_for_step(k, train, 4) for k in range(10)] != [
        view_for_step(k, train, 5) for k in range(10)
    ]


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
