"""Pure metric functions for the probes (docs/method.md, "Evaluation").

Conventions follow the evaluation code the papers used:
- segmentation (mmseg): one confusion matrix accumulated over the whole test set; per-class IoU and
  accuracy are NaN for classes absent from both labels and predictions (IoU) or from the labels
  (accuracy) and are skipped by the mean; aAcc is the overall pixel accuracy.
- depth (DINOv2 depth toolbox / Probe3D): metrics per image over pixels with valid ground truth,
  then averaged.
- normals (Probe3D): angular error per pixel; per-image percentages and RMSE, then averaged.
- correspondence (Probe3D): recall per view pair, averaged over pairs (and per rotation bin), in
  1/4-resolution pixels.
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


DEPTH_KEYS = ("delta1", "delta2", "delta3", "absrel", "sqrel", "rmse", "rmse_log", "log10", "silog")
"""Depth metrics of the DINOv2 depth toolbox (FiT3D's), per image then averaged."""


def depth_per_image(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> list[dict]:
    """Depth metrics of each image with a valid pixel: delta1..3 (fractions, thresholds 1.25^k),
    AbsRel, SqRel, RMSE (metres), RMSE_log, log10, SILog (x100, as the toolbox).

    pred, gt: [B, H, W] metres; valid: [B, H, W] bool (default gt > 0; the evaluator has already
    zeroed ground truth outside the protocol's depth range).
    """
    valid = gt > 0 if valid is None else valid & (gt > 0)
    out = []
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            continue
        p, g = p[m].double().clamp_min(1e-3), g[m].double()
        ratio = torch.maximum(p / g, g / p)
        err = torch.log(p) - torch.log(g)
        out.append(
            {
                "delta1": float((ratio < 1.25).double().mean()),
                "delta2": float((ratio < 1.25**2).double().mean()),
                "delta3": float((ratio < 1.25**3).double().mean()),
                "absrel": float(((p - g).abs() / g).mean()),
                "sqrel": float(((p - g) ** 2 / g).mean()),
                "rmse": float(((p - g) ** 2).mean().sqrt()),
                "rmse_log": float((err**2).mean().sqrt()),
                "log10": float((torch.log10(p) - torch.log10(g)).abs().mean()),
                "silog": float(((err**2).mean() - err.mean() ** 2).clamp_min(0).sqrt() * 100),
            }
        )
    return out


def mean_metrics(per_image: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Average of per-image metric dicts (NaN for every key when there is none)."""
    if not per_image:
        return dict.fromkeys(keys, math.nan)
    return {k: float(sum(d[k] for d in per_image) / len(per_image)) for k in keys}


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """`DEPTH_KEYS` per image (`depth_per_image`), averaged over images with a valid pixel."""
    return mean_metrics(depth_per_image(pred, gt, valid), DEPTH_KEYS)


def angular_error(pred: Tensor, gt: Tensor) -> Tensor:
    """Angle in degrees between direction fields [..., 3] (normalised here)."""
    cos = (torch.nn.functional.normalize(pred.double(), dim=-1) * gt.double()).sum(-1)
    cos = cos / gt.double().norm(dim=-1).clamp_min(1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


NORMAL_KEYS = ("within_11", "within_22", "within_30", "ang_rmse")


def has_normal(gt: Tensor) -> Tensor:
    """[..., 3] ground-truth normals (0 = invalid) -> [...] bool: |gt| > 0.5, in fp32 (a CPU norm
    of fp16 maps is slow)."""
    return gt.float().square().sum(-1) > 0.25


def normal_per_image(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> list[dict]:
    """% of pixels within 11.25/22.5/30 deg and angular RMSE (deg) of each image with a valid
    pixel. pred, gt: [B, H, W, 3] (gt unit vectors, 0 = invalid); valid: [B, H, W] bool."""
    has = has_normal(gt)
    valid = has if valid is None else valid & has
    out = []
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            continue
        ang = angular_error(p[m], g[m])  # [P]
        out.append(
            {
                "within_11": float((ang < 11.25).double().mean() * 100),
                "within_22": float((ang < 22.5).double().mean() * 100),
                "within_30": float((ang < 30.0).double().mean() * 100),
                "ang_rmse": float((ang**2).mean().sqrt()),
            }
        )
    return out


def normal_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """`NORMAL_KEYS` per image (`normal_per_image`), then averaged."""
    return mean_metrics(normal_per_image(pred, gt, valid), NORMAL_KEYS)


CORR_THRESHOLDS = (5.0, 10.0, 20.0)
"""Probe3D's recall thresholds, in pixels of the 1/4-resolution image (x4 at full resolution)."""


def correspondence_recall(
    errors: list[Tensor], rotations: Tensor, thresholds: tuple[float, ...] = CORR_THRESHOLDS
) -> dict[str, float]:
    """Recall@t per pair averaged over pairs, and recall@10 per rotation bin (Probe3D).

    errors: one tensor [M_i] of match errors per view pair, in the units of `thresholds`
    (1/4-resolution pixels); rotations: [P] relative rotation of each pair in degrees. Empty
    bins give NaN. With M_i equal for every pair (Probe3D's 1000 matches) the mean over pairs is
    Probe3D's mean over all matches.
    """
    rec = {t: torch.tensor([(e < t).double().mean() for e in errors]) for t in (*thresholds, 10.0)}
    out = {f"recall_{t:g}px": float(rec[t].mean()) if errors else math.nan for t in thresholds}
    for lo, hi in ROTATION_BINS:
        sel = (rotations >= lo) & ((rotations < hi) | (hi >= 180.0))
        out[f"recall_10px_rot{lo:g}-{hi:g}"] = (
            float(rec[10.0][sel].mean()) if sel.any() else math.nan
        )
    return out
