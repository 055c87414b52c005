"""Run plumbing shared by every stage: devices, shards, output layout, provenance.

Every stage (`stage1_lift`, `stage2_finetune`, `fit3d.eval`, label preparation) is a `run(cfg)`
that asks this module where its outputs go, which device it runs on and which shard of the work
is its own; nothing else builds an output path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from fit3d.config import PRECISIONS, Config, save_config, to_dict
from fit3d.errors import UserError
from fit3d.io import git_commit

if TYPE_CHECKING:
    from fit3d.backbones import Backbone


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count) from SHARD=i/n, else a SLURM array task, else (0, 1)."""
    env = dict(os.environ) if env is None else env
    if env.get("SHARD"):
        try:
            i, n = (int(x) for x in env["SHARD"].split("/"))
        except ValueError:
            raise UserError(f"SHARD={env['SHARD']!r} must look like i/n, e.g. 0/4") from None
    elif env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        return 0, 1
    if not 0 <= i < n:
        raise UserError(f"shard {i}/{n} out of range: need 0 <= i < n")
    return i, n


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but CUDA is not available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"run.device must be auto, cpu, cuda or cuda:N, got '{name}'")
    return torch.device(name)


# --- precision ----------------------------------------------------------------------------
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX whose AVX-512 kernels torch uses. Elsewhere torch emulates bf16 (on an AVX2-only CPU a
    bf16 ViT step ran 5-12x slower than fp32), so `auto` keeps fp32 there, also on an AVX-512
    machine told to take AVX2 code paths (`ATEN_CPU_CAPABILITY=avx2`, as `make test-other-isa`
    and an AVX2 rehearsal do)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; absent -> False
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """`fp32`, `bf16` or `fp16` for a `PRECISIONS` value: `auto` is bf16 where the device has it
    natively (`native_bf16`), else fp32. Unknown names are a UserError."""
    if name not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast(device: torch.device, precision: str):
    """`torch.autocast` for a resolved precision (`fp32` = no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


# --- output layout --------------------------------------------------------------------------
STAGES = ("lift", "finetune", "eval", "labels", "compare")
CONFIG_FILE = "config.yaml"
"""The resolved config of a run, in its folder."""
META_FILE = "meta.json"
"""Metadata beside every artifact; written last, so a finished artifact is one with a meta.json."""
SUMMARY_FILE = "summary.json"
"""A lift run's merged per-scene summary."""
STATUS_FILE = "status.json"
"""Per lifted scene: why it was skipped or stopped (absent once it is done)."""
BACKBONE_FILE = "backbone.safetensors"
"""A fine-tune run's weights: a plain timm state dict."""
CHECKPOINT_FILE = "checkpoint.pt"
"""A lift scene's resumable checkpoint (deleted once the scene is done)."""


def run_dir(cfg: Config, stage: str, name: str | None = None) -> Path:
    """`<run.out>/<stage>/<name>` (default name: `run.name`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {STAGES})")
    return Path(cfg.run.out) / stage / (name if name is not None else cfg.run.name)


def lift_scene_dir(lift_run: Path, scene_id: str) -> Path:
    """One lifted scene's folder inside a lift run (format: `fit3d.gaussians`)."""
    return Path(lift_run) / scene_id


def finetune_checkpoint(finetune_run: Path) -> Path:
    """The resumable Lightning checkpoint of a fine-tune run."""
    return Path(finetune_run) / "checkpoints" / "last.ckpt"


def eval_cache_dir(cfg: Config, eval_run: Path) -> Path:
    """The evaluator's feature and label cache: `eval.cache_dir`, else `<eval run>/cache`."""
    return Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(eval_run) / "cache"


def finetune_target_dir(finetune_run: Path) -> Path:
    """Where stage 2 writes the rendered target windows of a fine-tune run."""
    return Path(finetune_run) / "targets"


def demo_scenes_dir(cfg: Config) -> Path:
    """Where the demo scene set of `cfg` lives: `scenes.root`, else `<run.out>/scenes/demo`."""
    return Path(cfg.scenes.root) if cfg.scenes.root else Path(cfg.run.out) / "scenes" / "demo"


def own_scenes_dir(cfg: Config) -> Path:
    """Where an own scene set (`scenes.name` colmap, nerfstudio, images or mix) is prepared:
    `<run.out>/scenes/<name>/<input folder name>-<8 hex digits of its absolute path>`; a mix is
    named by the hash of its `scenes.sources`."""
    sc = cfg.scenes
    if sc.name == "mix":
        key, stem = "\n".join(sc.sources), "mix"
    else:
        path = Path(sc.root).expanduser().resolve()
        key, stem = str(path), path.name or "root"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(cfg.run.out) / "scenes" / sc.name / f"{stem}-{digest}"


def benchmark_output(name: str) -> Path:
    """Where a benchmark script writes its figures (`outputs/bench/<name>.json`)."""
    return Path("outputs") / "bench" / f"{name}.json"


def scenes_picture(scene_id: str) -> Path:
    """Default output of `python -m fit3d.scenes.show`."""
    return Path("outputs") / "scenes" / "show" / f"{scene_id}.png"


# --- settings and provenance ----------------------------------------------------------------
EVAL_ONLY = {"scenes": ("demo_probe", "demo_probe_views", "demo_test", "demo_test_views",
                        "demo_test_seed")}  # fmt: skip
"""Settings that only choose what the evaluator scores (the demo's probe and test rooms): they
never tie a lifting or fine-tuning run."""


def _tied(data: dict, section: str) -> dict:
    """A config section as `check_settings` compares it (without `EVAL_ONLY` keys)."""
    return {
        k: v for k, v in (data.get(section) or {}).items() if k not in EVAL_ONLY.get(section, ())
    }


def check_settings(cfg: Config, folder: Path, sections: tuple[str, ...]) -> bool:
    """Refuse to mix results of different settings in one run folder.

    Returns True when `folder` already holds a config.yaml whose `sections` equal `cfg`'s (a rerun
    or resume of the same run; `EVAL_ONLY` keys aside; a key the old file lacks, i.e. a setting
    added since, matches its default value; a setting whose section's `applies` rule is false
    for a run is left out), False when there is none; raises
    `UserError` naming the sections that differ otherwise.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    new, defaults = to_dict(cfg), to_dict(type(cfg)())

    def active(values: dict, s: str) -> dict:  # without the settings that do not apply
        rules = getattr(getattr(cfg, s, None), "applies", {})
        return {
            k: v for k, v in values.items()
            if k not in rules or eval(rules[k], {"__builtins__": {}}, values)  # source rules only
        }  # fmt: skip

    def same(s: str) -> bool:  # a setting added since the old run counts at its default
        was = {**_tied(defaults, s), **_tied(old, s)}
        return active(was, s) == active(_tied(new, s), s)

    changed = [s for s in sections if not same(s)]
    if changed:
        raise UserError(
            f"{path} was written with different settings ({', '.join(changed)}); "
            "use another run.name or remove the folder"
        )
    return True


def write_config(cfg: Config, folder: Path) -> None:
    """Write the resolved config into a run folder (atomically)."""
    save_config(cfg, Path(folder) / CONFIG_FILE)


def build_backbone(cfg: Config, weights: str | None = None) -> Backbone:
    """The configured backbone; `weights` (a file) overrides `backbone.weights`."""
    from fit3d.backbones import Backbone

    return Backbone(cfg.backbone.name, weights or cfg.backbone.weights or None)


def provenance(backbone: Backbone, weights_key: str = "weights") -> dict[str, Any]:
    """What produced an output: backbone alias, timm name, width, the weights it was built from
    (source, path, sha256) under `weights_key`, and the source tree's git commit. Every
    meta.json / results.json carries these keys (stage 2 names its starting weights
    `base_weights`, the evaluator `original_weights`)."""
    return {
        "backbone": backbone.alias,
        "timm_name": backbone.timm_name,
        "embed_dim": backbone.embed_dim,
        weights_key: backbone.weights_info.to_dict(),
        "git_commit": git_commit(),
    }


def read_meta(path: Path) -> dict[str, Any]:
    """A meta.json (or any JSON metadata file); missing or malformed is a `UserError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON: {e}") from None
