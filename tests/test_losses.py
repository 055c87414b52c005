"""fit3d.losses: SSIM against skimage and torchmetrics (values and gradients), masked L1 / PSNR /
cosine and the RGB loss by hand, the teacher upsampling against hand-placed sample positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure

from fit3d.losses import feature_cosine, masked_l1, psnr, rgb_loss, ssim_map, upsample


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


def test_ssim_map_equals_torchmetrics_full_image_and_its_gradient():
    # the separable form must give torchmetrics' map everywhere, borders included, and the same
    # gradient; a near-constant patch exercises the clamp of negative variances
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(3, 23, 37, generator=gen, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(3, 23, 37, generator=gen, dtype=torch.float64)).clamp(0, 1)
    a[:, :8, :8] = 0.7
    b[:, :8, :8] = 0.7
    a1 = a.clone().requires_grad_(True)
    a2 = a.clone().requires_grad_(True)
    ours = ssim_map(a1, b)
    _, full = structural_similarity_index_measure(
        a2[None],
        b[None],
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=1.0,
        return_full_image=True,
    )
    ref = full[0].mean(0)
    assert ours.shape == ref.shape == (23, 37)
    assert torch.allclose(ours, ref, atol=1e-10)
    w = torch.rand(23, 37, generator=gen, dtype=torch.float64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(a1.grad, a2.grad, atol=1e-10)


def test_ssim_map_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="larger than 5 px"):
        ssim_map(torch.rand(3, 5, 40), torch.rand(3, 5, 40))


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


def test_psnr_without_mask_by_hand():
    pred = torch.full((4, 5, 3), 0.5)
    target = pred.clone()
    target[0, 0, 0] = 0.0  # one channel of one pixel off by 0.5: MSE = 0.25 / 60
    assert psnr(pred, target, None) == pytest.approx(-10 * math.log10(0.25 / 60), rel=1e-5)


def test_masked_l1_soft_weights_batches_and_empty_mask():
    """[B, C, h, w] with soft weights: sum(|d| * m) / (sum(m) * C); an empty mask gives 0."""
    pred = torch.zeros(2, 3, 1, 2)
    target = torch.zeros(2, 3, 1, 2)
    target[0, :, 0, 0] = 1.0  # |d| = 1 in every channel of (batch 0, pixel 0)
    target[1, 0, 0, 1] = 3.0  # |d| = 3 in one channel of (batch 1, pixel 1)
    mask = torch.tensor([[[0.5, 1.0]], [[0.0, 0.25]]])  # [B, h, w]
    # numerator 0.5 * 3 + 0.25 * 3 = 2.25; denominator (0.5 + 1 + 0 + 0.25) * 3 = 5.25
    assert float(masked_l1(pred, target, mask)) == pytest.approx(2.25 / 5.25, rel=1e-6)
    assert float(masked_l1(pred, target, torch.zeros(2, 1, 2, dtype=torch.bool))) == 0.0


@pytest.mark.parametrize("w", [0.0, 0.2, 1.0])
def test_rgb_loss_on_constant_images_is_the_analytic_value(w: float):
    """Two constant images a, b: L1 = |a - b| and SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every
    pixel (zero variance, so the contrast-structure term is 1), C1 = (0.01 * data range)^2. In
    float64: float32 leaves ~3e-4 of cancellation noise in SSIM's variance terms."""
    a, b = 0.3, 0.7
    pred = torch.full((20, 24, 3), a, dtype=torch.float64)
    target = torch.full((20, 24, 3), b, dtype=torch.float64)
    c1 = 0.01**2
    ssim = (2 * a * b + c1) / (a * a + b * b + c1)
    want = (1 - w) * abs(a - b) + w * (1 - ssim)
    assert float(rgb_loss(pred, target, None, w)) == pytest.approx(want, rel=1e-9)
    mask = torch.zeros(20, 24, dtype=torch.bool)
    mask[3:9, 5:15] = True  # a mask changes nothing when every pixel has the same loss
    assert float(rgb_loss(pred, target, mask, w)) == pytest.approx(want, rel=1e-9)


def test_upsample_is_align_corners_false_bilinear():
    tokens = torch.tensor([[[0.0, 1.0]]])  # [1, 1, 2]
    up = upsample(tokens, 1, 4)[0, 0]
    # output pixel centres at (j + 0.5) / 2 - 0.5 in token units: -0.25, 0.25, 0.75, 1.25
    assert torch.allclose(up, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    half = upsample(tokens.half(), 1, 4)
    assert half.dtype == torch.float32 and torch.allclose(half[0, 0], up)
