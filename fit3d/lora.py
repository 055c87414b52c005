"""LoRA (low-rank adaptation) of fit3d's timm ViT backbones, for parameter-efficient stage 2.

`add_lora` freezes a timm `VisionTransformer` / `Eva` and wraps chosen `nn.Linear` layers of its
last blocks in `LoRALinear`: the frozen layer plus a trainable low-rank update
`W + (alpha / rank) * B @ A` of all or some of its output rows. A starts random (kaiming-uniform,
as a fresh `nn.Linear` weight, the LoRA paper's choice) and B at zero, so the adapted model is
exactly the original one until B is trained (and A's gradient is zero at the first step).
`merge_lora` folds the updates into the base weights and puts the plain `nn.Linear` layers back:
the state dict is then the un-adapted timm model's again, for `Backbone.timm_state_dict` and the
export. Call it (on a copy, to keep training) before either: unmerged, the adapted layers' keys
are `...qkv.base.weight`, `...qkv.lora_a.0` and so on, which timm does not know.

Targets, per block (`LORA_TARGETS`):
  q, k, v: the query / key / value projection. Every supported timm layout but one fuses them
      into one `attn.qkv` Linear of 3C outputs (rows [0, C) are q, [C, 2C) k, [2C, 3C) v): there
      a target adapts its third of the rows only, and q + v share one wrapper with one (A, B) pair
      per slice. Eva built with `qkv_fused=False` has separate `attn.q_proj` / `k_proj` /
      `v_proj` Linears, adapted whole.
  proj: the attention output projection `attn.proj`.
  fc1: the MLP input Linear `mlp.fc1` (for a fused SwiGLU, EVA-02's `GluMlp`, it holds gate and
      value halves and is adapted whole); timm's unfused `SwiGLU` (DINOv3 ViT-S+) has two input
      Linears, `mlp.fc1_g` and `mlp.fc1_x`, and fc1 adapts both.
  fc2: the MLP output Linear `mlp.fc2`.

timm layout note: with q/v biases (EVA-02), `EvaAttention` does not call its `qkv` module but
`F.linear(x, self.qkv.weight, bias)`. `LoRALinear.weight` is therefore the adapted weight
`W + scale * B @ A` (differentiable), so that path trains and computes the same function as
`LoRALinear.forward` (which uses the cheaper `x @ A^T @ B^T` form).

All functions take the timm model (`backbone.model`) or a fit3d `Backbone` itself (its parameters
are the timm model's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
"""The layers `add_lora` can adapt in each block (module docstring)."""
_QKV = ("q", "k", "v")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update of some of its output row ranges.

    Args:
        base: the Linear to adapt (kept as `self.base`; its parameters are not touched here).
        slices: output row ranges [start, stop) to adapt, non-overlapping; one (A, B) pair each.
        rank: rank r of each update.
        scale: alpha / rank, the factor of B @ A.
        names: a label per slice (e.g. "q", "v"), for printing.
    """

    def __init__(
        self,
        base: nn.Linear,
        slices: Sequence[tuple[int, int]],
        rank: int,
        scale: float,
        names: Sequence[str] = (),
    ):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = scale
        self.slices = tuple((int(start), int(stop)) for start, stop in slices)
        self.names = tuple(names)
        w = base.weight  # [out, in]
        self.lora_a = nn.ParameterList()  # each [r, in]
        self.lora_b = nn.ParameterList()  # each [stop - start, r]
        for start, stop in self.slices:
            a = torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear's own weight init
            b = torch.zeros(stop - start, rank, dtype=w.dtype, device=w.device)
            self.lora_a.append(nn.Parameter(a))
            self.lora_b.append(nn.Parameter(b))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self) -> Tensor | None:
        """The base bias (not adapted)."""
        return self.base.bias

    @property
    def weight(self) -> Tensor:
        """The adapted weight W + scale * B @ A [out, in], differentiable in A and B (for code
        that reads `.weight` instead of calling the module, as timm's EvaAttention does)."""
        return self.base.weight + self.scale * self.delta_weight()

    def _a_stacked(self) -> Tensor:
        """All A's stacked: [k * r, in] for k slices."""
        return torch.cat(list(self.lora_a), dim=0)

    def _b_placed(self) -> Tensor:
        """All B's placed at their output rows, zero elsewhere: [out, k * r]."""
        out = self.base.out_features
        placed = [
            F.pad(b, (0, 0, start, out - stop))  # [out, r]
            for (start, stop), b in zip(self.slices, self.lora_b, strict=True)
        ]
        return torch.cat(placed, dim=1)

    def delta_weight(self) -> Tensor:
        """The unscaled update B @ A, placed at its rows: [out, in]."""
        return self._b_placed() @ self._a_stacked()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]: base(x) + scale * x @ A^T @ B^T (on the adapted rows)."""
        low = F.linear(x, self._a_stacked())  # [..., k * r]
        delta = F.linear(low, self._b_placed())  # [..., out]
        return self.base(x) + self.scale * delta

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base Linear with the update folded into its weight (in place, computed in fp32)."""
        w = self.base.weight  # [out, in]
        delta = self._b_placed().float() @ self._a_stacked().float()  # [out, in]
        w.copy_((w.float() + self.scale * delta).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        labels = self.names or tuple(f"{a}:{b}" for a, b in self.slices)
        return f"rank={self.rank}, scale={self.scale:g}, slices=({', '.join(labels)})"


def _blocks_of(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of a timm ViT / Eva, or of a fit3d `Backbone` (`.model.blocks`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        blocks = getattr(getattr(model, "model", None), "blocks", None)
    if not isinstance(blocks, nn.Module) or len(blocks) == 0:
        raise ValueError(
            f"add_lora: {type(model).__name__} has no transformer `blocks` "
            "(expected a timm VisionTransformer / Eva or a fit3d Backbone)"
        )
    return list(blocks)


def _get(block: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path` in `block`, or None."""
    module: nn.Module | None = block
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _plan_target(block: nn.Module, target: str) -> list[tuple[str, tuple[int, int], str]]:
    """Where `target` lives in `block`: (Linear path, output rows [start, stop), label) each."""
    qkv = _get(block, "attn.qkv")
    if target in _QKV and qkv is not None:
        if not isinstance(qkv, nn.Linear):
            raise ValueError(f"add_lora: attn.qkv is a {type(qkv).__name__}, not an nn.Linear")
        if qkv.out_features % 3:
            raise ValueError(f"add_lora: attn.qkv has {qkv.out_features} outputs, not 3 * C")
        c = qkv.out_features // 3
        i = _QKV.index(target)
        return [("attn.qkv", (i * c, (i + 1) * c), target)]
    if target in _QKV:
        paths = [f"attn.{target}_proj"]
    elif target == "proj":
        paths = ["attn.proj"]
    elif target == "fc1":
        unfused = _get(block, "mlp.fc1") is None and _get(block, "mlp.fc1_g") is not None
        paths = ["mlp.fc1_g", "mlp.fc1_x"] if unfused else ["mlp.fc1"]
    else:
        paths = ["mlp.fc2"]
    plan = []
    for path in paths:
        layer = _get(block, path)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"add_lora: {path} already has LoRA (merge_lora first)")
        if not isinstance(layer, nn.Linear):
            found = "nothing" if layer is None else type(layer).__name__
            raise ValueError(
                f"add_lora: target '{target}' needs an nn.Linear at {path} in "
                f"{type(block).__name__}, found {found}"
            )
        plan.append((path, (0, layer.out_features), target))
    return plan


def add_lora(
    model: nn.Module,
    rank: int = 4,
    blocks: int = 4,
    targets: Sequence[str] = ("q", "v"),
    alpha: float | None = None,
) -> list[nn.Parameter]:
    """Freeze every parameter of `model` (a timm ViT / Eva with `model.blocks`, or a fit3d
    `Backbone`), then add LoRA, W + (alpha / rank) * B @ A with A kaiming-uniform and B zero (the
    model is unchanged at start), to `targets` (see `LORA_TARGETS`) of the last `blocks` blocks
    (0 or >= the number of blocks: all). q / k / v of a fused qkv Linear adapt only their third
    of its output rows. alpha None = rank (scale 1). Returns the new trainable parameters.

    Raises ValueError (one line) on an unknown target, rank < 1, blocks < 0, or a model without
    such layers; the model is left untouched then."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"add_lora: unknown target(s) {unknown or list(targets)}; "
            f"choose from {', '.join(LORA_TARGETS)}"
        )
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    if blocks < 0:
        raise ValueError(f"add_lora: blocks must be >= 0 (0 = all), got {blocks}")
    all_blocks = _blocks_of(model)
    n = len(all_blocks)
    first = 0 if blocks == 0 or blocks >= n else n - blocks
    wanted = [t for t in LORA_TARGETS if t in targets]  # fixed order, no duplicates
    scale = (rank if alpha is None else alpha) / rank

    # Plan everything first, so that an error leaves the model as it was.
    plans: list[tuple[nn.Module, dict[str, list[tuple[tuple[int, int], str]]]]] = []
    for block in all_blocks[first:]:
        per_layer: dict[str, list[tuple[tuple[int, int], str]]] = {}
        for target in wanted:
            for path, rows, label in _plan_target(block, target):
                per_layer.setdefault(path, []).append((rows, label))
        plans.append((block, per_layer))

    for p in model.parameters():
        p.requires_grad_(False)
    new: list[nn.Parameter] = []
    for block, per_layer in plans:
        for path, slices in per_layer.items():
            parent_path, _, name = path.rpartition(".")
            parent = _get(block, parent_path)
            base = getattr(parent, name)
            slices = sorted(slices)
            layer = LoRALinear(
                base,
                [rows for rows, _ in slices],
                rank=rank,
                scale=scale,
                names=[label for _, label in slices],
            )
            setattr(parent, name, layer)
            new += [*layer.lora_a, *layer.lora_b]
    return new


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight in place and put back the plain `nn.Linear`
    modules, so that `model.state_dict()` has exactly the keys and shapes of the un-adapted timm
    model. Every parameter of `model` ends with requires_grad True (a plain model's default).
    Returns the number of layers merged."""
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged_linear())
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters (every A and B) present in `model`, in module order."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LoRALinear):
            params += [*module.lora_a, *module.lora_b]
    return params


def has_lora(model: nn.Module) -> bool:
    """True when `model` holds at least one `LoRALinear`."""
    return any(isinstance(m, LoRALinear) for m in model.modules())
