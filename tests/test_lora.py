"""fit3d.lora: LoRA on tiny random-weight backbones, checked against hand-built references.

Layouts: `test_tiny` (DINOv2-like VisionTransformer, fused `attn.qkv` with bias, called as a
module) and `test_tiny_eva02` (EVA-02-like Eva: fused bias-free `attn.qkv` plus separate q/v
biases, which timm applies through `F.linear(x, qkv.weight, bias)` without calling the module;
fused SwiGLU `mlp.fc1`). Eva with separate `q_proj/k_proj/v_proj` and timm's unfused SwiGLU
(`fc1_g`, `fc1_x`) are built directly with timm.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import Tensor, nn

from fit3d.backbones import Backbone
from fit3d.lora import (
    LORA_TARGETS,
    LoRALinear,
    add_lora,
    has_lora,
    lora_parameters,
    merge_lora,
)

LAYOUTS = ["test_tiny", "test_tiny_eva02"]
C = 48  # embed dim of the tiny aliases
QKV_ROWS = {"q": (0, C), "k": (C, 2 * C), "v": (2 * C, 3 * C)}  # rows of a fused [3C, C] qkv


def _backbone(alias: str) -> Backbone:
    """A tiny random backbone with its LayerScale gammas at 1 (timm inits DINOv2's at 1e-5, which
    would make every block, and so every LoRA update, nearly invisible in the output)."""
    backbone = Backbone(alias)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.fill_(1.0)
    return backbone


def _images(backbone: Backbone, seed: int = 1) -> Tensor:
    """A preprocessed random batch [2, 3, 56, 84] (a 4 x 6 token grid at patch 14)."""
    g = torch.Generator().manual_seed(seed)
    return backbone.preprocess(torch.rand(2, 3, 56, 84, generator=g))


def _randomise_b(model: nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Non-zero B's (A is random already), so the adapted model differs from the base one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _hand_merged(plain: nn.Module, adapted: nn.Module, targets: tuple[str, ...], scale: float):
    """State dict of `plain` with W[rows] += scale * B @ A for each adapted qkv slice, computed
    here from the target names (rows from `QKV_ROWS`), not from the LoRA modules' bookkeeping."""
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    params = dict(adapted.named_parameters())
    for i in range(len(plain.blocks)):
        prefix = f"blocks.{i}.attn.qkv"
        for j, target in enumerate(targets):  # slices are stored in q, k, v order
            key_a, key_b = f"{prefix}.lora_a.{j}", f"{prefix}.lora_b.{j}"
            if key_a not in params:
                continue
            a, b = params[key_a].detach(), params[key_b].detach()  # [r, C], [C, r]
            start, stop = QKV_ROWS[target]
            sd[f"{prefix}.weight"][start:stop] += scale * b @ a
    return sd


@pytest.mark.parametrize("alias", LAYOUTS)
def test_zero_init_is_exact_and_only_lora_trains(alias: str) -> None:
    backbone = _backbone(alias)
    plain = copy.deepcopy(backbone)
    rank, targets = 4, ("q", "v")
    new = add_lora(backbone.model, rank=rank, blocks=4, targets=targets)
    x = _images(backbone)
    with torch.no_grad():
        assert torch.equal(backbone(x), plain(x))  # B = 0: exactly the same function
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in new}
    assert {id(p) for p in lora_parameters(backbone)} == {id(p) for p in new}
    depth = len(plain.model.blocks)  # 2 < blocks=4: all blocks
    assert sum(p.numel() for p in new) == depth * len(targets) * rank * (C + C)
    assert has_lora(backbone) and not has_lora(plain)
    for p in new:
        if p.shape[0] == rank:  # A [r, C]: random, not zero
            assert p.abs().sum() > 0
        else:  # B [C, r]
            assert not p.any()


@pytest.mark.parametrize("alias", LAYOUTS)
def test_all_targets_parameter_count(alias: str) -> None:
    backbone = _backbone(alias)
    plain = copy.deepcopy(backbone.model)
    rank = 2
    new = add_lora(backbone, rank=rank, blocks=0, targets=LORA_TARGETS)  # a Backbone works too
    expected = 0
    for block in plain.blocks:
        expected += 3 * rank * (C + C)  # q, k, v: C inputs, C output rows each
        for layer in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            expected += rank * (layer.in_features + layer.out_features)
    assert sum(p.numel() for p in new) == expected


@pytest.mark.parametrize("alias", LAYOUTS)
def test_forward_matches_hand_modified_weights(alias: str) -> None:
    backbone = _backbone(alias)
    plain = copy.deepcopy(backbone)
    targets, rank, alpha = ("q", "v"), 4, 8.0
    add_lora(backbone.model, rank=rank, targets=targets, alpha=alpha)
    _randomise_b(backbone)
    qkv = backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and qkv.slices == (QKV_ROWS["q"], QKV_ROWS["v"])
    x = _images(backbone)
    with torch.no_grad():
        original = plain(x)
        plain.model.load_state_dict(
            _hand_merged(plain.model, backbone.model, targets, alpha / rank)
        )
        got, want = backbone(x), plain(x)
    assert not torch.allclose(got, original, atol=1e-3)  # the update does change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("alias", LAYOUTS)
def test_merge_restores_plain_timm_model(alias: str) -> None:
    backbone = _backbone(alias)
    plain = copy.deepcopy(backbone)
    targets, rank, alpha = ("q", "v"), 4, 2.0
    add_lora(backbone.model, rank=rank, targets=targets, alpha=alpha)
    _randomise_b(backbone)
    reference = _hand_merged(plain.model, backbone.model, targets, alpha / rank)
    x = _images(backbone)
    with torch.no_grad():
        unmerged = backbone(x)
    assert merge_lora(backbone.model) == len(plain.model.blocks)  # one fused qkv per block
    assert not has_lora(backbone) and lora_parameters(backbone) == []
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(type(b.attn.qkv) is nn.Linear for b in backbone.model.blocks)
    sd, plain_sd = backbone.model.state_dict(), plain.model.state_dict()
    assert list(sd) == list(plain_sd)
    assert all(sd[k].shape == plain_sd[k].shape for k in sd)
    for k in sd:
        torch.testing.assert_close(sd[k], reference[k], rtol=0, atol=1e-6)
    with torch.no_grad():
        merged = backbone(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5 * unmerged.abs().max().item())
    # the export path: the full timm model (pooling side included) loads the merged weights
    fresh = timm.create_model(
        backbone.timm_name,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        **backbone.create_kwargs,
    )
    fresh.load_state_dict(backbone.timm_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.forward_features(x), backbone.model.forward_features(x), rtol=0, atol=0
        )


@pytest.mark.parametrize("alias", LAYOUTS)
def test_training_step_updates_only_lora(alias: str) -> None:
    backbone = _backbone(alias)
    new = add_lora(backbone.model, rank=4, blocks=1, targets=("q", "v", "fc2"))
    x = _images(backbone)
    target = torch.randn_like(backbone(x).detach())
    loss = (backbone(x) - target).abs().sum()  # L1; a sum, so that one step moves visibly
    loss.backward()
    for name, p in backbone.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None, name
    a_grads = [p.grad for n, p in backbone.named_parameters() if ".lora_a." in n]
    b_grads = [p.grad for n, p in backbone.named_parameters() if ".lora_b." in n]
    assert len(a_grads) == 3 and len(b_grads) == 3  # q, v slices of qkv; fc2
    assert all(g is not None and not g.any() for g in a_grads)  # dL/dA = B^T (...) = 0 at B = 0
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)  # B learns from zero
    with torch.no_grad():
        before = backbone(x)
    torch.optim.SGD(new, lr=0.1).step()
    with torch.no_grad():
        after = backbone(x)
    assert (after - before).abs().max() > 1e-4  # the step changes the output
    assert (after - target).abs().sum() < loss.detach()  # and, a small step, lowers the loss


def test_errors_are_one_line_and_leave_model_alone() -> None:
    backbone = _backbone("test_tiny")
    cases = [
        dict(targets=("q", "qkv")),
        dict(rank=0),
        dict(targets=()),
        dict(blocks=-1),
    ]
    for kwargs in cases:
        with pytest.raises(ValueError) as info:
            add_lora(backbone.model, **kwargs)
        assert "\n" not in str(info.value) and str(info.value).startswith("add_lora:")
    with pytest.raises(ValueError, match="no transformer `blocks`"):
        add_lora(nn.Linear(4, 4))
    eva = Backbone("test_tiny_eva02").model
    del eva.blocks[1].mlp.fc2  # a layer that is missing
    with pytest.raises(ValueError, match="mlp.fc2") as info:
        add_lora(eva, blocks=0, targets=("q", "fc2"))
    assert "\n" not in str(info.value)
    assert not has_lora(eva) and all(p.requires_grad for p in eva.parameters())  # untouched
    assert not has_lora(backbone) and all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("alias", LAYOUTS)
def test_block_selection(alias: str) -> None:
    backbone = _backbone(alias)
    add_lora(backbone.model, blocks=1, targets=("q", "proj"))
    wrapped = {n for n, m in backbone.model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"blocks.1.attn.qkv", "blocks.1.attn.proj"}
    other = _backbone(alias)
    add_lora(other.model, blocks=0, targets=("fc1",))
    wrapped = {n for n, m in other.model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}


def _tiny_timm(name: str, **kwargs) -> nn.Module:
    return timm.create_model(
        name, pretrained=False, num_classes=0, embed_dim=C, depth=2, num_heads=3, **kwargs
    ).eval()


def test_eva_separate_qkv_and_unfused_swiglu() -> None:
    model = _tiny_timm("eva02_small_patch14_224", qkv_fused=False, img_size=56).double()
    plain = copy.deepcopy(model)
    new = add_lora(model, rank=3, targets=("k", "v"), alpha=6.0)  # scale 2
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"blocks.{i}.attn.{t}_proj" for i in range(2) for t in "kv"}
    assert all(p.dtype == torch.float64 for p in new)
    assert sum(p.numel() for p in new) == 2 * 2 * 3 * (C + C)
    _randomise_b(model)
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):  # a whole Linear: W += 2 * B @ A
            a, b = layer.lora_a[0].detach(), layer.lora_b[0].detach()
            sd[f"{name}.weight"] += 2.0 * b @ a
    plain.load_state_dict(sd)
    x = torch.rand(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))
        merge_lora(model)
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))

    swiglu = _tiny_timm("vit_small_plus_patch16_dinov3", img_size=64)
    add_lora(swiglu, blocks=1, targets=("fc1",))
    wrapped = {n for n, m in swiglu.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"blocks.1.mlp.fc1_g", "blocks.1.mlp.fc1_x"}


def test_adapted_state_dict_round_trip() -> None:
    """A checkpoint of an adapted model loads strictly into another one adapted the same way."""
    first = _backbone("test_tiny")
    second = copy.deepcopy(first)
    add_lora(first.model, rank=2, targets=("q", "v"))
    _randomise_b(first)
    add_lora(second.model, rank=2, targets=("q", "v"))  # other random A's, zero B's
    second.model.load_state_dict(first.model.state_dict(), strict=True)
    x = _images(first)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
