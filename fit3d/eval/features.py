"""Frozen features of evaluation views: extracted once per (backbone, split) into a `ViewStore`
(fp16, memory-mapped, resumable), then streamed to the probes batch by batch.

Per view the store keeps, from one pass of the backbone (`Backbone.features`, the one route):
- `final`: last block after the final norm, patch tokens (the FiT3D teacher/student output;
  segmentation probe, docs/method.md "Evaluation: linear probes (FiT3D)"),
- `block<k>`: raw outputs of the blocks the probes read (no final norm): the last block (depth
  and normals linear probes), the four quarter blocks (`Backbone.quarter_blocks`, DPT heads) and
  `eval.corr_block` (correspondence; docs/method.md "Evaluation: 3D-awareness probes (Probe3D)"),
- `cls`: CLS token of the last block before the final norm (mean patch token without one),
- `cls_block<k>` (with `MapPlan.block_cls`): the raw CLS token of each stored block (Probe3D's
  `dense-cls` DPT input).
How an image meets the patch grid (`MapPlan.fit`, `eval.fit`): `pad` normalises it, then
centre-pads it with zeros up to a multiple of the patch size, as FiT3D's and Probe3D's evaluation
code do (a 512 crop gives 37x37 tokens at patch 14; the head's output is then resized to the
unpadded label size, padding included, as theirs is); `resize` resizes it down
(`Backbone.preprocess`, 36x36), as stage 1's teacher and stage 2 do. The two agree where the image
is a multiple of the patch size. The normalisation (`MapPlan.norm`) is ImageNet's, or mean = std
= 0.5 (`half`, Probe3D's ScanNet pairs).
A store is reused only when its model, weights sha256, extraction precision, maps, fit,
normalisation, dataset split, view keys and image options all match; random-init backbones (no
sha256) are never reused. Feature sets are channel concatenations of the per-backbone maps
(`FEATURE_SETS`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fit3d.eval.cache import ViewStore, keys_digest
from fit3d.runs import autocast

FITS = ("pad", "resize")
"""How an image meets the patch grid (module docstring)."""
NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5,) * 3, (0.5,) * 3),
}
"""Input normalisation name -> (mean, std)."""

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "original": ("original",),
    "fine-tuned": ("finetuned",),
    "assembled": ("original", "finetuned"),
    "control": ("original", "original"),
}
"""Feature set -> backbones whose features are concatenated along channels (FiT3D section 3)."""


@dataclass(frozen=True)
class MapPlan:
    """Which dense maps to keep per view: `final` and raw `blocks` (0-based, sorted), each
    block's CLS token (`block_cls`), and how images are fitted and normalised (module docstring)."""

    final: bool
    blocks: tuple[int, ...]
    block_cls: bool = False
    fit: str = "resize"
    norm: str = "imagenet"

    @property
    def names(self) -> list[str]:
        return (["final"] if self.final else []) + [f"block{b}" for b in self.blocks]

    @property
    def cls_names(self) -> list[str]:
        return [f"cls_block{b}" for b in self.blocks] if self.block_cls else []


def fit_to_patch(backbone, images: Tensor, fit: str = "resize", norm: str = "imagenet") -> Tensor:
    """images [B, 3, H, W] in [0, 1] -> the backbone's normalised input: resized down
    (`Backbone.preprocess`, ImageNet normalisation only) or normalised and centre-padded with
    zeros up to multiples of the patch size (the extra row / column, if odd, at the bottom /
    right)."""
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in NORMS[norm])
    if fit == "resize":
        if norm == "imagenet":
            return backbone.preprocess(images)
        x = backbone.preprocess(images)  # resized and ImageNet-normalised: renormalise
        imnet_mean, imnet_std = (
            torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in NORMS["imagenet"]
        )
        return (x * imnet_std + imnet_mean - mean) / std
    p = backbone.patch_size
    h, w = images.shape[-2:]
    backbone.token_grid(h, w)  # a one-line error for an image smaller than a patch
    ph, pw = (-h) % p, (-w) % p
    return F.pad((images - mean) / std, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


@torch.no_grad()
def extract(backbone, images: Tensor, plan: MapPlan, precision: str = "fp32") -> dict[str, Tensor]:
    """images [B, H, W, 3] in [0, 1] (on the backbone's device) -> {"maps": [B, M, C, h, w]
    float32 in `plan.names` order, "cls": [B, C], and with `plan.block_cls` "block_cls":
    [B, len(blocks), C]}."""
    x = fit_to_patch(backbone, images.permute(0, 3, 1, 2), plan.fit, plan.norm)
    with autocast(images.device, precision):
        out = backbone.features(x, blocks=plan.blocks, final=plan.final, cls=True)
    maps = ([out.final] if plan.final else []) + list(out.blocks)
    got = {"maps": torch.stack([m.float() for m in maps], 1), "cls": out.cls.float()}
    if plan.block_cls:
        got["block_cls"] = torch.stack([c.float() for c in out.block_cls], 1)
    return got


def feature_store(
    folder: Path,
    backbone,
    plan: MapPlan,
    split,
    options: str,
    precision: str,
    notes: list[str],
) -> ViewStore:
    """The (possibly partial) store of `backbone`'s features for the views of `split`."""
    sha = backbone.weights_info.sha256
    if not sha and folder.exists():
        shutil.rmtree(folder)  # random init: nothing to reuse, nothing to report
    identity = {
        "model": backbone.timm_name,
        "weights_sha256": sha or "random-init",
        "precision": precision,
        "maps": plan.names + plan.cls_names,
        "fit": plan.fit,
        "norm": plan.norm,
        "dataset": split.ds.name,
        "split": split.ds.split,
        "keys_sha256": keys_digest(split.keys),
        "options": options,
    }
    spec = {name: ("float16", (backbone.embed_dim, "h", "w")) for name in plan.names}
    spec["cls"] = ("float16", (backbone.embed_dim,))  # each map apart: a probe reads only its own
    spec |= {name: ("float16", (backbone.embed_dim,)) for name in plan.cls_names}
    store = ViewStore(folder, spec, identity, len(split))
    if store.note:
        notes.append(store.note)
    return store


class _Images(torch.utils.data.Dataset):
    """(position, image [H, W, 3]) of the chosen views of a split, from `start` on."""

    def __init__(self, split, start: int):
        self.split, self.start = split, start

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, k: int) -> tuple[int, Tensor]:
        n = self.start + k
        return n, self.split.ds[self.split.views[n]].image


def _as_list(items: list) -> list:
    return items


def fill_features(
    store: ViewStore,
    backbone,
    plan: MapPlan,
    split,
    device: torch.device,
    precision: str,
    batch: int,
    num_workers: int,
    desc: str,
) -> None:
    """Extract the views `store` lacks (resuming after a kill), `batch` images per pass, images
    read by `num_workers` DataLoader processes."""
    from torch.utils.data import DataLoader

    if store.complete:
        return
    loader = DataLoader(
        _Images(split, store.done),
        batch_size=batch,
        num_workers=num_workers,
        collate_fn=_as_list,  # images of a split may differ in size
    )
    with tqdm(
        total=store.num_views, initial=store.done, desc=desc, unit="view", disable=None
    ) as bar:
        for items in loader:
            recs: list[dict[str, Tensor]] = [{} for _ in items]
            by_size: dict[tuple[int, int], list[int]] = {}
            for k, (_, img) in enumerate(items):
                by_size.setdefault(tuple(img.shape[:2]), []).append(k)
            for ks in by_size.values():
                images = torch.stack([items[k][1] for k in ks]).to(device)
                out = extract(backbone, images, plan, precision)
                maps, cls = out["maps"].half().cpu(), out["cls"].half().cpu()
                block_cls = out["block_cls"].half().cpu() if plan.block_cls else None
                for j, k in enumerate(ks):
                    recs[k] = {name: maps[j, m] for m, name in enumerate(plan.names)}
                    recs[k]["cls"] = cls[j]
                    for m, name in enumerate(plan.cls_names):
                        recs[k][name] = block_cls[j, m]
            store.append(recs)
            bar.update(len(items))


@dataclass
class SplitFeatures:
    """Feature stores of one split, per backbone role, and the plan they follow."""

    stores: dict[str, ViewStore]
    plan: MapPlan

    def size(self, n: int) -> tuple[int, int]:
        """Token grid (h, w) of view n."""
        return next(iter(self.stores.values())).size(n)

    def maps(self, n: int, parts: Sequence[str], name: str) -> Tensor:
        """Channel concat [sum C, h, w] of map `name` of the backbones `parts` for view n."""
        read: dict[str, Tensor] = {}
        for p in dict.fromkeys(parts):
            read[p] = self.stores[p].read(n, (name,))[name]
        return torch.cat([read[p] for p in parts], 0)

    def cls(self, n: int, role: str = "original", name: str = "cls") -> Tensor:
        """CLS token [C] of view n from backbone `role` (`cls_block<k>`: that block's)."""
        return self.stores[role].read(n, (name,))[name]

    def block_cls(self, n: int, parts: Sequence[str], block: int) -> Tensor:
        """Channel concat [sum C] of block `block`'s CLS tokens of the backbones `parts`."""
        return torch.cat([self.cls(n, p, f"cls_block{block}") for p in parts], 0)


def probe_input(
    feats: SplitFeatures, n: int, parts: Sequence[str], kind: str, quarter: Sequence[int] = ()
) -> Tensor | list[Tensor]:
    """One view's input to a probe (fp16, CPU):
    - `seg`: final-norm last block [C', h, w] (C' = sum over parts),
    - `depth`: raw last block ++ the original model's CLS broadcast over the grid [C' + C, h, w]
      (FiT3D's linear depth input),
    - `normals`: raw last block [C', h, w],
    - `dpt`: the four quarter blocks, raw, [C', h, w] each, each followed by its CLS tokens
      broadcast over the grid [2C', h, w] where the plan stores them (Probe3D's `dense-cls`)."""
    last = f"block{max(feats.plan.blocks)}"
    if kind == "seg":
        return feats.maps(n, parts, "final")
    if kind == "normals":
        return feats.maps(n, parts, last)
    if kind == "depth":
        raw = feats.maps(n, parts, last)
        cls = feats.cls(n)[:, None, None].expand(-1, *raw.shape[1:])
        return torch.cat([raw, cls], 0)
    if kind == "dpt":
        out = []
        for b in quarter:
            m = feats.maps(n, parts, f"block{b}")
            if feats.plan.block_cls:
                cls = feats.block_cls(n, parts, b)[:, None, None].expand(-1, *m.shape[1:])
                m = torch.cat([m, cls], 0)
            out.append(m)
        return out
    raise ValueError(f"unknown probe input {kind!r}")
