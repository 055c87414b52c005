"""fit3d.backbones: aliases, preprocessing, dense features against a hook-based reference."""

from __future__ import annotations

import pytest
import timm
import torch

from fit3d.backbones import ALIASES, Backbone
from fit3d.errors import UserError
from fit3d.weights import TEST_ALIASES

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _block_tokens(bb: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Reference: every block's raw output tokens [B, prefix + h*w, C], via forward hooks on
    timm's plain forward_features (a different code path from forward_intermediates)."""
    out: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: out.append(o)) for blk in bb.model.blocks]
    try:
        final = bb.model.forward_features(x)  # [B, T, C] after the final norm
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(bb.model.norm(out[-1]), final)
    return out


def _to_map(tokens: torch.Tensor, n_prefix: int, h: int, w: int) -> torch.Tensor:
    """[B, prefix + h*w, C] -> [B, C, h, w] patch map (row-major token order)."""
    b, _, c = tokens.shape
    return tokens[:, n_prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def test_test_tiny() -> None:
    bb = Backbone("test_tiny")
    assert bb.weights_info.source == "random"
    assert (bb.embed_dim, bb.patch_size, bb.num_blocks) == (48, 14, 2)
    assert bb.quarter_blocks() == (0, 0, 1, 1)
    x = bb.preprocess(torch.rand(2, 3, 100, 150))
    assert x.shape == (2, 3, 98, 140)
    maps = bb.features(x, bb.quarter_blocks()).blocks
    assert [tuple(m.shape) for m in maps] == [(2, 48, 7, 10)] * 4
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[2], maps[3])
    assert not torch.equal(maps[0], maps[2])


@pytest.mark.parametrize("hw", [(14, 14), (56, 84), (98, 140), (224, 224), (70, 322)])
@pytest.mark.parametrize("norm", [True, False])
def test_features_match_hook_reference(hw: tuple[int, int], norm: bool) -> None:
    bb = Backbone("test_tiny")
    x = torch.randn(2, 3, *hw)
    h, w = hw[0] // 14, hw[1] // 14
    with torch.no_grad():
        ref = _block_tokens(bb, x)
        maps = bb.features(x, blocks=(1, 0, -1), norm=norm).blocks
    for m, i in zip(maps, (1, 0, 1), strict=True):
        tokens = bb.model.norm(ref[i]) if norm else ref[i]
        assert m.shape == (2, 48, h, w)
        torch.testing.assert_close(m, _to_map(tokens, 1, h, w), rtol=1e-5, atol=1e-5)


def test_forward_and_cls_token() -> None:
    """forward = last block + final norm, patch tokens; cls_token = token 0 with/without norm."""
    bb = Backbone("test_tiny")
    x = torch.randn(3, 3, 42, 70)
    with torch.no_grad():
        ref = _block_tokens(bb, x)
        cls_raw = bb.features(x, cls=True).cls
        fmap, cls = bb(x), bb.model.norm(cls_raw)
    torch.testing.assert_close(fmap, _to_map(bb.model.norm(ref[-1]), 1, 3, 5))
    torch.testing.assert_close(cls, bb.model.norm(ref[-1])[:, 0])
    torch.testing.assert_close(cls_raw, ref[-1][:, 0])
    assert cls.shape == (3, 48)


def test_registers_are_dropped() -> None:
    """DINOv2 with 4 registers: maps hold patch tokens only, CLS is token 0."""
    bb = Backbone("dinov2_reg", weights="random")
    assert bb.model.num_prefix_tokens == 5
    x = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        ref = _block_tokens(bb, x)
        fmap, cls = bb(x), bb.model.norm(bb.features(x, cls=True).cls)
    assert fmap.shape == (1, 384, 4, 3)
    torch.testing.assert_close(fmap, _to_map(bb.model.norm(ref[-1]), 5, 4, 3))
    torch.testing.assert_close(cls, bb.model.norm(ref[-1])[:, 0])


@pytest.mark.parametrize(
    ("alias", "dim", "patch", "quarters"),
    [("dinov2", 384, 14, (2, 5, 8, 11)), ("mae", 768, 16, (2, 5, 8, 11))],
)
def test_full_size_architectures(alias: str, dim: int, patch: int, quarters: tuple) -> None:
    bb = Backbone(alias, weights="random")
    assert (bb.embed_dim, bb.patch_size, bb.quarter_blocks()) == (dim, patch, quarters)
    x = bb.preprocess(torch.rand(1, 3, 3 * patch + 5, 2 * patch + 1))
    assert x.shape == (1, 3, 3 * patch, 2 * patch)
    with torch.no_grad():
        assert [m.shape for m in bb.features(x, quarters).blocks] == [(1, dim, 3, 2)] * 4


def test_preprocess_normalises_and_keeps_the_whole_image() -> None:
    bb = Backbone("test_tiny")
    # A constant image stays constant under any resize: exactly ImageNet-normalised values.
    img = torch.ones(1, 3, 30, 45) * torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    out = bb.preprocess(img)
    assert out.shape == (1, 3, 28, 42)
    want = ((torch.tensor([0.2, 0.5, 0.9]) - MEAN) / STD).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, want)
    # No crop: a left-to-right ramp keeps its range (a crop would cut the ends off).
    ramp = torch.linspace(0, 1, 45).view(1, 1, 1, 45).expand(1, 3, 30, 45)
    red = bb.preprocess(ramp)[0, 0] * STD[0] + MEAN[0]  # [28, 42] back in [0, 1]
    assert red[:, 0].max() < 0.02 and red[:, -1].min() > 0.98
    # Already a multiple of the patch: untouched apart from normalisation.
    img = torch.rand(2, 3, 28, 56)
    torch.testing.assert_close(
        bb.preprocess(img), (img - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    )


@pytest.mark.parametrize("alias", sorted(TEST_ALIASES))
def test_gradients_reach_every_parameter(alias: str) -> None:
    """Stage 2 trains all backbone parameters through `forward`: none is left without a gradient
    (DDP refuses those), SigLIP's attention pooling and EVA-02's fc_norm included (held apart)."""
    bb = Backbone(alias).train()
    p = bb.patch_size
    bb(torch.randn(1, 3, 2 * p, 3 * p)).square().mean().backward()
    missing = [n for n, q in bb.named_parameters() if q.grad is None]
    assert not missing, missing


def test_unknown_alias_lists_known_ones() -> None:
    with pytest.raises(UserError) as e:
        Backbone("dinov4")
    msg = str(e.value)
    assert "\n" not in msg and "'dinov4'" in msg
    assert all(alias in msg for alias in ALIASES)


def test_bad_block_index() -> None:
    bb = Backbone("test_tiny")
    with pytest.raises(ValueError):
        bb.features(torch.randn(1, 3, 28, 28), blocks=(2,))


def test_image_smaller_than_a_patch() -> None:
    with pytest.raises(UserError):
        Backbone("test_tiny").preprocess(torch.rand(1, 3, 10, 40))


def test_cpu_bf16_uses_explicit_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on a CPU runs timm's explicit attention (faster there), fp32 the fused kernel; both
    give the same tokens and gradients to bf16 rounding."""
    import fit3d.backbones as B

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    torch.manual_seed(0)
    bb = Backbone("test_tiny").train()
    x = torch.randn(2, 3, 42, 56)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        bb.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = bb(x).float()
        out.square().mean().backward()
        return out.detach(), bb.model.blocks[0].attn.qkv.weight.grad.clone()

    out, grad = run()
    assert not calls  # explicit attention under CPU bf16
    monkeypatch.setattr(B, "_cpu_bf16", lambda x: False)
    ref_out, ref_grad = run()
    assert calls  # the fused kernel otherwise
    torch.testing.assert_close(out, ref_out, rtol=0.05, atol=0.05)
    torch.testing.assert_close(grad, ref_grad, rtol=0.1, atol=0.02 * ref_grad.abs().max().item())
    n = len(calls)
    with torch.no_grad():
        bb(x)  # fp32
    assert len(calls) > n


# ---- every family against timm's own forward --------------------------------------------------

FAMILY_PREFIX = {
    "test_tiny": 1,  # CLS
    "test_tiny_reg": 5,  # CLS + 4 registers
    "test_tiny_siglip": 0,  # no prefix token; attention pooling
    "test_tiny_dinov3": 5,  # Eva: CLS + 4 registers, RoPE, no position table
    "test_tiny_eva02": 1,  # Eva: CLS, RoPE + position table, no final norm (fc_norm pools)
}
"""Prefix tokens of each tiny family, as the architectures define them."""


def _perturbed(alias: str) -> Backbone:
    """A tiny backbone whose every weight (layer scales, norms, biases) is random, so that no
    parameter sits at a neutral value that could hide a mistake."""
    bb = Backbone(alias)
    with torch.no_grad():
        for q in bb.parameters():
            q.add_(0.05 * torch.randn_like(q))
    return bb


def _timm_reference(bb: Backbone) -> torch.nn.Module:
    """timm's own model of the same architecture, built apart, with bb's full state dict loaded
    strictly (the pooling side included)."""
    ref = timm.create_model(
        TEST_ALIASES[bb.alias],
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        embed_dim=48,
        depth=2,
        num_heads=3,
        img_size=224,
    )
    ref.load_state_dict(bb.timm_state_dict(), strict=True)
    return ref.eval()


@pytest.mark.parametrize("alias", sorted(TEST_ALIASES))
def test_each_family_matches_timm_forward_features(alias: str) -> None:
    """Last block, final norm, patch tokens = timm's `forward_features` minus its prefix tokens,
    at two token grids (for patch 16, the demo's non-square 336x224: RoPE recomputed per grid)."""
    bb = _perturbed(alias)
    ref = _timm_reference(bb)
    assert ref.num_prefix_tokens == bb.num_prefix_tokens == FAMILY_PREFIX[alias]
    p = bb.patch_size
    for h, w in ((14, 21), (5, 7)):
        x = torch.randn(2, 3, h * p, w * p)
        with torch.no_grad():
            want = ref.forward_features(x)  # [B, prefix + h*w, C]
            got = bb(x)
        assert got.shape == (2, 48, h, w)
        torch.testing.assert_close(got, _to_map(want, FAMILY_PREFIX[alias], h, w))


@pytest.mark.parametrize("alias", sorted(TEST_ALIASES))
@pytest.mark.parametrize("norm", [False, True])
def test_each_family_blocks_and_cls_match_hooks(alias: str, norm: bool) -> None:
    """Requested blocks (raw or normed) and each block's CLS token (the mean patch token without
    one) equal the block outputs captured by hooks on timm's plain forward."""
    bb = _perturbed(alias)
    ref = _timm_reference(bb)
    n_prefix = FAMILY_PREFIX[alias]
    x = torch.randn(1, 3, 4 * bb.patch_size, 6 * bb.patch_size)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in ref.blocks]
    with torch.no_grad():
        ref.forward_features(x)
        got = bb.features(x, blocks=(1, 0), norm=norm, cls=True)
    for h in hooks:
        h.remove()
    for k, i in enumerate((1, 0)):
        tokens = ref.norm(outs[i]) if norm else outs[i]  # [1, prefix + 24, C]
        torch.testing.assert_close(got.blocks[k], _to_map(tokens, n_prefix, 4, 6))
        cls = tokens[:, 0] if n_prefix else tokens.mean(1)
        if not n_prefix and norm:  # no CLS: the normed mean patch token
            cls = ref.norm(outs[i].mean(1))
        torch.testing.assert_close(got.block_cls[k], cls)
    last = outs[-1][:, 0] if n_prefix else outs[-1].mean(1)
    torch.testing.assert_close(got.cls, last)


def test_pooling_side_is_kept_apart_unchanged() -> None:
    """SigLIP's attention pooling and EVA-02's fc_norm leave the trained model, and come back,
    untouched, in `timm_state_dict` (what stage 2 saves and exports)."""
    siglip, eva02 = Backbone("test_tiny_siglip"), Backbone("test_tiny_eva02")
    assert siglip.model.attn_pool is None and isinstance(eva02.model.fc_norm, torch.nn.Identity)
    assert not any(k.startswith("attn_pool.") for k in siglip.model.state_dict())
    before = {k: v.clone() for k, v in siglip.pooling_state.items()}
    assert any(k.startswith("attn_pool.") for k in before)
    assert set(eva02.pooling_state) == {"fc_norm.weight", "fc_norm.bias"}
    with torch.no_grad():
        for q in siglip.parameters():
            q.add_(1.0)
    sd = siglip.timm_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    assert _timm_reference(siglip).state_dict().keys() == sd.keys()  # loaded strictly


def test_full_size_dinov3_at_the_demo_size() -> None:
    """DINOv3 ViT-S/16 (random weights, no hub): the demo's 336x224 view -> a 14x21 grid."""
    bb = Backbone("dinov3_s", weights="random")
    assert (bb.embed_dim, bb.patch_size, bb.num_prefix_tokens, bb.quarter_blocks()) == (
        384,
        16,
        5,
        (2, 5, 8, 11),
    )
    x = bb.preprocess(torch.rand(1, 3, 224, 336))
    with torch.no_grad():
        assert bb(x).shape == (1, 384, 14, 21)


def test_dense_takes_fit3d_images() -> None:
    """`dense`: [H, W, 3] or [B, H, W, 3] in [0, 1] -> the forward of the preprocessed batch."""
    bb = Backbone("test_tiny_dinov3")
    img = torch.rand(50, 70, 3)
    with torch.no_grad():
        want = bb(bb.preprocess(img.permute(2, 0, 1)[None]))
    torch.testing.assert_close(bb.dense(img), want)
    two = img[None].expand(2, -1, -1, -1)  # [2, H, W, 3]
    torch.testing.assert_close(bb.dense(two), want.expand(2, -1, -1, -1))


def test_other_timm_models_are_refused() -> None:
    with pytest.raises(UserError, match="VisionTransformer and Eva"):
        Backbone("convnext_tiny.dinov3_lvd1689m")  # refused before any weights are looked for
