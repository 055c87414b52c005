"""protocol=paper: FiT3D's linear probes as its evaluation configs state them.

docs/method.md, "Evaluation: linear probes (FiT3D)". Features are recomputed every iteration from
the frozen backbones (augmented crops cannot be cached). Iteration counts are FiT3D's at global
batch 16 (2 images x 8 GPUs) and scale by 16 / `eval.paper_batch_size`, so every setting sees as
many images; warm-ups scale the same way. Nothing is picked on the test split: the last iterate
is scored.

Segmentation (mmseg pipeline semantics, written here in torch/OpenCV):
  train: resize keeping the ratio to fit (2048 r, 512 r), r ~ U(0.5, 2); random 512 crop, retried
  up to 10 times until no class covers >= 75% of its labelled pixels; horizontal flip (p 0.5);
  photometric distortion (brightness +-32, contrast 0.5-1.5 before or after the HSV steps,
  saturation 0.5-1.5, hue +-18, each p 0.5, on 0-255 values); pad to the crop (image: the mean
  colour, i.e. 0 after normalisation; labels: 255). AdamW lr 1e-3, wd 1e-4; poly (power 1) to 0
  with a 1500-iteration linear warm-up from 1e-6; 40k iterations.
  test: resize keeping the ratio to fit (2048, 512), slide 512 windows at stride 341, average the
  window logits, resize to the label size.
Depth (DINOv2 depth toolbox semantics):
  train: rotate by U(-2.5, 2.5) degrees (p 0.5; image bilinear, depth nearest, 0 outside), flip
  (p 0.5), random crop (416 x 544; KITTI 352 x 704), colour augmentation (p 0.5: gamma 0.9-1.1,
  brightness 0.75-1.25 (KITTI 0.9-1.1), per-channel colour 0.9-1.1). FiT3D's ColorAug raises the
  0-255 values to the gamma (255^1.1 = 444 before the clip at 255: much stronger than AdaBins'
  gamma on [0, 1]); that is the default, `eval.fixes=true` applies it on [0, 1]. No BatchNorm;
  AdamW lr 1e-4, wd 0.01, gradient clip 35, mmcv cosine annealing with a 12,800-iteration linear
  warm-up (ratio 1e-3), OneCycle beta1; SigLoss warm-up 100 iterations; 38.4k iterations.
  test: the whole image and its mirror image, predictions averaged (flip test-time augmentation).
Both probes read the backbone at the dataset's evaluation resolution, centre-padded up to a
multiple of the patch size (`eval.fit`, `fit3d.eval.features`).

Probe3D's probes (normals, DPT heads; `eval.probe3d_augment`) train on augmented images with
features recomputed: colour jitter (p 0.8: brightness, contrast, saturation 0.8-1.2, hue +-0.2,
in a random order, torchvision's ColorJitter(0.2, 0.2, 0.2, 0.2)), then (p 0.5) a random square
crop of 0.5-1 of the area resized back with nearest neighbours (albumentations'
RandomResizedCrop, ratio 1), applied to image, depth and normals alike (Probe3D's NYU). On NAVI
Probe3D's transform list puts the jitter after the normalisation (so torchvision clamps the
normalised values to [0, 1]) and has no crop; that is reproduced too.

`as_published` / `fixes_applied` list, for the report, which of the originals' quirks a run
reproduced and which fixes it applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d.backbones import IMAGENET_MEAN
from fit3d.eval.features import NORMS, MapPlan, extract

PAPER_BATCH = 16
"""FiT3D's global batch (2 images x 8 GPUs); iteration counts are given at this batch."""
SEG_STRIDE = 341
"""Slide-inference stride (FiT3D: 341 for 512 windows)."""
DEPTH_CROP = {"kitti": (352, 704)}
"""Depth train crop per dataset (h, w); others (416, 544) (FiT3D's configs)."""


def scaled_iters(iters: int, global_batch: int) -> int:
    """Iterations at `global_batch` that see as many images as `iters` at batch 16."""
    return max(math.ceil(iters * PAPER_BATCH / max(global_batch, 1)), 1)


# --- segmentation augmentation -------------------------------------------------------------
def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h', w') of an h x w image resized keeping its ratio to fit scale (long, short)."""
    long_s, short_s = max(scale), min(scale)
    f = min(long_s / max(h, w), short_s / min(h, w))
    return max(int(h * f + 0.5), 1), max(int(w * f + 0.5), 1)


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, (size[1], size[0]), interpolation=mode)


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image [H, W, 3]."""

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(int) + int(rng.integers(-18, 18))) % 180).astype(
            np.uint8
        )
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def seg_augment(
    image: Tensor,
    seg: Tensor,
    rng: np.random.Generator,
    crop: int = 512,
    scale: tuple[int, int] = (2048, 512),
    cat_max_ratio: float = 0.75,
) -> tuple[Tensor, Tensor]:
    """FiT3D's segmentation train pipeline (module docstring): image [H, W, 3] in [0, 1], seg
    [H, W] -> (image [crop, crop, 3], seg [crop, crop] with 255 padding)."""
    img = (image.numpy() * 255).round().astype(np.uint8)
    lab = seg.numpy().astype(np.uint8)
    r = rng.uniform(0.5, 2.0)
    size = rescale_size(*lab.shape, (int(max(scale) * r), int(min(scale) * r)))
    img, lab = _resize(img, size, False), _resize(lab, size, True)
    ch, cw = min(crop, lab.shape[0]), min(crop, lab.shape[1])
    for _ in range(10):
        y = int(rng.integers(0, lab.shape[0] - ch + 1))
        x = int(rng.integers(0, lab.shape[1] - cw + 1))
        window = lab[y : y + ch, x : x + cw]
        _, counts = np.unique(window[window != 255], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    img, lab = img[y : y + ch, x : x + cw], lab[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = photometric(np.ascontiguousarray(img), rng)
    out_img = np.empty((crop, crop, 3), np.float32)
    out_img[:] = np.asarray(IMAGENET_MEAN, np.float32)
    out_img[:ch, :cw] = img.astype(np.float32) / 255.0
    out_lab = np.full((crop, crop), 255, np.int64)
    out_lab[:ch, :cw] = lab
    return torch.from_numpy(out_img), torch.from_numpy(out_lab)


# --- depth augmentation --------------------------------------------------------------------
def depth_augment(
    image: Tensor,
    depth: Tensor,
    rng: np.random.Generator,
    crop: tuple[int, int],
    brightness: tuple[float, float] = (0.75, 1.25),
    gamma_on_255: bool = False,
) -> tuple[Tensor, Tensor]:
    """FiT3D's depth train pipeline (module docstring): image [H, W, 3] in [0, 1], depth [H, W]
    -> (image [h, w, 3], depth [h, w]) with (h, w) = crop (or the image, if smaller).
    `gamma_on_255`: the colour augmentation's gamma acts on 0-255 values, as FiT3D's ColorAug."""
    img, dep = image.numpy().astype(np.float32), depth.numpy().astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(-2.5, 2.5)
        h, w = dep.shape
        rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
        img = cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        dep = cv2.warpAffine(dep, rot, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    if rng.random() < 0.5:
        img, dep = img[:, ::-1], dep[:, ::-1]
    ch, cw = min(crop[0], dep.shape[0]), min(crop[1], dep.shape[1])
    y = int(rng.integers(0, dep.shape[0] - ch + 1))
    x = int(rng.integers(0, dep.shape[1] - cw + 1))
    img, dep = img[y : y + ch, x : x + cw], dep[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        scale = 255.0 if gamma_on_255 else 1.0
        img = (np.clip(img, 0, 1) * scale) ** rng.uniform(0.9, 1.1)
        img = img * rng.uniform(*brightness) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        img = np.clip(img, 0, scale) / scale
    return torch.from_numpy(np.ascontiguousarray(img, np.float32)), torch.from_numpy(
        np.ascontiguousarray(dep)
    )


# --- Probe3D augmentation ------------------------------------------------------------------
def color_jitter(image: Tensor, rng: np.random.Generator, amount: float = 0.2) -> Tensor:
    """torchvision's ColorJitter(amount x 4) on image [3, H, W]: brightness, contrast and
    saturation factors U(1 - amount, 1 + amount), hue shift U(-amount, amount), in a random order
    (torchvision's functional ops, so float images are clamped to [0, 1] after each)."""
    import torchvision.transforms.functional as TF

    ops = {
        0: lambda x, f: TF.adjust_brightness(x, f),
        1: lambda x, f: TF.adjust_contrast(x, f),
        2: lambda x, f: TF.adjust_saturation(x, f),
        3: lambda x, f: TF.adjust_hue(x, f),
    }
    factors = [rng.uniform(1 - amount, 1 + amount) for _ in range(3)]
    factors.append(rng.uniform(-amount, amount))
    for k in rng.permutation(4):
        image = ops[int(k)](image, float(factors[k]))
    return image


def resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.5, 1.0)):
    """(top, left, height, width) of albumentations' RandomResizedCrop at ratio 1: a square of
    U(scale) of the area at a uniform integer position (up to 10 draws, else the centre)."""
    for _ in range(10):
        side = int(round(math.sqrt(rng.uniform(*scale) * h * w)))
        if 0 < side <= h and 0 < side <= w:
            return (
                int(rng.integers(0, h - side + 1)),
                int(rng.integers(0, w - side + 1)),
                side,
                side,
            )
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def probe3d_augment(
    image: Tensor,
    labels: dict[str, Tensor],
    rng: np.random.Generator,
    jitter_after_norm: str = "",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Probe3D's training augmentation (module docstring) of image [H, W, 3] in [0, 1] and its
    labels ([H, W] or [H, W, c] each, at the image size). `jitter_after_norm` names the
    normalisation (`NORMS`) the jitter acts after (NAVI's transform order; no crop then);
    the returned image is in [0, 1] space either way (normalising it gives Probe3D's input)."""
    x = image.permute(2, 0, 1).float()  # [3, H, W]
    jitter = rng.random() < 0.8
    if jitter_after_norm:
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMS[jitter_after_norm])
        if jitter:
            x = color_jitter((x - mean) / std, rng) * std + mean
        return x.permute(1, 2, 0), labels
    if jitter:
        x = color_jitter(x, rng)
    if rng.random() < 0.5:
        h, w = x.shape[1:]
        top, left, ch, cw = resized_crop_box(h, w, rng)

        def crop(a: np.ndarray) -> np.ndarray:
            a = np.ascontiguousarray(a[top : top + ch, left : left + cw])
            return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST)

        x = torch.from_numpy(crop(x.permute(1, 2, 0).numpy())).permute(2, 0, 1)
        labels = {k: torch.from_numpy(crop(v.numpy())).reshape(h, w, *v.shape[2:])
                  for k, v in labels.items()}  # fmt: skip
    return x.permute(1, 2, 0).contiguous(), labels


# --- features on the fly -------------------------------------------------------------------
def live_features(
    backbones: dict,
    parts: Sequence[str],
    images: Tensor,
    kind: str,
    precision: str,
    plan: MapPlan | None = None,
    quarter: Sequence[int] = (),
) -> Tensor | list[Tensor]:
    """Probe input of a batch of images [B, H, W, 3] (on the backbones' device), recomputed:
    `seg` -> final-norm last block of `parts` concatenated [B, C', h, w]; `depth` -> raw last
    block of `parts` ++ the original model's CLS token broadcast [B, C' + C, h, w]; `normals` ->
    raw last block [B, C', h, w]; `dpt` -> the `quarter` blocks, raw, each ++ its CLS tokens where
    `plan.block_cls` ([B, 2C', h, w] each). `plan` gives the fit and normalisation (its blocks
    are replaced by the ones `kind` reads)."""
    from dataclasses import replace

    base = plan or MapPlan(final=False, blocks=())
    feats: dict[str, dict[str, Tensor]] = {}
    for role in dict.fromkeys([*parts, "original"] if kind == "depth" else parts):
        bb = backbones[role]
        last = bb.num_blocks - 1
        blocks = tuple(quarter) if kind == "dpt" else (() if kind == "seg" else (last,))
        block_cls = kind == "dpt" and base.block_cls
        role_plan = replace(base, final=kind == "seg", blocks=blocks, block_cls=block_cls)
        feats[role] = extract(bb, images, role_plan, precision)
    if kind == "dpt":
        out = []
        for k in range(len(quarter)):
            m = torch.cat([feats[p]["maps"][:, k] for p in parts], 1)
            if base.block_cls:
                cls = torch.cat([feats[p]["block_cls"][:, k] for p in parts], 1)
                m = torch.cat([m, cls[:, :, None, None].expand(-1, -1, *m.shape[2:])], 1)
            out.append(m)
        return out
    maps = torch.cat([feats[p]["maps"][:, 0] for p in parts], 1)
    if kind in ("seg", "normals"):
        return maps
    cls = feats["original"]["cls"]
    return torch.cat([maps, cls[:, :, None, None].expand(-1, -1, *maps.shape[2:])], 1)


class AugmentedViews(torch.utils.data.Dataset):
    """Augmented (image, label) crops of a split's views for `task` (`seg` or `depth`: FiT3D's
    pipelines; `normals` or `depth` with `probe3d`: Probe3D's); item k of epoch e is seeded by
    (seed, e, k), so runs repeat exactly."""

    def __init__(
        self,
        split,
        task: str,
        seed: int,
        seg_crop: int,
        seg_scale,
        depth_crop,
        gamma_on_255: bool = False,
        probe3d: bool = False,
    ):
        self.split, self.task, self.seed = split, task, seed
        self.seg_crop, self.seg_scale, self.depth_crop = seg_crop, tuple(seg_scale), depth_crop
        self.gamma_on_255, self.probe3d = gamma_on_255, probe3d
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, k])
        ds = self.split.ds
        s = ds[self.split.views[k]]
        label = self.split.labels.read(k, (self.task,))[self.task]  # checked ground truth
        if self.probe3d:
            after = "imagenet" if ds.name == "navi" else ""  # module docstring
            image, out = probe3d_augment(s.image, {self.task: label}, rng, after)
            return image, out[self.task]
        if self.task == "seg":
            return seg_augment(s.image, label, rng, self.seg_crop, self.seg_scale)
        return depth_augment(
            s.image, label, rng, self.depth_crop, tuple(ds.color_brightness), self.gamma_on_255
        )


def augmented_batches(
    views: AugmentedViews,
    backbones: dict,
    parts: Sequence[str],
    batch: int,
    micro: int,
    device: torch.device,
    precision: str,
    num_workers: int,
    kind: str = "",
    plan: MapPlan | None = None,
    quarter: Sequence[int] = (),
) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Endless optimiser steps of `batch` augmented views (micro-batches of `micro`), shuffled
    per epoch (seeded), features recomputed by the frozen backbones on `device` (`live_features`
    of `kind`, default the views' task)."""
    from torch.utils.data import DataLoader

    epoch = 0
    while True:
        views.epoch = epoch
        gen = torch.Generator().manual_seed(views.seed * 1000003 + epoch)
        order = torch.randperm(len(views), generator=gen).tolist()
        loader = DataLoader(
            torch.utils.data.Subset(views, order),
            batch_size=micro,
            num_workers=num_workers,
            drop_last=False,
        )
        step: list[tuple[Tensor, Tensor]] = []
        count = 0
        for images, labels in loader:
            x = live_features(
                backbones, parts, images.to(device), kind or views.task, precision, plan, quarter
            )
            step.append((x, labels))  # features stay on the device
            count += len(labels)
            if count >= batch:
                yield step
                step, count = [], 0
        if step:
            yield step
        epoch += 1


# --- test-time inference -------------------------------------------------------------------
@torch.no_grad()
def slide_logits(
    head,
    backbones: dict,
    parts,
    image: Tensor,
    crop: int,
    stride: int,
    precision: str,
    plan: MapPlan | None = None,
) -> Tensor:
    """mmseg slide inference: logits [K, H, W] of image [H, W, 3] (on the device) from `crop`
    windows at `stride`, averaged where they overlap."""
    h, w = image.shape[:2]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total = count = None
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = image[y1:y2, x1:x2][None]
            x = live_features(backbones, parts, window, "seg", precision, plan)
            logits = head(x.float(), (y2 - y1, x2 - x1))[0]  # [K, h', w']
            if total is None:
                total = torch.zeros(logits.shape[0], h, w, device=image.device)
                count = torch.zeros(1, h, w, device=image.device)
            total[:, y1:y2, x1:x2] += logits
            count[:, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def flip_depth(
    head, backbones: dict, parts, image: Tensor, size, precision: str, plan: MapPlan | None = None
) -> Tensor:
    """Depth [H, W] of image [H, W, 3]: mean of the prediction and the mirrored prediction of the
    mirrored image (flip test-time augmentation)."""
    both = torch.stack([image, image.flip(1)])
    x = live_features(backbones, parts, both, "depth", precision, plan)
    pred = head(x.float(), size)  # [2, H, W]
    return (pred[0] + pred[1].flip(-1)) / 2


def seg_test_image(image: Tensor, scale: tuple[int, int]) -> Tensor:
    """Test image [H, W, 3] resized keeping its ratio to fit `scale` (bilinear)."""
    h, w = image.shape[:2]
    size = rescale_size(h, w, scale)
    if size == (h, w):
        return image
    return F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bilinear",
                         align_corners=False)[0].permute(1, 2, 0)  # fmt: skip


# --- what a run reproduced ------------------------------------------------------------------
def as_published(ec, probes: Sequence[str], dpt: bool) -> list[str]:
    """The originals' quirks a run with eval config `ec` reproduced (report: "as published"):
    FiT3D's under protocol=paper without `eval.fixes`, Probe3D's 2024 code with DPT heads and
    `eval.probe3d=published`."""
    out = []
    if ec.protocol == "paper" and not ec.fixes:
        if "depth" in probes:
            out += [
                "FiT3D depth: ColorAug raises 0-255 values to the gamma (not [0, 1] values)",
                f"FiT3D depth: the gradient loss is sliced over the batch axis of "
                f"{ec.paper_gpu_batch} images per GPU (exactly 0 at 2)",
                f"FiT3D depth: SigLoss per GPU on {ec.paper_gpu_batch} images, then averaged "
                "over GPUs",
            ]
        if "seg" in probes:
            out.append(
                "FiT3D segmentation: cross-entropy averaged over all pixels, ignored ones "
                "included (mmseg 0.27, avg_non_ignore=False)"
            )
    if dpt and ec.probe3d == "published":
        out += [
            "Probe3D 2024 DPT head: nearest upsampling inside the head, align_corners=False "
            "label resize",
        ]
        if "depth" in probes:
            out.append("Probe3D 2024 depth: gradient loss sliced over the batch axis")
    return out


def fixes_applied(ec, probes: Sequence[str], dpt: bool) -> list[str]:
    """The known fixes a run applied (report: "fixes applied")."""
    out = []
    if ec.protocol == "paper" and ec.fixes:
        if "depth" in probes:
            out += [
                "FiT3D depth: ColorAug gamma on [0, 1] values",
                "FiT3D depth: gradient loss over rows and columns",
                "FiT3D depth: SigLoss and gradient loss pooled over the global batch",
            ]
        if "seg" in probes:
            out.append("FiT3D segmentation: cross-entropy averaged over labelled pixels")
    if dpt and ec.probe3d == "head":
        out.append(
            "Probe3D 2025 (HEAD): bilinear upsampling with align_corners=True, gradient loss "
            "over rows and columns"
        )
    return out


def check_options(ec) -> None:
    """A one-line UserError when eval config `ec` asks for the published pipeline's per-GPU
    losses (`eval.protocol=paper` without `eval.fixes`) with a global batch or micro-batch that
    `eval.paper_gpu_batch` does not divide (the choices of every parity option are checked by
    the config itself)."""
    from fit3d.errors import UserError

    g = ec.paper_gpu_batch
    if ec.protocol == "paper" and not ec.fixes:
        for key in ("paper_batch_size", "micro_batch"):
            value = getattr(ec, key)
            if value and value % g:
                raise UserError(
                    f"eval.{key}={value} is not a multiple of eval.paper_gpu_batch={g}: the "
                    "per-GPU losses of the published pipeline cannot be formed (or set "
                    "eval.fixes=true)"
                )


def empty_rule(ec, task: str, head: str) -> str:
    """What a test image without valid ground truth adds (`eval.empty_images`; `auto`: FiT3D's
    linear depth skips it, Probe3D's probes (normals, DPT depth) count it as 0s)."""
    if ec.empty_images != "auto":
        return ec.empty_images
    return "skip" if task == "depth" and head == "linear" else "zero"


def corr_protocol(ec, dataset: str) -> str:
    """`scannet` or `navi` (`eval.corr_protocol`; `auto`: NAVI's on `navi`)."""
    if ec.corr_protocol != "auto":
        return ec.corr_protocol
    return "navi" if dataset == "navi" else "scannet"
