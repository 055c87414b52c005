"""Probe heads, their losses and one training loop, on cached frozen features.

Heads (all linear in the features; BatchNorm is a per-channel affine map at test time):
- segmentation (DINOv2 linear): BatchNorm + 1x1 conv, logits bilinearly upsampled to label size,
  cross-entropy ignoring 255.
- depth (DINOv2 "linear" AdaBins): BatchNorm + 1x1 conv to 256 bins uniform over
  [min_depth, max_depth], x4 bilinear upsample, ReLU, +0.1, normalise, depth = sum(p * bin
  centre); the prediction is bilinearly resized to label size. The 1x1 conv runs before the x4
  upsample: both are linear and bilinear weights sum to 1, so conv(up(x)) == up(conv(x)) exactly,
  at 1/16 of the cost; the x4 upsample is two small matmuls (exact, faster than F.interpolate on
  CPU). Loss: SigLoss (lambda 0.15) + 0.5 x gradient loss on log depth.
- normals (our CPU-scale choice, not Probe3D's DPT head): BatchNorm + 1x1 conv to 4 channels,
  bilinear upsample to label size, xyz normalised, kappa = ELU + 1.01; Probe3D's
  uncertainty-aware angular loss (Bae et al. 2021).
Training: AdamW (weight decay 1e-4), linear warm-up then poly decay, shuffled and seeded. For CPU
speed the loss may be taken on a regular subset of label pixels (`label_stride`), where the head
is evaluated exactly as at full resolution; test metrics always use every label pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fit3d.eval.metrics import IGNORE_INDEX, confusion_matrix, depth_metrics, normal_metrics
from fit3d.eval.metrics import seg_metrics as _seg_metrics


def resample(x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
    """Bilinear (align_corners=False) resize of x [B, C, h, w] to `size`, evaluated only at the
    pixel centres (i*stride + stride//2, j*stride + stride//2) of that size.

    stride 1 is `F.interpolate(x, size)`; a larger stride gives exactly those values on a strided
    subset of pixels (`grid_sample` at the same coordinates), which lets probes train on a
    regular subset of label pixels at a fraction of the cost.
    """
    if stride == 1:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    off = stride // 2
    ys = (2 * torch.arange(off, size[0], stride, dtype=x.dtype) + 1) / size[0] - 1
    xs = (2 * torch.arange(off, size[1], stride, dtype=x.dtype) + 1) / size[1] - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _upsample_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing with align_corners=False (edges clamped)."""
    src = ((torch.arange(n_out) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in)
    m.index_put_((torch.arange(n_out), i0), 1 - w1, accumulate=True)
    m.index_put_((torch.arange(n_out), i1), w1, accumulate=True)
    return m


class SegHead(nn.Module):
    """BatchNorm + 1x1 conv; logits upsampled to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> logits [B, K, H, W] (H, W = size, strided by `stride`)."""
        return resample(self.conv(self.bn(x)), size, stride)


class DepthHead(nn.Module):
    """BatchNorm + 1x1 conv to depth bins, x4 upsample, ReLU-normalised expected depth."""

    def __init__(
        self, in_channels: int, max_depth: float, min_depth: float = 1e-3, bins: int = 256
    ):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> depth [B, H, W] metres (H, W = size, strided by `stride`)."""
        logits = self.conv(self.bn(x))  # [B, bins, h, w]
        h, w = logits.shape[2:]
        up_h, up_w = _upsample_matrix(h, 4 * h), _upsample_matrix(w, 4 * w)
        logits = up_h @ logits @ up_w.T  # exact x4 bilinear upsample, [B, bins, 4h, 4w]
        p = torch.relu(logits) + 0.1
        depth = torch.einsum("bkhw,k->bhw", p, self.centres) / p.sum(1)  # [B, 4h, 4w]
        return resample(depth[:, None], size, stride)[:, 0]


class NormalHead(nn.Module):
    """BatchNorm + 1x1 conv to (x, y, z, kappa); upsampled to the label size."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, 4, 1)

    def forward(self, x: Tensor, size: tuple[int, int], stride: int = 1) -> Tensor:
        """x [B, C, h, w] -> [B, H, W, 4]: unit normal (camera frame) and kappa > 1."""
        out = resample(self.conv(self.bn(x)), size, stride)
        normal = F.normalize(out[:, :3], dim=1)
        kappa = F.elu(out[:, 3:]) + 1.01
        return torch.cat([normal, kappa], 1).permute(0, 2, 3, 1)


def sig_loss(pred: Tensor, gt: Tensor, lam: float = 0.15, eps: float = 1e-3) -> Tensor:
    """Scale-invariant log loss sqrt(var(g) + lam * mean(g)^2), g = log pred - log gt, gt > eps."""
    m = gt > eps
    g = torch.log(pred[m].clamp_min(eps)) - torch.log(gt[m])
    if g.numel() < 2:
        return pred.sum() * 0
    return torch.sqrt(g.var() + lam * g.mean() ** 2 + 1e-12)


def gradient_loss(pred: Tensor, gt: Tensor, scales: int = 4, eps: float = 1e-3) -> Tensor:
    """Multi-scale gradient matching of the log-depth difference (MegaDepth / Probe3D style).

    pred, gt: [B, H, W]; at strides 1, 2, 4, 8 the mean |d/dx| + |d/dy| of log(pred) - log(gt)
    over neighbour pairs that both have valid ground truth.
    """
    m = (gt > eps).float()
    g = (torch.log(pred.clamp_min(eps)) - torch.log(gt.clamp_min(eps))) * m
    total = pred.sum() * 0
    for s in range(scales):
        gs, ms = g[:, :: 2**s, :: 2**s], m[:, :: 2**s, :: 2**s]
        mx, my = ms[:, :, 1:] * ms[:, :, :-1], ms[:, 1:] * ms[:, :-1]
        gx = ((gs[:, :, 1:] - gs[:, :, :-1]).abs() * mx).sum()
        gy = ((gs[:, 1:] - gs[:, :-1]).abs() * my).sum()
        total = total + (gx + gy) / (mx.sum() + my.sum()).clamp_min(1)
    return total


def angular_nll(out: Tensor, gt: Tensor) -> Tensor:
    """Uncertainty-aware angular loss, mean over pixels with a ground-truth normal.

    out: [B, H, W, 4] (unit normal, kappa); gt: [B, H, W, 3] (0 = invalid). Per pixel:
    -log(kappa^2 + 1) + kappa * angle + log(1 + exp(-kappa * pi)).
    """
    m = gt.norm(dim=-1) > 0.5
    normal, kappa = out[m][:, :3], out[m][:, 3]
    if kappa.numel() == 0:
        return out.sum() * 0
    cos = (normal * F.normalize(gt[m], dim=-1)).sum(-1).clamp(-0.999, 0.999)
    nll = (
        -torch.log(kappa**2 + 1)
        + kappa * torch.acos(cos)
        + torch.log1p(torch.exp(-kappa * math.pi))
    )
    return nll.mean()


@dataclass(frozen=True)
class Task:
    """One probe task: head factory, loss, metrics and the metric that picks the learning rate."""

    name: str
    select: str
    higher_is_better: bool

    def head(self, in_channels: int, num_classes: int = 0, max_depth: float = 10.0) -> nn.Module:
        """A fresh head for features with `in_channels` channels."""
        if self.name == "seg":
            return SegHead(in_channels, num_classes)
        if self.name == "depth":
            return DepthHead(in_channels, max_depth)
        return NormalHead(in_channels)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Training loss of head output `out` against labels `y`."""
        if self.name == "seg":
            return F.cross_entropy(out, y.long(), ignore_index=IGNORE_INDEX)
        if self.name == "depth":
            return sig_loss(out, y.float()) + 0.5 * gradient_loss(out, y.float())
        return angular_nll(out, y.float())


TASKS = {
    "seg": Task("seg", "miou", True),
    "depth": Task("depth", "rmse", False),
    "normals": Task("normals", "ang_rmse", False),
}


def train_probe(
    head: nn.Module,
    task: Task,
    x: Tensor,
    y: Tensor,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    label_stride: int = 1,
    warmup_frac: float = 0.1,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """Train `head` on cached features x [V, C, h, w] and labels y [V, H, W, ...]; returns it.

    Mini-batches are drawn from a seeded shuffle every epoch; AdamW with linear warm-up over
    `warmup_frac` of the steps, then poly decay (power 0.9) to zero. The loss is taken on the
    label pixels (i, j) * label_stride + label_stride // 2, where the head is evaluated exactly
    as at full resolution (`resample`).
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    warmup = max(int(warmup_frac * total), 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return (1 - (step - warmup) / max(total - warmup, 1)) ** 0.9

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    head.train()
    size = tuple(y.shape[1:3])
    off = label_stride // 2
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            target = y[idx][:, off::label_stride, off::label_stride]
            loss = task.loss(head(x[idx].float(), size, label_stride), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def evaluate_probe(
    head: nn.Module, task: Task, x: Tensor, y: Tensor, batch_size: int = 8, num_classes: int = 0
) -> dict[str, float]:
    """Metrics of a trained head on features x [V, C, h, w] against labels y [V, H, W, ...]."""
    head.eval()
    size = tuple(y.shape[1:3])
    preds: list[Tensor] = []
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for b in range(0, x.shape[0], batch_size):
        out = head(x[b : b + batch_size].float(), size)
        if task.name == "seg":
            conf += confusion_matrix(out.argmax(1), y[b : b + batch_size], num_classes)
        else:
            preds.append(out[..., :3] if task.name == "normals" else out)
    if task.name == "seg":
        return _seg_metrics(conf)
    pred = torch.cat(preds)
    if task.name == "depth":
        return depth_metrics(pred, y.float())
    return normal_metrics(pred, y.float())
