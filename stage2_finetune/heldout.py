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
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from fit3d.backbones import Backbone  # noqa: E402
from fit3d.eval.correspondence import reproject, select_pairs  # noqa: E402
from fit3d.finetune_data import masked_l1  # noqa: E402
from fit3d.io import atomic_path  # noqa: E402
from fit3d.scenes import Scene  # noqa: E402
from stage2_finetune.data import FinetuneDataset  # noqa: E402

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
    fa: Tensor, fb: Tensor, scene: Scene, a: int, b: int, depth_a: Tensor, depth_b: Tensor
) -> Tensor:
    """Cosines [M] between view-a tokens and view-b features at their reprojections."""
    _, h, w = fa.shape
    H, W = depth_a.shape
    ys = ((torch.arange(h) + 0.5) * H / h - 0.5).round().long().clamp(0, H - 1)
    xs = ((torch.arange(w) + 0.5) * W / w - 0.5).round().long().clamp(0, W - 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    xy = torch.stack([gx.flatten(), gy.flatten()], 1)  # token-centre pixels of view a [h*w, 2]
    d = depth_a[xy[:, 1], xy[:, 0]]
    ok = d > 0
    xy1, z1 = reproject(xy[ok], d[ok], scene.K(a), scene.K(b), scene.viewmat(a), scene.viewmat(b))
    Hb, Wb = depth_b.shape
    px = xy1.round().long()
    inside = (z1 > 0) & (px[:, 0] >= 0) & (px[:, 0] < Wb) & (px[:, 1] >= 0) & (px[:, 1] < Hb)
    seen = torch.zeros_like(inside)
    p = px[inside]
    db = depth_b[p[:, 1], p[:, 0]].double()
    seen[inside] = (db > 0) & ((db - z1[inside]).abs() < 0.05 * z1[inside])
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
        for a, b, _ in select_pairs(depths, Ks, vms, pairs_per_scene, seed=seed):
            ia, ib = scene.load_image(a).permute(2, 0, 1), scene.load_image(b).permute(2, 0, 1)
            for name, model in models.items():
                fa, fb = tokens(model, ia), tokens(model, ib)
                match[name].append(_pair_cosines(fa, fb, scene, a, b, depths[a], depths[b]))
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


def _pca_rgb(maps: list[Tensor]) -> list[Tensor]:
    """Project token maps [C, h, w] on the top-3 PCA basis of the given fit set -> RGB [h, w, 3]."""
    flat = torch.cat([m.flatten(1).T for m in maps])  # [N, C]
    mean = flat.mean(0)
    _, _, V = torch.pca_lowrank(flat - mean, q=3, center=False)  # V [C, 3]
    proj = (flat - mean) @ V  # [N, 3]
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    out, start = [], 0
    for m in maps:
        n = m.shape[1] * m.shape[2]
        rgb = ((proj[start : start + n] - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        out.append(rgb.view(m.shape[1], m.shape[2], 3))
        start += n
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
    shared = _pca_rgb(orig + tune)
    targets = _pca_rgb([it["target"].float().cpu() for it in items])
    fig, axes = plt.subplots(n, 4, figsize=(12, 2.8 * n + 0.4), squeeze=False)
    for r, it in enumerate(items):
        cols = [it["image"].permute(1, 2, 0).cpu(), targets[r], shared[r], shared[n + r]]
        for ax, im, title in zip(axes[r], cols, _PCA_TITLES, strict=True):
            ax.imshow(im.numpy(), interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
