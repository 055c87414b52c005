"""Probe heads, their losses and one training loop, on cached frozen features.

Heads (all linear in the features; BatchNorm is a per-channel affine map at test time):
- segmentation (DINOv2 linear): BatchNorm + 1x1 conv, logits bilinearly upsampled to label size,
  cross-entropy ignoring 255.
- depth (DINOv2 "linear" AdaBins): BatchNorm + 1x1 conv to 256 bins uniform over
  [min_depth, max_depth], x4 bilinear upsample, ReLU, +0.1, normalise, depth = sum(p * bin
  centre); the prediction is bilinearly resized to label size. The 1x1 conv runs before the x4
  upsample: both are linear and bilinear weights sum to 1, so conv(up(x)) == up(conv(x)) exactly,
  at 1/16 of the cost. Loss: SigLoss (lambda 0.15) + 0.5 x gradient loss on log depth.
- normals (our CPU-scale choice, not Probe3D's DPT head): BatchNorm + 1x1 conv to 4 channels,
  bilinear upsample to label size, xyz normalised, kappa = ELU + 1.01; Probe3D's
  uncertainty-aware angular loss (Bae et al. 2021).
Training: AdamW (weight decay 1e-4), linear warm-up then poly decay, shuffled and seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fit3d.eval.metrics import IGNORE_INDEX, confusion_matrix, depth_metrics, normal_metrics
from fit3d.eval.metrics import seg_metrics as _seg_metrics


class SegHead(nn.Module):
    """BatchNorm + 1x1 conv; logits upsampled to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, C, h, w] -> logits [B, K, H, W]."""
        logits = self.conv(self.bn(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DepthHead(nn.Module):
    """BatchNorm + 1x1 conv to depth bins, x4 upsample, ReLU-normalised expected depth."""

    def __init__(
        self, in_channels: int, max_depth: float, min_depth: float = 1e-3, bins: int = 256
    ):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, C, h, w] -> depth [B, H, W] metres."""
        logits = self.conv(self.bn(x))
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        p = torch.relu(logits) + 0.1
        p = p / p.sum(1, keepdim=True)
        depth = (p * self.centres[None, :, None, None]).sum(1, keepdim=True)  # [B, 1, 4h, 4w]
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0]


class NormalHead(nn.Module):
    """BatchNorm + 1x1 conv to (x, y, z, kappa); upsampled to the label size."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, 4, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, C, h, w] -> [B, H, W, 4]: unit normal (camera frame) and kappa > 1."""
        out = F.interpolate(self.conv(self.bn(x)), size=size, mode="bilinear", align_corners=False)
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
    warmup_frac: float = 0.1,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """Train `head` on cached features x [V, C, h, w] and labels y [V, H, W, ...]; returns it.

    Mini-batches are drawn from a seeded shuffle every epoch; AdamW with linear warm-up over
    `warmup_frac` of the steps, then poly decay (power 0.9) to zero.
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
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm needs 2 samples: skip a lone remainder
                continue
            loss = task.loss(head(x[idx].float(), size), y[idx])
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
