"""Probe losses and schedules against hand-computed values; heads learn separable synthetic
problems; the DPT head's output grid."""

import math

import pytest
import torch
import torch.nn.functional as F

from fit3d.eval.probes import (
    DepthHead,
    DPTHead,
    SegHead,
    angular_nll,
    batch_sliced_gradient_loss,
    bins_to_depth,
    cross_entropy_all_pixels,
    fast_schedule,
    gradient_loss,
    loss_fn,
    mmcv_cosine,
    mmcv_poly,
    one_cycle_beta1,
    probe3d_schedule,
    probe3d_sig_loss,
    resample,
    sig_loss,
    train_head,
    unit,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with other processes on the cores, a second thread only adds hand-off waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sig_loss_hand_computed():
    gt = torch.tensor([[[1.0, 2.0, 0.0, 3.0]]])  # the 0 is invalid
    pred = torch.tensor([[[2.0, 3.0, 5.0, 2.0]]])
    g = [math.log(2.001 / 1.001), math.log(3.001 / 2.001), math.log(2.001 / 3.001)]
    mean = sum(g) / 3
    var = sum((x - mean) ** 2 for x in g) / 2  # unbiased, as torch.var
    assert float(sig_loss(pred, gt)) == pytest.approx(math.sqrt(var + 0.15 * mean**2), rel=1e-5)
    warm = sig_loss(pred, gt, mean_only=True)  # FiT3D's SigLoss warm-up: mean term only
    assert float(warm) == pytest.approx(math.sqrt(0.15 * mean**2), rel=1e-5)
    mse = sum(x * x for x in g) / 3
    ref = math.sqrt(mse - 0.85 * mean**2)
    assert float(probe3d_sig_loss(pred, gt)) == pytest.approx(ref, rel=1e-5)


def test_gradient_loss_hand_computed():
    # one row; log difference d = 0, 0, 1, 1, 1 (+eps terms) at pixels 0..4; gt all valid
    gt = torch.ones(1, 1, 5)
    pred = torch.tensor([[[1.0, 1.0, math.e, math.e, math.e]]])
    d = [0.0, 0.0, math.log(math.e + 1e-3) - math.log(1.001)] + [0.0] * 2
    d[3] = d[4] = d[2]
    # stride 1: |d0 - d2| + |d1 - d3| + |d2 - d4| over 5 valid pixels; stride 2 (pixels 0, 2, 4):
    # |d0 - d4| over 3 pixels; stride 4 (pixels 0, 4): no pair 2 apart; stride 6: one pixel
    s1 = (abs(d[0] - d[2]) + abs(d[1] - d[3]) + abs(d[2] - d[4])) / 5
    s2 = abs(d[0] - d[4]) / 3
    assert float(gradient_loss(pred, gt)) == pytest.approx(s1 + s2, rel=1e-5)
    gt = torch.rand(2, 9, 9) + 0.5
    assert float(gradient_loss(3 * gt, gt)) < 1e-3  # a global scale has (almost) no gradient


def test_angular_nll_hand_computed():
    t = math.radians(60.0)
    out = torch.tensor([[[[0.0, math.sin(t), math.cos(t), 2.0]]]])  # [1, 1, 1, 4]
    gt = torch.tensor([[[[0.0, 0.0, 1.0]]]])
    ref = -math.log(5.0) + 2.0 * t + math.log1p(math.exp(-2.0 * math.pi))
    assert float(angular_nll(out, gt)) == pytest.approx(ref, rel=1e-5)


def test_unit_is_f_normalize_in_fp32_including_zero_vectors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    x[0, :, 1, 2] = 0  # F.normalize leaves a zero vector at zero
    for dim in (1, -1):
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            got = unit(x.to(dtype), dim)
            assert got.dtype == torch.float32
            want = F.normalize(x.to(dtype).double(), dim=dim).float()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert unit(x, 1)[0, :, 1, 2].abs().sum() == 0


def test_schedules_hand_computed():
    poly = mmcv_poly(total=100, warmup=10, power=1.0, ratio=1e-6)
    assert poly(0) == pytest.approx(1e-6)  # warm-up starts at ratio x the regular lr
    assert poly(5) == pytest.approx((1 - 0.05) * (1 - 0.5 * (1 - 1e-6)))
    assert poly(50) == pytest.approx(0.5) and poly(100) == 0.0
    cos = mmcv_cosine(total=100, warmup=0, min_ratio=0.0)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5)
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    beta1 = one_cycle_beta1(100)
    assert beta1(0) == pytest.approx(0.95) and beta1(30) == pytest.approx(0.85)
    assert beta1(15) == pytest.approx(0.90) and beta1(100) == pytest.approx(0.95)
    p3 = probe3d_schedule(total=100, warmup=15)
    assert p3(0) == pytest.approx(0.01) and p3(15) == pytest.approx(1.0)
    assert p3(100) == pytest.approx(0.01)
    fast = fast_schedule(total=100)
    assert fast(0) == pytest.approx(0.1) and fast(9) == pytest.approx(1.0)
    assert fast(100) == 0.0


def test_depth_head_conv_before_upsample_is_exact():
    for bn in (True, False):
        head = DepthHead(6, max_depth=5.0, batch_norm=bn).eval()
        x = torch.randn(2, 6, 3, 4)
        up = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        p = torch.relu(head.conv(head.bn(up))) + 0.1
        ref = ((p / p.sum(1, keepdim=True)) * head.centres[None, :, None, None]).sum(1)
        torch.testing.assert_close(head(x, (12, 16)), ref, rtol=1e-5, atol=1e-5)
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in DepthHead(6, 5.0, batch_norm=False).modules()
    )


def test_bins_to_depth_equals_the_autograd_form():
    """The hand-written backward against autograd through the definition (float64), with logits
    at exactly 0 (ReLU's kink: no gradient, as torch's relu) and below."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 3, 5, dtype=torch.float64)
    logits[0, :2, 0, 0] = 0.0
    logits = logits.requires_grad_()
    centres = torch.linspace(0.5, 4.0, 7, dtype=torch.float64)
    p = torch.relu(logits) + 0.1
    ref = (p * centres[:, None, None]).sum(1) / p.sum(1)  # [2, 3, 5]
    out = bins_to_depth(logits, centres)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, logits, g)
    (g_out,) = torch.autograd.grad(out, logits, g)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(g_out, g_ref, atol=1e-12)
    assert g_out[0, :2, 0, 0].abs().max() == 0
    # all-negative logits: uniform weights, depth = mean centre
    flat = bins_to_depth(-torch.ones(1, 7, 1, 1, dtype=torch.float64), centres)
    assert float(flat) == pytest.approx(float(centres.mean()))
    away_from_kink = logits.detach()[1:, :, :2, :2].clone().requires_grad_()  # no exact 0s
    assert torch.autograd.gradcheck(lambda x: bins_to_depth(x, centres), (away_from_kink,))


def test_depth_head_takes_constant_channels_once_per_image():
    """With its last channels a broadcast vector, a head told so gives the plain head's depth,
    gradients and BatchNorm running statistics (train mode), float64."""
    torch.manual_seed(2)
    raw = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    cls = torch.randn(3, 4, dtype=torch.float64)
    x = torch.cat([raw, cls[:, :, None, None].expand(-1, -1, 4, 6)], 1)  # [3, 9, 4, 6]
    plain = DepthHead(9, 5.0).double()
    told = DepthHead(9, 5.0, constant=4).double()
    told.load_state_dict(plain.state_dict())
    with torch.no_grad():  # away from BatchNorm's identity init, so every term matters
        for head in (plain, told):
            head.bn.weight.copy_(torch.linspace(0.5, 2.0, 9))
            head.bn.bias.copy_(torch.linspace(-0.3, 0.3, 9))
    outs = [head.train()(x, (14, 20), 2) for head in (plain, told)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    g = torch.randn_like(outs[0])
    heads = (plain, told)
    grads = [
        torch.autograd.grad(o, list(h.parameters()), g) for o, h in zip(outs, heads, strict=True)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    torch.testing.assert_close(told.bn.running_var, plain.bn.running_var, rtol=0, atol=1e-12)
    after = [head.eval()(x, (8, 12)) for head in heads]
    torch.testing.assert_close(after[1], after[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="constant"):
        DepthHead(9, 5.0, constant=9)


def test_dpt_head_output_is_16x_the_token_grid():
    head = DPTHead([8, 8, 8, 12], "depth", hidden=4, max_depth=5.0).eval()
    feats = [torch.randn(2, c, 3, 5) for c in (8, 8, 8, 12)]
    with torch.no_grad():
        assert head.raw(feats).shape == (2, 256, 48, 80)
        depth = head(feats, (40, 70))
        normals = DPTHead([8] * 4, "normals", hidden=4)(feats[:3] + [feats[0]], (40, 70))
    assert depth.shape == (2, 40, 70) and float(depth.min()) >= 1e-3 and float(depth.max()) <= 5.0
    assert normals.shape == (2, 40, 70, 4)
    torch.testing.assert_close(normals[..., :3].norm(dim=-1), torch.ones(2, 40, 70))
    assert float(normals[..., 3].min()) > 0.01


def _synthetic(n: int, gen: torch.Generator):
    """Features [n, 8, 4, 6]; class = argmax of 3 channels; depth = 2 + 0.5 * channel 3."""
    x = torch.randn(n, 8, 4, 6, generator=gen)
    return x, x[:, :3].argmax(1), 2.0 + 0.5 * x[:, 3].clamp(-2, 2)


def _batches(x, y, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            yield [(x[idx], y[idx])]


def test_probes_learn_separable_problems():
    gen = torch.Generator().manual_seed(0)
    x, seg, depth = _synthetic(48, gen)
    xt, segt, deptht = _synthetic(16, gen)
    cpu = torch.device("cpu")
    head = train_head(SegHead(8, 3), _batches(x, seg, 8, 0), 120, 1e-1, fast_schedule(120),
                      loss_fn("seg", "linear"), cpu)  # fmt: skip
    pred = head(xt, (4, 6)).argmax(1)
    assert float((pred == segt).float().mean()) > 0.85
    head = train_head(DepthHead(8, 4.0), _batches(x, depth, 8, 0), 120, 3e-2, fast_schedule(120),
                      loss_fn("depth", "linear"), cpu)  # fmt: skip
    rmse = float(((head(xt, (4, 6)).detach() - deptht) ** 2).mean().sqrt())
    assert rmse < 0.2  # a constant prediction gives ~0.45


@pytest.mark.parametrize("size", [(16, 24), (13, 22)])
def test_strided_resample_matches_full_resolution(size):
    x = torch.randn(2, 5, 4, 6)
    full = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resample(x, size, 3), full[:, :, 1::3, 1::3])
    cubic = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    torch.testing.assert_close(resample(x, size, 2, "bicubic"), cubic[:, :, 1::2, 1::2])


def test_micro_batches_accumulate_to_the_global_batch():
    """eval.micro_batch: for a loss that is a mean over equally many pixels per view (normals,
    every pixel valid; a head without BatchNorm), 4 + 4 views give the gradient of 8."""
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(8, 6, 2, 3, generator=gen) for _ in range(4)]
    y = F.normalize(torch.randn(8, 20, 30, 3, generator=gen), dim=-1)
    heads = []
    for split in (8, 4):
        torch.manual_seed(0)
        head = DPTHead([6] * 4, "normals", hidden=4)
        steps = [[([t[i : i + split] for t in x], y[i : i + split]) for i in range(0, 8, split)]]
        heads.append(train_head(head, steps * 3, 3, 1e-2, fast_schedule(3),
                                loss_fn("normals", "dpt"), torch.device("cpu")))  # fmt: skip
    for a, b in zip(heads[0].parameters(), heads[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 24), (13, 22)])
def test_strided_resample_with_align_corners(size):
    x = torch.randn(2, 5, 4, 6)
    full = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    torch.testing.assert_close(resample(x, size, 1, align_corners=True), full)
    torch.testing.assert_close(resample(x, size, 3, align_corners=True), full[:, :, 1::3, 1::3])


def _identity_dpt(code: str) -> DPTHead:
    """A 4-channel normals DPT head whose convolutions pass their input through (1x1
    projections = identity, residual units = 0 + x, output convs = centre tap identity): its raw
    output is then up2(relu(up4(up2 f0 + up2 f1 + up2 f2 + up2 f3))) for positive inputs."""
    head = DPTHead([4] * 4, "normals", hidden=4, code=code)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        for conv in [*head.proj, head.out1, head.out2]:
            k = conv.kernel_size[0] // 2
            conv.weight[:, :, k, k] = torch.eye(4)
    return head.eval()


@pytest.mark.parametrize("code", ["head", "published"])
def test_dpt_upsampling_follows_the_probe3d_code_version(code):
    feats = [torch.rand(1, 4, 3, 5) + 0.1 for _ in range(4)]
    if code == "head":  # Probe3D HEAD (2025): bilinear, align_corners=True, label resize too

        def up(x, s):
            return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)

        corners = True
    else:  # the 2024 code: nearest inside the head, default (False) label resize

        def up(x, s):
            return F.interpolate(x, scale_factor=s, mode="nearest")

        corners = False
    ref = up(torch.relu(up(sum(up(f, 2) for f in feats), 4)), 2)
    head = _identity_dpt(code)
    with torch.no_grad():
        torch.testing.assert_close(head.raw(feats), ref)
        out = head(feats, (30, 50))
    label = F.interpolate(ref, size=(30, 50), mode="bicubic", align_corners=corners)
    torch.testing.assert_close(out[..., :3], unit(label[:, :3], 1).permute(0, 2, 3, 1))


def test_batch_sliced_gradient_loss_is_fit3ds_4d_slicing():
    """FiT3D's / Probe3D-2024's gradient loss on [B, 1, H, W]: its +-2 differences run over the
    batch. With a constant log-difference d_b per image: B = 2 gives exactly 0; B = 4 compares
    images (0, 2) and (1, 3) at stride 1 only (the strided batches 0,2 / 0 / 0 have no pair two
    apart), divided by the valid pixels of the whole batch."""
    gt = torch.full((2, 3, 4), 2.0)
    pred = gt * torch.tensor([1.0, 3.0])[:, None, None]
    assert float(batch_sliced_gradient_loss(pred, gt)) == 0.0
    assert float(gradient_loss(pred, gt)) == 0.0  # constant per image: no spatial gradient
    scale = torch.tensor([1.0, 2.0, 4.0, 0.5])
    gt4 = torch.full((4, 3, 4), 2.0)
    gt4[3, 0, 0] = 0  # one invalid pixel in image 3
    pred4 = gt4.clone()
    pred4[:] = 2.0 * scale[:, None, None]
    d = torch.log(2.0 * scale + 1e-3) - math.log(2.0 + 1e-3)  # [4]
    pairs = 12 * abs(float(d[0] - d[2])) + 11 * abs(float(d[1] - d[3]))
    expected = pairs / (4 * 12 - 1)
    assert float(batch_sliced_gradient_loss(pred4, gt4)) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_over_all_pixels_as_mmseg_0_27():
    logits = torch.zeros(1, 4, 2, 3)  # uniform: log 4 per labelled pixel
    labels = torch.tensor([[[0, 1, 255], [2, 255, 255]]])
    assert float(cross_entropy_all_pixels(logits, labels)) == pytest.approx(3 * math.log(4) / 6)
    fixed = loss_fn("seg", "linear")(logits, labels, 0)
    assert float(fixed) == pytest.approx(math.log(4))  # mean over the labelled pixels
    published = loss_fn("seg", "linear", as_published=True)(logits, labels, 0)
    assert float(published) == pytest.approx(math.log(4) / 2)


def test_published_depth_loss_is_per_gpu_sigloss_plus_sliced_gradient():
    gen = torch.Generator().manual_seed(2)
    gt = torch.rand(4, 5, 6, generator=gen) * 3 + 0.5
    pred = torch.rand(4, 5, 6, generator=gen) * 3 + 0.5
    published = loss_fn("depth", "linear", 10, as_published=True, gpu_batch=2)
    per_gpu = [sig_loss(pred[k : k + 2], gt[k : k + 2]) for k in (0, 2)]  # gradient: 0 at 2
    assert float(published(pred, gt, 50)) == pytest.approx(float(sum(per_gpu) / 2), rel=1e-6)
    warm = [sig_loss(pred[k : k + 2], gt[k : k + 2], mean_only=True) for k in (0, 2)]
    assert float(published(pred, gt, 5)) == pytest.approx(float(sum(warm) / 2), rel=1e-6)
    fixed = loss_fn("depth", "linear", 10)(pred, gt, 50)
    pooled = sig_loss(pred, gt) + 0.5 * gradient_loss(pred, gt)
    assert float(fixed) == pytest.approx(float(pooled), rel=1e-6)
    dpt_2024 = loss_fn("depth", "dpt", probe3d="published")(pred, gt, 0)
    ref = 10 * probe3d_sig_loss(pred, gt) + 0.5 * batch_sliced_gradient_loss(pred, gt)
    assert float(dpt_2024) == pytest.approx(float(ref), rel=1e-6)


def test_angular_nll_counts_depth_pixels_without_normal_at_90_degrees():
    out = torch.tensor([[[[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0]]]])  # [1, 1, 2, 4]
    gt = torch.tensor([[[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]])  # pixel 1: no normal
    k = 2.0
    reg = -math.log(k**2 + 1) + math.log1p(math.exp(-k * math.pi))
    eps = 1e-4
    expected = (reg + k * math.acos(1 - eps) + reg + k * math.pi / 2) / 2
    assert float(angular_nll(out, gt)) == pytest.approx(expected, abs=1e-5)  # fp32 clamp


def test_inputs_are_kept_in_memory_up_to_the_budget():
    """Each key's (input, label) is made once while it fits in the budget; past the budget it is
    made again on every read (read from disk, as without the cache); clear() frees it all."""
    from fit3d.eval.fitting import Inputs

    made: list[int] = []

    def make(n: int):
        made.append(n)
        return torch.full((10,), float(n)), [torch.zeros(5, dtype=torch.float64)]  # 40 + 40 B

    inputs = Inputs(budget=200)  # room for two items of 80 B
    for n in (0, 1, 2, 0, 1, 2):
        x, y = inputs.get(("train", n), lambda n=n: make(n))
        assert float(x[0]) == n
    assert made == [0, 1, 2, 2] and inputs.used == 160
    inputs.clear()
    inputs.get(("train", 0), lambda: make(0))
    assert made == [0, 1, 2, 2, 0] and inputs.used == 80
