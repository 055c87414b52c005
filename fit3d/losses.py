"""Losses and image metrics, all honouring a validity mask (True / weight 1 = pixel counts).

`masked_l1` is the one feature/colour L1 of both stages (FiT3D's stage-2 loss; stage 1's colour
and feature terms); `correspondence_infonce` is stage 2's equivariance term; the rest are stage 1's
RGB loss and held-out metrics.

SSIM has torchmetrics' definition (11x11 Gaussian window, sigma 1.5, data range 1, reflect
padding, variances clamped at 0), taken as a per-pixel map so masked pixels can be left out of its
mean. It is computed here with the window as two 1D passes over the five stacked moments (the 2D
Gaussian is the outer product of the 1D one): same values to float rounding, ~3x less time for
forward + backward at the demo's lifting size than `structural_similarity_index_measure`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
"""SSIM's Gaussian window: size and standard deviation (pixels)."""
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
"""SSIM's stabilising constants (k1 = 0.01, k2 = 0.03, data range 1)."""


@functools.lru_cache(maxsize=8)
def _gauss_1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian [size] centred on the middle tap (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Mask [H,W] bool (or None) -> float weights [H,W] on like's device."""
    if mask is None:
        return torch.ones(like.shape[-2:], device=like.device, dtype=like.dtype)
    return mask.to(device=like.device, dtype=like.dtype)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`sum(|pred - target| * m) / (sum(m) * C)`: mean absolute error over valid pixels and all
    channels (docs/method.md, "Stage 2: fine-tuning").

    pred, target: [..., C, H, W] (e.g. [C, H, W] in stage 1, [B, C, h, w] in stage 2); mask:
    [..., H, W] bool or soft weights in [0, 1] (stage 2 resizes the pixel mask to the token grid),
    or None = every pixel. An empty mask gives 0.
    """
    if mask is None:
        mask = torch.ones(pred.shape[:-3] + pred.shape[-2:], device=pred.device)
    m = mask.to(device=pred.device, dtype=pred.dtype).unsqueeze(-3)  # [..., 1, H, W]
    return ((pred - target).abs() * m).sum() / (m.sum() * pred.shape[-3]).clamp_min(1e-12)


def correspondence_infonce(
    fa: torch.Tensor,
    fb: torch.Tensor,
    temperature: float = 0.1,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over M corresponding points of two views (docs/method.md, "Stage-2
    objectives"): fa, fb [M, C] features of the same 3D points in view a and view b. Logits are
    cosines / temperature [M, M]; point i of a must pick point i of b among all M (and b's i pick
    a's i); the loss is the mean of both cross-entropies. `negatives` [M, M] bool (optional):
    which off-diagonal pairs may act as negatives (False = left out, e.g. two points too close
    to tell apart); the diagonal is always the positive. Identical features everywhere give
    log(M)."""
    if fa.shape != fb.shape or fa.ndim != 2:
        raise ValueError(
            f"need fa, fb [M, C] of one shape, got {tuple(fa.shape)}, {tuple(fb.shape)}"
        )
    m = fa.shape[0]
    logits = F.normalize(fa.float(), dim=1) @ F.normalize(fb.float(), dim=1).T / temperature
    if negatives is not None:
        keep = negatives.to(logits.device) | torch.eye(m, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(~keep, float("-inf"))
    labels = torch.arange(m, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM [H,W] (channel mean) of images [C,H,W] in [0,1].

    Local means, variances and covariance under the Gaussian window, the image reflect-padded by
    half a window; the row and column passes are grouped 1D convolutions over the 5*C moment maps.
    """
    c, h, w = pred.shape
    pad = SSIM_WINDOW // 2
    if min(h, w) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad} px each way, got {h}x{w}")
    g = _gauss_1d(SSIM_WINDOW, SSIM_SIGMA).to(device=pred.device, dtype=pred.dtype)
    moments = torch.stack([pred, target, pred * pred, target * target, pred * target])  # [5,C,H,W]
    x = F.pad(moments.reshape(1, 5 * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(5 * c, 1, 1, SSIM_WINDOW), groups=5 * c)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(5 * c, 1, SSIM_WINDOW, 1), groups=5 * c)
    mu_p, mu_t, pp, tt, pt = x.view(5, c, h, w)  # each [C, H, W]
    var_p = (pp - mu_p * mu_p).clamp_min(0.0)
    var_t = (tt - mu_t * mu_t).clamp_min(0.0)
    cov = pt - mu_p * mu_t
    num = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_p * mu_p + mu_t * mu_t + SSIM_C1) * (var_p + var_t + SSIM_C2)
    return (num / den).mean(0)


def rgb_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, ssim_weight: float
) -> torch.Tensor:
    """(1 - w) * L1 + w * (1 - SSIM) over valid pixels; pred/target [H,W,3]."""
    p, t = pred.permute(2, 0, 1), target.permute(2, 0, 1)
    w = _weights(mask, p)
    ssim = (ssim_map(p, t) * w).sum() / w.sum().clamp_min(1.0)
    return (1.0 - ssim_weight) * masked_l1(p, t, mask) + ssim_weight * (1.0 - ssim)


def upsample(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Teacher token map [C,h,w] (any float dtype) -> [C,H,W] f32, bilinear, align_corners=False."""
    up = F.interpolate(
        tokens[None].float(), size=(height, width), mode="bilinear", align_corners=False
    )
    return up[0]


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> float:
    """PSNR (dB, peak 1) over valid pixels; pred/target [H,W,3]."""
    p, t = pred.permute(2, 0, 1), target.permute(2, 0, 1)
    w = _weights(mask, p)
    mse = (((p - t) ** 2) * w).sum() / (w.sum().clamp_min(1.0) * 3)
    return float(-10.0 * torch.log10(mse.clamp_min(1e-10)))


def feature_cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean over valid pixels of the cosine between feature vectors; pred/target [C,H,W]."""
    w = _weights(mask, pred)
    cos = F.cosine_similarity(pred, target, dim=0, eps=1e-8)  # [H, W]
    return float((cos * w).sum() / w.sum().clamp_min(1.0))
