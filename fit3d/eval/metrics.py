"""Pure metric functions for the probes (docs/method.md, "Evaluation").

Conventions follow the evaluation code the papers used:
- segmentation (mmseg): one confusion matrix accumulated over the whole test set; per-class IoU and
  accuracy are NaN for classes absent from both labels and predictions (IoU) or from the labels
  (accuracy) and are skipped by the mean; aAcc is the overall pixel accuracy.
- depth (DINOv2 depth toolbox / Probe3D): metrics per image over pixels with valid ground truth,
  then averaged. An image without a valid pixel is skipped by FiT3D's toolbox (its metrics are
  NaN, and the mean is a nanmean) and averaged in with every metric 0 by Probe3D (its valid
  count is clamped to 1): `empty="skip"` / `empty="zero"`. Probe3D also reports the metrics after
  a least-squares scale-and-shift alignment of each prediction (`aligned_depth_per_image`).
- normals (Probe3D): angular error per pixel; per-image percentages and RMSE, then averaged. Which
  pixels count is the ground truth's fourth channel where it has one (Probe3D: depth > 0, so a
  pixel with depth but no normal, a zero vector, scores 90 degrees), else a non-zero normal.
- correspondence (Probe3D): recall per view pair, averaged over pairs (and per rotation bin). The
  ScanNet protocol measures in 1/4-resolution pixels; the NAVI protocol measures the 3D distance
  (metres) and the 2D distance in full-resolution pixels (`navi_recall`). Rotation bins are
  half-open [lo, hi): a pair at exactly the last upper edge (180 or 120 degrees) is in no bin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fit3d.geometry import ROTATION_BINS

IGNORE_INDEX = 255
EMPTY = ("skip", "zero")
"""What an image without a valid pixel contributes: nothing (FiT3D) or zeros (Probe3D)."""


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


def depth_per_image(
    pred: Tensor, gt: Tensor, valid: Tensor | None = None, empty: str = "skip"
) -> list[dict]:
    """Depth metrics of each image: delta1..3 (fractions, thresholds 1.25^k), AbsRel, SqRel, RMSE
    (metres), RMSE_log, log10, SILog (x100, as the toolbox). An image without a valid pixel is
    left out (`empty="skip"`) or gives 0 for every metric (`"zero"`, module docstring).

    pred, gt: [B, H, W] metres; valid: [B, H, W] bool (default gt > 0; the evaluator has already
    zeroed ground truth outside the protocol's depth range).
    """
    valid = gt > 0 if valid is None else valid & (gt > 0)
    out = []
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            if empty == "zero":
                out.append(dict.fromkeys(DEPTH_KEYS, 0.0))
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


ALIGNED_KEYS = ("aligned_delta1", "aligned_delta2", "aligned_delta3", "aligned_rmse")
"""Probe3D's depth metrics after a per-image least-squares scale-and-shift alignment."""


def scale_shift(pred: Tensor, gt: Tensor) -> tuple[float, float]:
    """(s, t) minimising sum over gt > 0 of (s * pred + t - gt)^2, from the 2x2 normal equations;
    (1, 0) where they are singular (no valid pixel, or a constant prediction). pred, gt: [H, W]."""
    m = gt > 0
    p, g = pred[m].double(), gt[m].double()
    a00, a01, a11 = (p * p).sum(), p.sum(), float(m.sum())
    b0, b1 = (p * g).sum(), g.sum()
    det = float(a00 * a11 - a01 * a01)
    if det == 0:
        return 1.0, 0.0
    return float((a11 * b0 - a01 * b1) / det), float((a00 * b1 - a01 * b0) / det)


def aligned_depth_per_image(pred: Tensor, gt: Tensor) -> list[dict]:
    """`ALIGNED_KEYS` of each image, Probe3D's scale-invariant variant: each prediction is first
    mapped to s * pred + t (`scale_shift`), then delta1..3 (ratio with both sides clamped at
    1e-9, no lower clamp on the aligned prediction) and RMSE over gt > 0; an image without a valid
    pixel gives 0s (Probe3D's clamped count). pred, gt: [B, H, W] metres."""
    out = []
    for p, g in zip(pred, gt, strict=True):
        m = g > 0
        if not m.any():
            out.append(dict.fromkeys(ALIGNED_KEYS, 0.0))
            continue
        s, t = scale_shift(p, g)
        a, g = p[m].double() * s + t, g[m].double()
        ratio = torch.maximum(g / a.clamp_min(1e-9), a / g.clamp_min(1e-9))
        out.append(
            {
                "aligned_delta1": float((ratio < 1.25).double().mean()),
                "aligned_delta2": float((ratio < 1.25**2).double().mean()),
                "aligned_delta3": float((ratio < 1.25**3).double().mean()),
                "aligned_rmse": float(((a - g) ** 2).mean().sqrt()),
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
    of fp16 maps is slow). [..., 4] ground truth carries its validity in channel 3 (> 0.5); its
    xyz may then be zero where a pixel counts without a normal (Probe3D: it scores 90 degrees)."""
    if gt.shape[-1] == 4:
        return gt[..., 3].float() > 0.5
    return gt.float().square().sum(-1) > 0.25


def normal_per_image(
    pred: Tensor, gt: Tensor, valid: Tensor | None = None, empty: str = "skip"
) -> list[dict]:
    """% of pixels within 11.25/22.5/30 deg and angular RMSE (deg) of each image; an image without
    a valid pixel is left out (`empty="skip"`) or gives 0s (`"zero"`, Probe3D). pred: [B, H, W,
    3]; gt: [B, H, W, 3] (unit vectors, 0 = invalid) or [B, H, W, 4] (xyz + validity, see
    `has_normal`); valid: [B, H, W] bool."""
    has = has_normal(gt)
    valid = has if valid is None else valid & has
    out = []
    for p, g, m in zip(pred, gt, valid, strict=True):
        if not m.any():
            if empty == "zero":
                out.append(dict.fromkeys(NORMAL_KEYS, 0.0))
            continue
        ang = angular_error(p[m][..., :3], g[m][..., :3])  # [P]
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
"""Probe3D's ScanNet recall thresholds, in pixels of the 1/4-resolution image (x4 at full
resolution)."""
NAVI_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0), (90.0, 120.0))
"""Probe3D's NAVI relative-rotation bins (degrees) of recall@2 cm."""
NAVI_METRES = (0.01, 0.02, 0.05)
"""Probe3D's NAVI 3D-error thresholds (metres)."""
NAVI_PIXELS = (5.0, 25.0, 50.0)
"""Probe3D's NAVI 2D-error thresholds (full-resolution pixels of the 512x512 crop)."""


def _in_bin(rotations: Tensor, lo: float, hi: float) -> Tensor:
    """Probe3D's bin test: lo <= angle < hi (half-open, the last bin included)."""
    return (rotations >= lo) & (rotations < hi)


def correspondence_recall(
    errors: list[Tensor], rotations: Tensor, thresholds: tuple[float, ...] = CORR_THRESHOLDS
) -> dict[str, float]:
    """Recall@t per pair averaged over pairs, and recall@10 per rotation bin (Probe3D, ScanNet).

    errors: one tensor [M_i] of match errors per view pair, in the units of `thresholds`
    (1/4-resolution pixels); rotations: [P] relative rotation of each pair in degrees. Empty
    bins give NaN. With M_i equal for every pair (Probe3D's 1000 matches) the mean over pairs is
    Probe3D's mean over all matches.
    """
    rec = {t: torch.tensor([(e < t).double().mean() for e in errors]) for t in (*thresholds, 10.0)}
    out = {f"recall_{t:g}px": float(rec[t].mean()) if errors else math.nan for t in thresholds}
    for lo, hi in ROTATION_BINS:
        sel = _in_bin(rotations, lo, hi)
        out[f"recall_10px_rot{lo:g}-{hi:g}"] = (
            float(rec[10.0][sel].mean()) if sel.any() else math.nan
        )
    return out


def navi_recall(err3d: list[Tensor], err2d: list[Tensor], rotations: Tensor) -> dict[str, float]:
    """Probe3D's NAVI correspondence metrics: recall of the 3D error at 1/2/5 cm (`recall_1cm`
    ...), of the 2D error at 5/25/50 full-resolution pixels (`recall2d_5px` ...; per pair,
    averaged over pairs), and recall@2 cm per relative-rotation bin [0,30), [30,60), [60,90),
    [90,120) degrees (`recall_2cm_rot0-30` ...).

    err3d: [M_i] metres per pair; err2d: [M_i] pixels per pair; rotations: [P] degrees.
    """
    out: dict[str, float] = {}
    for errors, thresholds, prefix, unit, scale in (
        (err3d, NAVI_METRES, "recall_", "cm", 100.0),
        (err2d, NAVI_PIXELS, "recall2d_", "px", 1.0),
    ):
        for t in thresholds:
            per_pair = [float((e < t).double().mean()) for e in errors]
            key = f"{prefix}{t * scale:g}{unit}"
            out[key] = sum(per_pair) / len(per_pair) if per_pair else math.nan
    rec2 = torch.tensor([float((e < 0.02).double().mean()) for e in err3d])
    for lo, hi in NAVI_BINS:
        sel = _in_bin(rotations, lo, hi)
        out[f"recall_2cm_rot{lo:g}-{hi:g}"] = float(rec2[sel].mean()) if sel.any() else math.nan
    return out
