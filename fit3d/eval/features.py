"""Frozen features and labels of evaluation views, extracted once and cached on disk.

Per (backbone, scene) one safetensors file under `<eval run>/features/<tag>/<scene_id>.safetensors`
holds, for the scene's chosen views, fp16:
- `norm [V, C, h, w]`: last block after the final norm, patch tokens (segmentation probe and
  correspondence; the FiT3D teacher/student output),
- `raw [V, C, h, w]`: last block before the final norm (depth and normals probes; docs/method.md,
  "Evaluation: linear probes (FiT3D)"),
- `cls [V, C]`: the CLS token before the final norm (mean patch token for models without one).
All three come from one pass of the backbone (`Backbone.features`). A cached file
is reused only if its metadata (weights sha256, model, views, resolution) match; random-init
backbones (no sha256) are never cached.
Feature sets are channel concatenations of these per-backbone tensors (`FEATURE_SETS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from fit3d.io import write_safetensors

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "original": ("original",),
    "fine-tuned": ("finetuned",),
    "assembled": ("original", "finetuned"),
    "control": ("original", "original"),
}
"""Feature set -> backbones whose features are concatenated along channels (FiT3D section 3)."""


@torch.no_grad()
def extract(backbone, images: Tensor) -> dict[str, Tensor]:
    """images [B, H, W, 3] in [0, 1] -> {"norm", "raw": [B, C, h, w], "cls": [B, C]} float32."""
    out = backbone.features(
        backbone.preprocess(images.permute(0, 3, 1, 2)), blocks=(-1,), final=True, cls=True
    )
    return {"norm": out.final, "raw": out.blocks[0].contiguous(), "cls": out.cls.contiguous()}


def scene_features(
    backbone, scene, views: list[int], cache: Path, batch_size: int = 4
) -> dict[str, Tensor]:
    """Cached features of `views` of `scene` ({"norm", "raw", "cls"} fp16, see module doc)."""
    meta = {
        "timm_name": backbone.timm_name,
        "weights_sha256": backbone.weights_info.sha256 or "",
        "scene_id": scene.scene_id,
        "views": json.dumps(views),
        "resolution": str(scene.resolution),
    }
    cacheable = bool(meta["weights_sha256"])
    if cacheable and cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            if f.metadata() == meta:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    parts: dict[str, list[Tensor]] = {"norm": [], "raw": [], "cls": []}
    for b in range(0, len(views), batch_size):
        images = torch.stack([scene.load_image(i) for i in views[b : b + batch_size]])
        for k, v in extract(backbone, images).items():
            parts[k].append(v.half())
    feats = {k: torch.cat(v) for k, v in parts.items()}
    if cacheable:
        write_safetensors(cache, feats, meta)
    return feats


@dataclass
class Labels:
    """Ground truth and cameras of a list of views (anonymised pixels already invalidated)."""

    seg: Tensor | None = None  # [V, H, W] uint8, 255 = ignore
    depth: Tensor | None = None  # [V, H, W] float32 metres, 0 = invalid
    normals: Tensor | None = None  # [V, H, W, 3] float16 camera frame, 0 = invalid
    Ks: list[Tensor] = field(default_factory=list)  # [3, 3] each
    viewmats: list[Tensor] = field(default_factory=list)  # [4, 4] each
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) each


def load_labels(scene, views: list[int]) -> Labels:
    """Ground truth of `views`; a kind missing for any view is None for the whole scene."""
    seg, depth, normals = [], [], []
    out = Labels()
    for i in views:
        mask = scene.load_mask(i)
        s, d, n = scene.load_semantics(i), scene.load_depth(i), scene.load_normals(i)
        if mask is not None:
            s = None if s is None else s.masked_fill(~mask, 255)
            d = None if d is None else d * mask
            n = None if n is None else n * mask[..., None]
        seg.append(s)
        depth.append(d)
        normals.append(n)
        out.Ks.append(scene.K(i))
        out.viewmats.append(scene.viewmat(i))
        out.sizes.append((scene.height(i), scene.width(i)))
    if all(s is not None for s in seg):
        out.seg = torch.stack(seg).clamp(0, 255).to(torch.uint8)
    if all(d is not None for d in depth):
        out.depth = torch.stack(depth).float()
    if all(n is not None for n in normals):
        out.normals = torch.stack(normals).half()
    return out


def concat_labels(parts: list[Labels]) -> Labels:
    """Labels of several scenes, stacked; a kind missing in any scene is None."""
    out = Labels()
    for kind in ("seg", "depth", "normals"):
        vals = [getattr(p, kind) for p in parts]
        if vals and all(v is not None for v in vals):
            setattr(out, kind, torch.cat(vals))
    for p in parts:
        out.Ks += p.Ks
        out.viewmats += p.viewmats
        out.sizes += p.sizes
    return out


def compose(feats: dict[str, dict[str, Tensor]], parts: tuple[str, ...], kind: str) -> Tensor:
    """Channel concat [V, sum C, h, w] of `kind` ("norm" or "raw") of the named backbones."""
    return torch.cat([feats[p][kind] for p in parts], dim=1)


def depth_input(feats: dict[str, dict[str, Tensor]], parts: tuple[str, ...]) -> Tensor:
    """Depth/normals probe input: pre-norm patch features ++ the original model's CLS token,
    broadcast over the token grid: [V, sum C + C, h, w]."""
    raw = compose(feats, parts, "raw")
    cls = feats["original"]["cls"][:, :, None, None].expand(-1, -1, *raw.shape[2:])
    return torch.cat([raw, cls], dim=1)
