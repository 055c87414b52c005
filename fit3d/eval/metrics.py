"""Pure metric functions for the probes (docs/method.md, "Evaluation").

Conventions follow the evaluation code the papers used:
- segmentation (mmseg): one confusion matrix accumulated over the whole test set; per-class IoU and
  accuracy are NaN for classes absent from both labels and predictions (IoU) or from the labels
  (accuracy) and are skipped by the mean; aAcc is the overall pixel accuracy.
- depth (DINOv2 / Probe3D): metrics per image over pixels with valid ground truth, then averaged.
- normals (Probe3D): angular error per pixel; per-image percentages and RMSE, then averaged.
- correspondence (Probe3D): recall per view pair, averaged over pairs (and per rotation bin).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fit3d.geometry import ROTATION_BINS

IGNORE_INDEX = 255


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Counts [K, K] (rows = ground truth, columns = prediction) over non-ignored pixels.

    pred, target: integer tensors of the same shape; target values outside [0, K) are ignored.
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def seg_metrics(conf: Tensor) -> dict[str, float]:
    """mIoU, mAcc, aAcc (fractions in [0, 1]) from a confusion matrix [K, K] (rows = truth)."""
    conf = conf.double()
    inter = conf.diag()  # [K]
    label_area = conf.sum(1)  # [K]
    union = label_area + conf.sum(0) - inter  # [K]
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.nan)
    acc = torch.where(label_area > 0, inter / label_area.clamp_min(1), torch.nan)
    total = label_area.sum()
    return {
        "miou": float(iou.nanmean()),
        "macc": float(acc.nanmean()),
        "aacc": float(inter.sum() / total) if total > 0 else math.nan,
    }


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """RMSE (metres), AbsRel and delta1 per image, averaged over images with a valid pixel.

    pred, gt: [B, H, W] metres; valid: [B, H, W] bool (default gt > 0).
    """
    valid = gt > 0 if valid is None else valid & (gt > 0)
    rmse, absrel, delta1 = [], [], []
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            continue
        p, g = p[m].double().clamp_min(1e-6), g[m].double()
        rmse.append(((p - g) ** 2).mean().sqrt())
        absrel.append(((p - g).abs() / g).mean())
        delta1.append((torch.maximum(p / g, g / p) < 1.25).double().mean())
    if not rmse:
        return {"rmse": math.nan, "absrel": math.nan, "delta1": math.nan}
    return {
        "rmse": float(torch.stack(rmse).mean()),
        "absrel": float(torch.stack(absrel).mean()),
        "delta1": float(torch.stack(delta1).mean()),
    }


def angular_error(pred: Tensor, gt: Tensor) -> Tensor:
    """Angle in degrees between direction fields [..., 3] (normalised here)."""
    cos = (torch.nn.functional.normalize(pred.double(), dim=-1) * gt.double()).sum(-1)
    cos = cos / gt.double().norm(dim=-1).clamp_min(1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def normal_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """% of pixels within 11.25/22.5/30 deg and angular RMSE (deg), per image then averaged.

    pred, gt: [B, H, W, 3] (gt unit vectors, 0 = invalid); valid: [B, H, W] bool.
    """
    has = gt.norm(dim=-1) > 0.5
    valid = has if valid is None else valid & has
    keys = ("within_11", "within_22", "within_30", "ang_rmse")
    per_image: list[list[Tensor]] = [[] for _ in keys]
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            continue
        ang = angular_error(p[m], g[m])  # [P]
        for i, t in enumerate((11.25, 22.5, 30.0)):
            per_image[i].append((ang < t).double().mean() * 100)
        per_image[3].append((ang**2).mean().sqrt())
    if not per_image[0]:
        return dict.fromkeys(keys, math.nan)
    return {k: float(torch.stack(v).mean()) for k, v in zip(keys, per_image, strict=True)}


def correspondence_recall(
    errors: list[Tensor], rotations: Tensor, thresholds: tuple[float, ...] = (5.0, 10.0, 20.0)
) -> dict[str, float]:
    """Recall@t px per pair averaged over pairs, and recall@10px per rotation bin.

    errors: one tensor [M_i] of reprojection errors (pixels) per view pair;
    rotations: [P] relative rotation of each pair in degrees. Empty bins give NaN.
    """
    rec = {t: torch.tensor([(e < t).double().mean() for e in errors]) for t in (*thresholds, 10.0)}
    out = {f"recall_{t:g}px": float(rec[t].mean()) if errors else math.nan for t in thresholds}
    for lo, hi in ROTATION_BINS:
        sel = (rotations >= lo) & ((rotations < hi) | (hi >= 180.0))
        out[f"recall_10px_rot{lo:g}-{hi:g}"] = (
            float(rec[10.0][sel].mean()) if sel.any() else math.nan
        )
    return out
