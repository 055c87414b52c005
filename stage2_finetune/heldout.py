"""Before/after checks written into the run's meta.json, and pca.png.

- masked L1 (the training loss) of the original and the fine-tuned backbone on the validation
  items (held-out views; of held-out scenes when `finetune.val_lift_run` is set);
- mean cosine similarity of last-block tokens at ground-truth correspondences between view pairs
  of the held-out scenes (scenes with depth only): a token centre of view i is lifted through its
  depth and reprojected into view j; if view j sees it (depth agrees within 5%), view j's token
  map is sampled there bilinearly. Features of one 3D point agreeing more across views is what
  3D-aware fine-tuning should achieve; the mean cosine over all token pairs of the two views is
  reported beside it, so that features merely becoming more alike everywhere show up as such;
- pca.png: image | target | original | fine-tuned tokens for a few validation items, all maps
  projected on one PCA basis fitted to original and fine-tuned tokens together.

The caller picks the precision (train.py: under the training precision's autocast); tokens are
returned in fp32 and every view's tokens are computed once per model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from fit3d.backbones import Backbone
from fit3d.geometry import grid_pixels, reproject, select_pairs, visible
from fit3d.losses import masked_l1
from fit3d.scenes import Scene
from fit3d.viz import pca_rgb, save_figure
from stage2_finetune.data import FinetuneDataset

_PCA_TITLES = ("image", "target (rendered)", "original", "fine-tuned")


@torch.no_grad()
def tokens(backbone: Backbone, image: Tensor) -> Tensor:
    """image [3, H, W] in [0, 1] -> last-block final-norm tokens [C, h, w]."""
    dev = next(backbone.parameters()).device
    return backbone(backbone.preprocess(image[None].to(dev)))[0].float().cpu()


@torch.no_grad()
def dataset_l1(models: dict[str, Backbone], dataset: FinetuneDataset) -> dict[str, float]:
    """Mean over the dataset's items (no flip) of each model's masked L1 to the target."""
    sums = dict.fromkeys(models, 0.0)
    for i in range(len(dataset)):
        item = dataset[(i, False)]
        for name, model in models.items():
            out = tokens(model, item["image"])[None]
            loss = masked_l1(out, item["target"][None].cpu(), item["mask"][None].cpu())
            sums[name] += float(loss)
    return {k: v / max(len(dataset), 1) for k, v in sums.items()}


def _pair_cosines(
    fa: Tensor,
    fb: Tensor,
    patch: int,
    scene: Scene,
    a: int,
    b: int,
    depth_a: Tensor,
    depth_b: Tensor,
) -> Tensor:
    """Cosines [M] between view-a tokens fa [C, h, w] and view-b features fb at their
    reprojections (`patch`: the backbone's patch size, so the token grid is the 1/patch grid)."""
    H, W = depth_a.shape
    xy = grid_pixels(H, W, patch)  # token-centre pixels of view a [h*w, 2]
    d = depth_a[xy[:, 1], xy[:, 0]]
    ok = d > 0
    xy1, z1 = reproject(xy[ok], d[ok], scene.K(a), scene.K(b), scene.viewmat(a), scene.viewmat(b))
    seen = visible(xy1, z1, depth_b)
    Hb, Wb = depth_b.shape
    src = fa.flatten(1).T[ok][seen]  # [M, C]
    uv = xy1[seen].float()
    grid = torch.stack([(uv[:, 0] + 0.5) / Wb * 2 - 1, (uv[:, 1] + 0.5) / Hb * 2 - 1], -1)
    dst = F.grid_sample(fb[None], grid[None, None], mode="bilinear", align_corners=False)
    return F.cosine_similarity(src, dst[0, :, 0].T, dim=1)


@torch.no_grad()
def correspondence_cosine(
    models: dict[str, Backbone], scenes: list[Scene], pairs_per_scene: int, seed: int = 0
) -> dict[str, dict[str, float] | int] | None:
    """Per model: mean token cosine at ground-truth correspondences (`match`) and, as the
    reference a collapse towards one feature would also raise, between all token pairs of the
    two views (`any`). None when no scene has depth."""
    match: dict[str, list[Tensor]] = {k: [] for k in models}
    anyp: dict[str, list[Tensor]] = {k: [] for k in models}
    for scene in scenes:
        views = list(range(len(scene)))
        depths = [scene.load_depth(v) for v in views]
        if any(d is None for d in depths):
            continue
        Ks = [scene.K(v) for v in views]
        vms = [scene.viewmat(v) for v in views]
        pairs = select_pairs(depths, Ks, vms, pairs_per_scene, seed=seed)
        used = sorted({v for a, b, _ in pairs for v in (a, b)})
        images = {v: scene.load_image(v).permute(2, 0, 1) for v in used}
        feats = {(k, v): tokens(m, images[v]) for k, m in models.items() for v in used}
        with torch.autocast("cpu", enabled=False):  # comparisons in fp32 (tokens: fp32, CPU)
            for a, b, _ in pairs:
                for name, model in models.items():
                    fa, fb = feats[name, a], feats[name, b]
                    match[name].append(
                        _pair_cosines(fa, fb, model.patch_size, scene, a, b, depths[a], depths[b])
                    )
                    ua, ub = (F.normalize(f.flatten(1).T, dim=1) for f in (fa, fb))
                    anyp[name].append((ua @ ub.T).flatten())
    if not any(len(c) for c in match.values()):
        return None
    out: dict[str, dict[str, float] | int] = {
        k: {"match": float(torch.cat(match[k]).mean()), "any": float(torch.cat(anyp[k]).mean())}
        for k in models
    }
    out["matches"] = int(sum(len(c) for c in next(iter(match.values()))))
    return out


@torch.no_grad()
def save_pca(
    path: str | Path, original: Backbone, tuned: Backbone, dataset: FinetuneDataset, n: int
) -> None:
    """pca.png: rows = `n` evenly spaced dataset items; columns = image, target, original,
    fine-tuned; original and fine-tuned share one PCA basis, the target gets its own."""
    n = min(n, len(dataset))
    if n == 0:
        return
    picks = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    items = [dataset[(i, False)] for i in picks]
    orig = [tokens(original, it["image"]) for it in items]
    tune = [tokens(tuned, it["image"]) for it in items]
    shared = pca_rgb(orig + tune)
    targets = pca_rgb([it["target"].float().cpu() for it in items])
    fig = Figure(figsize=(12, 2.8 * n + 0.4))
    axes = fig.subplots(n, 4, squeeze=False)
    for r, it in enumerate(items):
        cols = [it["image"].permute(1, 2, 0).cpu(), targets[r], shared[r], shared[n + r]]
        for ax, im, title in zip(axes[r], cols, _PCA_TITLES, strict=True):
            ax.imshow(im.numpy(), interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
