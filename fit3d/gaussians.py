"""The stage-1 output format: one lifted scene = activated Gaussians + feature decoder + meta.

Per scene folder `outputs/lift/<run>/<scene_id>/` (written by `stage1_lift`, read by stage 2 and
the evaluator through `load_lifted_scene`):
- `gaussians.safetensors`: ACTIVATED values, ready for `fit3d.render.rasterization`:
  `means [N,3]` f32, `quats [N,4]` f32 (wxyz, normalised), `scales [N,3]` f32 (exp applied),
  `opacities [N]` f32 (sigmoid applied), `sh [N,K,3]` f32 (K = (sh_degree+1)^2),
  `features [N,D]` f16.
- `decoder.safetensors`: `weight [C,D,3,3]` of `Conv2d(D, C, 3, padding=1, bias=False)`.
- `meta.json`: scene id, backbone, dims, weights provenance, steps, metrics, ... Written last:
  a scene is finished exactly when its `meta.json` exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fit3d.errors import UserError
from fit3d.io import write_json, write_safetensors

GAUSSIANS_FILE = "gaussians.safetensors"
DECODER_FILE = "decoder.safetensors"
META_FILE = "meta.json"
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "sh", "features")


@dataclass
class LiftedScene:
    """A finished stage-1 scene: tensors for `rasterization`, the decoder and the metadata."""

    gaussians: dict[str, torch.Tensor]
    """means [N,3], quats [N,4], scales [N,3], opacities [N], sh [N,K,3], features [N,D] (f32)."""
    decoder: torch.nn.Conv2d
    """Conv2d(D, C, 3, padding=1, bias=False), frozen (requires_grad False), eval mode."""
    meta: dict[str, Any]
    """Contents of `meta.json`."""

    @property
    def sh_degree(self) -> int:
        """SH degree of `gaussians["sh"]` (K = (degree+1)^2)."""
        return int(round(self.gaussians["sh"].shape[1] ** 0.5)) - 1

    def to(self, device: str | torch.device) -> LiftedScene:
        """Move tensors and decoder to `device` (in place) and return self."""
        self.gaussians = {k: v.to(device) for k, v in self.gaussians.items()}
        self.decoder = self.decoder.to(device)
        return self


def make_decoder(feature_dim: int, embed_dim: int) -> torch.nn.Conv2d:
    """The per-scene feature decoder: Conv2d(D, C, kernel 3, padding 1, bias=False)."""
    return torch.nn.Conv2d(feature_dim, embed_dim, 3, padding=1, bias=False)


def is_lifted_scene(path: str | Path) -> bool:
    """True when `path` holds a finished scene (its `meta.json` exists)."""
    return (Path(path) / META_FILE).is_file()


def list_lifted_scenes(run_dir: str | Path) -> list[str]:
    """Sorted scene ids with a finished lift under `run_dir` (`outputs/lift/<run>`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and is_lifted_scene(p))


def save_lifted_scene(
    path: str | Path,
    gaussians: dict[str, torch.Tensor],
    decoder_weight: torch.Tensor,
    meta: dict[str, Any],
) -> None:
    """Write one scene atomically; `meta.json` last so a half-written scene never looks done.

    `gaussians` must hold activated values under `GAUSSIAN_KEYS`; features are stored as f16.
    """
    path = Path(path)
    missing = [k for k in GAUSSIAN_KEYS if k not in gaussians]
    if missing:
        raise ValueError(f"save_lifted_scene: missing gaussian tensors {missing}")
    tensors = {k: gaussians[k].detach().float() for k in GAUSSIAN_KEYS}
    tensors["features"] = tensors["features"].half()
    write_safetensors(path / GAUSSIANS_FILE, tensors)
    write_safetensors(path / DECODER_FILE, {"weight": decoder_weight.detach().float()})
    write_json(path / META_FILE, meta)


def load_lifted_scene(path: str | Path, device: str | torch.device = "cpu") -> LiftedScene:
    """Read a finished scene folder; all Gaussian tensors come back as float32 on `device`."""
    path = Path(path)
    if not is_lifted_scene(path):
        raise UserError(f"{path} is not a finished lifted scene (no {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
        raw = load_file(str(path / GAUSSIANS_FILE))
        weight = load_file(str(path / DECODER_FILE))["weight"]  # [C, D, 3, 3]
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"cannot read lifted scene {path}: {e}") from None
    missing = [k for k in GAUSSIAN_KEYS if k not in raw]
    if missing:
        raise UserError(f"{path / GAUSSIANS_FILE} lacks tensors {missing}")
    gaussians = {k: raw[k].float().to(device) for k in GAUSSIAN_KEYS}
    n, d = gaussians["features"].shape
    if weight.ndim != 4 or weight.shape[1] != d or weight.shape[2:] != (3, 3):
        raise UserError(f"{path / DECODER_FILE}: weight {tuple(weight.shape)} does not fit D={d}")
    decoder = make_decoder(d, weight.shape[0])
    with torch.no_grad():
        decoder.weight.copy_(weight)
    decoder.requires_grad_(False).eval()
    return LiftedScene(gaussians=gaussians, decoder=decoder.to(device), meta=meta)
