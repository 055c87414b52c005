"""Probe heads, their losses, learning-rate schedules and one training loop.

Heads (docs/method.md, the two "Evaluation" sections):
- segmentation (FiT3D / DINOv2 linear): BatchNorm + 1x1 conv; logits bilinearly resized to the
  label size; cross-entropy ignoring 255.
- depth, linear (FiT3D / DINOv2 "linear" AdaBins): [BatchNorm +] 1x1 conv to 256 bins uniform over
  [min_depth, max_depth], x4 bilinear upsample, ReLU, +0.1, normalise, depth = sum(p * bin);
  bilinearly resized to the label size. FiT3D's head has no BatchNorm (protocol=paper); the fast
  protocol keeps one. The 1x1 conv runs before the x4 upsample: both are linear and bilinear
  weights sum to 1, so conv(up(x)) == up(conv(x)) exactly, at 1/16 of the cost.
  Loss: SigLoss (lambda 0.15, the first `sigloss_warmup` steps on the mean term only) + 0.5 x the
  multi-scale gradient loss.
- normals, linear: BatchNorm + 1x1 conv to (x, y, z, kappa), bilinear to the label size; Probe3D's
  uncertainty-aware angular loss (Bae et al. 2021), kappa = ELU + 1.01.
- DPT (Probe3D, `eval.head=dpt`): the four quarter blocks (each patch tokens ++ that block's CLS
  token broadcast, Probe3D's `dense-cls`, unless `eval.dpt_input=dense`) each projected by a 1x1
  conv to `hidden` channels and upsampled x2, fused deep to shallow by residual conv units (3x3),
  then x4, 3x3 conv + ReLU + 3x3 conv, x2: output at 16x the token grid, resized to the label size
  (depth bilinear, normals bicubic, as Probe3D). The upsampling follows `eval.probe3d`: `head`
  (Probe3D's HEAD, its 2025 fixes) is bilinear with align_corners=True everywhere, the label
  resize included; `published` (its 2024 code, behind its published table) is nearest inside
  the head and align_corners=False for the label resize. Depth: 256 bins as above, loss 10 x
  SigLoss(lambda 0.85) + 0.5 x gradient loss; normals: as the linear head.

Gradient loss (MegaDepth, as the DINOv2 depth toolbox and Probe3D define it): at strides 1, 2, 4,
6, the sum of |d(i) - d(i+2)| of the masked log-depth difference d = log(pred + eps) - log(gt +
eps) along rows and columns over pixel pairs both valid, divided by the number of valid pixels.
`gradient_loss` applies it over rows and columns, as its definition says (Probe3D after its 2025
fix). FiT3D's code and Probe3D's 2024 code apply the same slicing to 4-D [B, 1, H, W] tensors, so
it runs over batch and channel instead: `batch_sliced_gradient_loss` reproduces that (exactly 0
at FiT3D's 2 images per GPU; differences between images two apart in a batch of Probe3D's 8).

protocol=paper reproduces FiT3D's published pipeline unless `eval.fixes=true` (`paper_loss`):
SigLoss and the gradient loss per GPU on `eval.paper_gpu_batch` (2) images, then averaged (DDP
averages the GPUs' gradients), the gradient loss sliced over the batch, and segmentation
cross-entropy averaged over every pixel, ignored ones included (mmseg 0.27's
`avg_non_ignore=False`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fit3d.eval.metrics import IGNORE_INDEX, has_normal

EPS = 1e-3
"""Added inside the logarithms of SigLoss and the gradient loss (DINOv2 toolbox, Probe3D)."""


def resample(
    x: Tensor,
    size: tuple[int, int],
    stride: int = 1,
    mode: str = "bilinear",
    align_corners: bool = False,
) -> Tensor:
    """Resize x [B, C, h, w] to `size`, evaluated only at the pixels (i*stride + stride//2,
    j*stride + stride//2) of that size.

    stride 1 is `F.interpolate(x, size, mode, align_corners)`; a larger stride gives the same
    values on a strided subset of pixels (`grid_sample` at those coordinates), so probes can train
    on a regular subset of label pixels at a fraction of the cost.
    """
    if stride == 1:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    off = stride // 2

    def coords(n: int) -> Tensor:
        i = torch.arange(off, n, stride, dtype=x.dtype, device=x.device)
        return 2 * i / max(n - 1, 1) - 1 if align_corners else (2 * i + 1) / n - 1

    gy, gx = torch.meshgrid(coords(size[0]), coords(size[1]), indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=align_corners)


def upsample_matrix(
    n_in: int, n_out: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing with align_corners=False (edges clamped),
    computed in float64, returned in `dtype`."""
    src = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    rows = torch.arange(n_out, device=device)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(dtype)


class _BinsToDepth(torch.autograd.Function):
    """`bins_to_depth` with a hand-written backward: two passes over the [B, K, H*W] bins each
    way instead of the ~6 autograd makes (relu, +0.1, einsum, sum), ~2x faster on a CPU, where
    this op dominated the depth probes (equal to the autograd form to rounding; tested)."""

    @staticmethod
    def forward(ctx, logits: Tensor, centres: Tensor) -> Tensor:
        b, k = logits.shape[:2]
        u = logits.reshape(b, k, -1)  # [B, K, N]
        with torch.autocast(logits.device.type, enabled=False):  # one dtype both ways
            p = torch.clamp_min(u, 0).add_(0.1)  # [B, K, N]
            w = torch.stack([centres.to(p.dtype), torch.ones_like(p[0, :, 0])])  # [2, K]
            num_den = torch.matmul(w, p)  # [B, 2, N]
            depth = num_den[:, 0] / num_den[:, 1]  # [B, N]
        ctx.save_for_backward(u, w, depth, num_den[:, 1])
        ctx.shape = logits.shape
        return depth.reshape(b, *logits.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        u, w, depth, den = ctx.saved_tensors
        # d depth / d p_k = (centre_k - depth) / den: a rank-2 outer product over the bins
        a = grad.reshape(depth.shape).to(w.dtype) / den  # [B, N]
        grad_p = torch.matmul(w.T, torch.stack([a, -a * depth], 1))  # [B, K, N]
        # zero where the ReLU was off: ReLU's own backward kernel, one pass (a mask + fill took
        # 2-10x as long on a CPU)
        return torch.ops.aten.threshold_backward(grad_p, u, 0).view(ctx.shape), None


def bins_to_depth(logits: Tensor, centres: Tensor) -> Tensor:
    """AdaBins "linear" normalisation: logits [B, K, H, W] -> depth [B, H, W] = sum(p * centre),
    p = (ReLU(logits) + 0.1) / sum (fixed centres: no gradient reaches them)."""
    return _BinsToDepth.apply(logits, centres.detach())


class SegHead(nn.Module):
    """BatchNorm + 1x1 conv; logits resized to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> logits [B, K, H, W] (H, W = size, strided by `stride`)."""
        return resample(self.conv(self.bn(x)), size, stride)


class DepthHead(nn.Module):
    """[BatchNorm +] 1x1 conv to depth bins, x4 upsample, ReLU-normalised expected depth.

    `constant`: the last `constant` input channels are the same at every grid cell (FiT3D's CLS
    token broadcast over the grid): their part of the 1x1 conv is taken once per image and added
    to every cell. The same function and gradients (the BatchNorm still sees every cell), at half
    the conv's multiply-adds for a single backbone's input."""

    def __init__(
        self,
        in_channels: int,
        max_depth: float,
        min_depth: float = 1e-3,
        bins: int = 256,
        batch_norm: bool = True,
        constant: int = 0,
    ):
        super().__init__()
        if not 0 <= constant < in_channels:
            raise ValueError(f"constant={constant} of {in_channels} input channels")
        self.bn = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, bins, 1)
        self.constant = constant
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> depth [B, H, W] metres (H, W = size, strided by `stride`)."""
        x = self.bn(x)
        if self.constant:
            c = x.shape[1] - self.constant
            weight = self.conv.weight  # [bins, C, 1, 1]
            logits = F.conv2d(x[:, :c], weight[:, :c], self.conv.bias)  # [B, bins, h, w]
            per_image = x[:, c:, 0, 0] @ weight[:, c:, 0, 0].T.to(x.dtype)  # [B, bins]
            logits = logits + per_image[:, :, None, None].to(logits.dtype)
        else:
            logits = self.conv(x)  # [B, bins, h, w]
        h, w = logits.shape[2:]
        up_h = upsample_matrix(h, 4 * h, logits.device, logits.dtype)
        up_w = upsample_matrix(w, 4 * w, logits.device, logits.dtype)
        logits = up_h @ logits @ up_w.T  # exact x4 bilinear upsample, [B, bins, 4h, 4w]
        depth = bins_to_depth(logits, self.centres)  # [B, 4h, 4w]
        return resample(depth[:, None], size, stride)[:, 0]


class NormalHead(nn.Module):
    """BatchNorm + 1x1 conv to (x, y, z, kappa); resized to the label size."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, 4, 1)

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> [B, H, W, 4]: unit normal (camera frame) and kappa > 1."""
        return _normals_out(resample(self.conv(self.bn(x)), size, stride))


def unit(x: Tensor, dim: int) -> Tensor:
    """x / max(|x|, 1e-12) along `dim` in fp32: `F.normalize`'s result. torch's CPU norm over a
    short dimension that is not the innermost ([B, 3, H, W] along 1) ran 40-70x slower than this
    sum of squares, and the normals probe spent a third of its time there."""
    x = x.float()
    return x / x.square().sum(dim, keepdim=True).sqrt().clamp_min(1e-12)


def _normals_out(out: Tensor) -> Tensor:
    """[B, 4, H, W] raw -> [B, H, W, 4] fp32: normalised xyz and kappa = ELU + 1.01."""
    normal = unit(out[:, :3], 1)
    kappa = F.elu(out[:, 3:].float()) + 1.01
    return torch.cat([normal, kappa], 1).permute(0, 2, 3, 1)


class _ResidualConvUnit(nn.Module):
    """x + ReLU(conv(ReLU(conv(x)))), 3x3 convolutions (Probe3D's refinement unit)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.conv2(torch.relu(self.conv1(x))))


PROBE3D_CODE = ("head", "published")
"""Probe3D's code versions `eval.probe3d` names (module docstring)."""


class DPTHead(nn.Module):
    """Probe3D's DPT-style head on four feature maps (see the module docstring).

    Args:
        in_channels: channels of each of the four maps (shallow to deep).
        task: `depth` (256 bins -> metres over [min_depth, max_depth]) or `normals` (4 outputs).
        hidden: fusion width (Probe3D: 512).
        code: `head` (bilinear, align_corners=True) or `published` (nearest inside the head,
            align_corners=False for the label resize).
    """

    def __init__(
        self,
        in_channels: list[int],
        task: str,
        hidden: int = 512,
        max_depth: float = 10.0,
        min_depth: float = 1e-3,
        bins: int = 256,
        code: str = "head",
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"DPT head takes 4 maps, got {len(in_channels)}")
        if code not in PROBE3D_CODE:
            raise ValueError(f"unknown Probe3D code version {code!r}")
        self.task, self.code = task, code
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_channels)
        self.skip = nn.ModuleList(_ResidualConvUnit(hidden) for _ in range(3))  # levels 0..2
        self.refine = nn.ModuleList(_ResidualConvUnit(hidden) for _ in range(4))
        out = bins if task == "depth" else 4
        self.out1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out2 = nn.Conv2d(hidden, out, 3, padding=1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def _up(self, x: Tensor, factor: int) -> Tensor:
        if self.code == "published":
            return F.interpolate(x, scale_factor=factor, mode="nearest")
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)

    def raw(self, feats: list[Tensor]) -> Tensor:
        """Four maps [B, C_k, h, w] -> raw output [B, out, 16h, 16w]."""
        p = [self._up(conv(f), 2) for conv, f in zip(self.proj, feats, strict=True)]
        y = self.refine[3](p[3])
        for k in (2, 1, 0):
            y = self.refine[k](self.skip[k](p[k]) + y)
        y = self.out2(torch.relu(self.out1(self._up(y, 4))))
        return self._up(y, 2)

    def forward(self, feats: list[Tensor], size: tuple[int, int], stride: int = 1) -> Tensor:
        """-> depth [B, H, W] metres, or normals [B, H, W, 4] (unit xyz, kappa)."""
        out = self.raw(feats)
        corners = self.code == "head"
        if self.task == "depth":
            depth = bins_to_depth(out, self.centres)
            return resample(depth[:, None], size, stride, "bilinear", corners)[:, 0]
        return _normals_out(resample(out, size, stride, "bicubic", corners))


# --- losses --------------------------------------------------------------------------------
def sig_loss(
    pred: Tensor, gt: Tensor, lam: float = 0.15, mean_only: bool = False, eps: float = EPS
) -> Tensor:
    """SigLoss over pixels with gt > 0: sqrt(var(g) + lam * mean(g)^2), g = log(pred + eps) -
    log(gt + eps); the warm-up form (`mean_only`) is sqrt(lam * mean(g)^2). var is unbiased,
    as torch.var (the DINOv2 toolbox)."""
    m = gt > 0
    g = torch.log(pred[m].clamp_min(0) + eps) - torch.log(gt[m] + eps)
    if g.numel() < 2:
        return pred.sum() * 0
    if mean_only:
        return torch.sqrt(lam * g.mean() ** 2 + 1e-12)
    return torch.sqrt(g.var() + lam * g.mean() ** 2 + 1e-12)


def probe3d_sig_loss(pred: Tensor, gt: Tensor, sigma: float = 0.85, eps: float = EPS) -> Tensor:
    """Probe3D's depth term: sqrt(mean(g^2) - sigma * mean(g)^2) over pixels with gt > 0."""
    m = gt > 0
    g = torch.log(pred[m].clamp_min(0) + eps) - torch.log(gt[m] + eps)
    if g.numel() == 0:
        return pred.sum() * 0
    return torch.sqrt((g.pow(2).mean() - sigma * g.mean() ** 2).clamp_min(0) + 1e-12)


def gradient_loss(pred: Tensor, gt: Tensor, eps: float = EPS) -> Tensor:
    """Multi-scale gradient loss of pred, gt [B, H, W] (see the module docstring)."""
    total = pred.sum() * 0
    for s in (1, 2, 4, 6):
        p, g = pred[:, ::s, ::s], gt[:, ::s, ::s]
        m = (g > 0).to(p.dtype)
        n = m.sum()
        if n == 0:
            continue
        d = (torch.log(p.clamp_min(0) + eps) - torch.log(g + eps)) * m
        gy = (d[:, :-2] - d[:, 2:]).abs() * m[:, :-2] * m[:, 2:]
        gx = (d[:, :, :-2] - d[:, :, 2:]).abs() * m[:, :, :-2] * m[:, :, 2:]
        total = total + (gx.sum() + gy.sum()) / n
    return total


def batch_sliced_gradient_loss(pred: Tensor, gt: Tensor, eps: float = EPS) -> Tensor:
    """The gradient loss as FiT3D's and Probe3D's 2024 code compute it on [B, 1, H, W] maps
    (module docstring): strides 1, 2, 4, 6 and the +-2 differences index the batch and channel
    axes, so it compares images b and b + 2 of the batch and is exactly 0 for B <= 2.
    pred, gt: [B, H, W]."""
    p4, g4 = pred[:, None], gt[:, None]  # [B, 1, H, W]
    total = pred.sum() * 0
    for s in (1, 2, 4, 6):
        p, g = p4[::s, ::s], g4[::s, ::s]
        m = (g > 0).to(p.dtype)
        d = (torch.log(p.clamp_min(0) + eps) - torch.log(g + eps)) * m
        gb = (d[:-2] - d[2:]).abs() * m[:-2] * m[2:]  # batch axis
        gc = (d[:, :-2] - d[:, 2:]).abs() * m[:, :-2] * m[:, 2:]  # channel axis: empty
        total = total + (gb.sum() + gc.sum()) / m.sum().clamp_min(1)  # the original: 0/0 = NaN
    return total


def angular_nll(out: Tensor, gt: Tensor, eps: float = 1e-4) -> Tensor:
    """Uncertainty-aware angular loss, mean over the pixels that count (`has_normal`).

    out: [B, H, W, 4] (unit normal, kappa); gt: [B, H, W, 3] (0 = invalid) or [B, H, W, 4] (xyz
    + validity; a counted zero xyz is 90 degrees from any prediction, as in Probe3D). Per pixel:
    -log(kappa^2 + 1) + kappa * angle + log(1 + exp(-kappa * pi)).
    """
    m = has_normal(gt)  # [B, H, W]
    normal, kappa = out[m][:, :3], out[m][:, 3]
    if kappa.numel() == 0:
        return out.sum() * 0
    cos = (normal * unit(gt[m][:, :3], -1).to(normal.dtype)).sum(-1).clamp(-1 + eps, 1 - eps)
    nll = (
        -torch.log(kappa**2 + 1)
        + kappa * torch.acos(cos)
        + torch.log1p(torch.exp(-kappa * math.pi))
    )
    return nll.mean()


def cross_entropy_all_pixels(logits: Tensor, labels: Tensor) -> Tensor:
    """mmseg 0.27's default cross-entropy: the sum over non-ignored pixels divided by the number
    of all pixels, ignored ones included (`avg_non_ignore=False`). logits [B, K, H, W]."""
    ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / labels.numel()


def per_gpu(loss: Callable[[Tensor, Tensor], Tensor], gpu_batch: int):
    """`loss(out, y)` computed on consecutive chunks of `gpu_batch` images and averaged, as DDP
    averages the per-GPU losses' gradients."""

    def f(out: Tensor, y: Tensor) -> Tensor:
        chunks = [loss(o, t) for o, t in zip(out.split(gpu_batch), y.split(gpu_batch), strict=True)]
        return torch.stack(chunks).mean()

    return f


def loss_fn(
    task: str,
    head: str,
    sigloss_warmup: int = 0,
    *,
    as_published: bool = False,
    gpu_batch: int = 2,
    probe3d: str = "head",
) -> Callable[[Tensor, Tensor, int], Tensor]:
    """Training loss `f(out, y, step)` of a probe (`task` seg/depth/normals, `head` linear/dpt).

    `as_published` (protocol=paper without `eval.fixes`): FiT3D's linear probes as published
    (per-GPU SigLoss and batch-sliced gradient loss on `gpu_batch` images, cross-entropy over
    all pixels); `probe3d="published"` (its 2024 code): the DPT depth loss with the batch-sliced
    gradient loss.
    """
    if task == "seg":
        if as_published:
            return lambda out, y, step: cross_entropy_all_pixels(out, y)
        return lambda out, y, step: F.cross_entropy(out, y.long(), ignore_index=IGNORE_INDEX)
    if task == "normals":
        return lambda out, y, step: angular_nll(out, y.float())
    if head == "dpt":
        grad = batch_sliced_gradient_loss if probe3d == "published" else gradient_loss
        return lambda out, y, step: (
            10 * probe3d_sig_loss(out, y.float()) + 0.5 * grad(out, y.float())
        )
    if as_published:

        def published(out: Tensor, y: Tensor, step: int) -> Tensor:
            def one_gpu(o: Tensor, t: Tensor) -> Tensor:
                sig = sig_loss(o, t, mean_only=step < sigloss_warmup)
                return sig + 0.5 * batch_sliced_gradient_loss(o, t)

            return per_gpu(one_gpu, gpu_batch)(out, y.float())

        return published
    return lambda out, y, step: (
        sig_loss(out, y.float(), mean_only=step < sigloss_warmup)
        + 0.5 * gradient_loss(out, y.float())
    )


# --- schedules (factor of the base learning rate at a step) --------------------------------
def fast_schedule(total: int, warmup_frac: float = 0.1) -> Callable[[int], float]:
    """protocol=fast: linear warm-up over `warmup_frac` of the steps, then poly (power 0.9)."""
    warmup = max(int(warmup_frac * total), 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(1 - (step - warmup) / max(total - warmup, 1), 0.0) ** 0.9

    return factor


def mmcv_poly(total: int, warmup: int, power: float = 1.0, ratio: float = 1e-6):
    """FiT3D's segmentation schedule (mmcv `poly`, min_lr 0, with `linear` warm-up): factor
    (1 - t/T)^power, times 1 - (1 - t/W)(1 - ratio) during the first W steps."""

    def factor(step: int) -> float:
        f = max(1 - step / max(total, 1), 0.0) ** power
        if step < warmup:
            f *= 1 - (1 - step / warmup) * (1 - ratio)
        return f

    return factor


def mmcv_cosine(total: int, warmup: int, ratio: float = 1e-3, min_ratio: float = 1e-8):
    """FiT3D's depth schedule (mmcv `CosineAnnealing`, min_lr_ratio 1e-8, `linear` warm-up with
    ratio 1e-3): min + (1 - min)(1 + cos(pi t/T))/2, times the warm-up factor."""

    def factor(step: int) -> float:
        f = min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(step / total, 1.0)))
        if step < warmup:
            f *= 1 - (1 - step / warmup) * (1 - ratio)
        return f

    return factor


def one_cycle_beta1(total: int, pct: float = 0.3, lo: float = 0.85, hi: float = 0.95):
    """FiT3D's depth momentum (mmcv `OneCycle` momentum defaults): Adam's beta1 anneals (cosine)
    from 0.95 to 0.85 over the first 30% of the steps, then back to 0.95."""

    def beta1(step: int) -> float:
        up = max(pct * total, 1.0)
        if step <= up:
            t, a, b = step / up, hi, lo
        else:
            t, a, b = (step - up) / max(total - up, 1.0), lo, hi
        return b + (a - b) * (1 + math.cos(math.pi * min(t, 1.0))) / 2

    return beta1


def probe3d_schedule(total: int, warmup: float, min_factor: float = 0.01):
    """Probe3D's schedule: linear warm-up from `min_factor` to 1 over `warmup` steps, then cosine
    (a quarter period) down to `min_factor`."""

    def factor(step: int) -> float:
        if step <= warmup:
            return (1 - min_factor) * step / max(warmup, 1e-9) + min_factor
        t = (step - warmup) / max(total - warmup, 1e-9)
        return (1 - min_factor) * math.cos(0.5 * math.pi * min(t, 1.0)) + min_factor

    return factor


# --- training ------------------------------------------------------------------------------
Batch = list[tuple[Tensor | list[Tensor], Tensor]]
"""One optimiser step: micro-batches (input [b, C, h, w] or four such maps, labels [b, H, W,
...]) whose gradients add up; weights are the micro-batch sizes."""


def _to(x: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    if isinstance(x, list):
        return [t.to(device, non_blocking=True).float() for t in x]
    return x.to(device, non_blocking=True).float()


def train_head(
    head: nn.Module,
    batches: Iterable[Batch],
    steps: int,
    lr: float,
    schedule: Callable[[int], float],
    loss: Callable[[Tensor, Tensor, int], Tensor],
    device: torch.device,
    weight_decay: float = 1e-4,
    label_stride: int = 1,
    grad_clip: float = 0.0,
    beta1: Callable[[int], float] | None = None,
    amp=None,
    desc: str = "",
) -> nn.Module:
    """Train `head` for `steps` optimiser steps drawn from `batches` (AdamW, betas (0.9, 0.999),
    `schedule(step)` x lr; `beta1(step)` overrides Adam's beta1). The loss is taken on the label
    pixels (i, j) * label_stride + label_stride // 2. Returns the head in eval mode."""
    import contextlib

    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    off = label_stride // 2
    it = iter(batches)
    for step in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=None):
        if beta1 is not None:
            for group in opt.param_groups:
                group["betas"] = (beta1(step), group["betas"][1])
        micro = next(it)
        total = sum(len(y) for _, y in micro)
        opt.zero_grad(set_to_none=True)
        for x, y in micro:
            y = y.to(device, non_blocking=True)
            size = tuple(y.shape[1:3])
            target = y[:, off::label_stride, off::label_stride]
            with amp or contextlib.nullcontext():
                out = head(_to(x, device), size, label_stride)
            value = loss(out.float(), target, step) * (len(y) / total)
            value.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
        opt.step()
        sched.step()
    return head.eval()
