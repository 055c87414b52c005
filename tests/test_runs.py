"""fit3d.runs: shards, devices, the output layout, the settings check, provenance and meta.json
reading, each against values the test plants (environments, files, config changes)."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fit3d import runs
from fit3d.backbones import Backbone
from fit3d.config import load_config
from fit3d.errors import UserError


def test_shard_from_env_reads_shard_then_slurm_else_one_shard():
    assert runs.shard_from_env({}) == (0, 1)
    assert runs.shard_from_env({"SHARD": "1/3"}) == (1, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert runs.shard_from_env(slurm) == (2, 4)
    # without SLURM_ARRAY_TASK_MIN the array starts at 0; SHARD wins over SLURM
    assert runs.shard_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}) == (
        1,
        2,
    )
    assert runs.shard_from_env({**slurm, "SHARD": "0/2"}) == (0, 2)
    # an array id without a count is no array
    assert runs.shard_from_env({"SLURM_ARRAY_TASK_ID": "3"}) == (0, 1)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHARD": "1-3"}, "must look like i/n"),
        ({"SHARD": "a/b"}, "must look like i/n"),
        ({"SHARD": "3/3"}, "out of range"),
        ({"SHARD": "-1/3"}, "out of range"),
        (
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "3",
            },
            "out of range",
        ),
    ],
)
def test_bad_shards_are_user_errors(env: dict[str, str], message: str):
    with pytest.raises(UserError, match=message):
        runs.shard_from_env(env)


def test_shard_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SHARD", "2/5")
    assert runs.shard_from_env() == (2, 5)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.resolve_device("auto") == torch.device("cpu")
    assert runs.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        runs.resolve_device("cuda")
    with pytest.raises(UserError, match="auto, cpu, cuda or cuda:N, got 'gpu'"):
        runs.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs.resolve_device("auto") == torch.device("cuda")
    assert runs.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_resolve_precision_auto_follows_native_bf16(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    for name in ("fp32", "bf16", "fp16"):
        assert runs.resolve_precision(name, cpu) == name
    with pytest.raises(UserError, match="precision must be one of .* got 'half'"):
        runs.resolve_precision("half", cpu)
    cases = ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for avx512_bf16, amx, want in cases:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runs.native_bf16(cpu) is (want == "bf16")
        assert runs.resolve_precision("auto", cpu) == want
    # AVX2 code paths forced on a bf16-capable CPU (ATEN_CPU_CAPABILITY=avx2): emulated, so fp32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert runs.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probes
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runs.resolve_precision("auto", cpu) == "fp32"
    assert runs.native_bf16(torch.device("meta")) is False


def test_output_layout(tmp_path: Path):
    cfg = load_config([], [f"run.out={tmp_path}", "run.name=r1"])
    assert runs.run_dir(cfg, "lift") == tmp_path / "lift" / "r1"
    assert runs.run_dir(cfg, "eval", "other") == tmp_path / "eval" / "other"
    with pytest.raises(ValueError, match="unknown stage 'lifts'"):
        runs.run_dir(cfg, "lifts")
    lift = runs.run_dir(cfg, "lift")
    assert runs.lift_scene_dir(lift, "s7") == tmp_path / "lift" / "r1" / "s7"
    ft = runs.run_dir(cfg, "finetune")
    assert runs.finetune_checkpoint(ft) == tmp_path / "finetune" / "r1" / "checkpoints/last.ckpt"
    assert runs.demo_scenes_dir(cfg) == tmp_path / "scenes" / "demo"
    cfg2 = load_config([], [f"run.out={tmp_path}", f"scenes.root={tmp_path / 'mine'}"])
    assert runs.demo_scenes_dir(cfg2) == tmp_path / "mine"


def test_check_settings_accepts_a_rerun_and_names_the_changed_sections(tmp_path: Path):
    cfg = load_config([], ["lift.steps=10", "run.name=a"])
    folder = tmp_path / "run"
    assert runs.check_settings(cfg, folder, ("lift", "backbone")) is False  # nothing there yet
    runs.write_config(cfg, folder)
    assert (folder / runs.CONFIG_FILE).is_file()
    assert runs.check_settings(cfg, folder, ("lift", "backbone")) is True
    # sections outside the list may change (run.name, finetune.lr)
    other_run = load_config([], ["lift.steps=10", "run.name=b", "finetune.lr=0.5"])
    assert runs.check_settings(other_run, folder, ("lift", "backbone")) is True
    # the rooms the evaluator scores tie no lifting or fine-tuning run; the lifted rooms do
    test_rooms = load_config([], ["lift.steps=10", "scenes.demo_test=9", "scenes.demo_test_seed=4"])
    assert runs.check_settings(test_rooms, folder, ("lift", "scenes")) is True
    lifted_rooms = load_config([], ["lift.steps=10", "scenes.demo_train=9"])
    with pytest.raises(UserError, match=r"different settings \(scenes\)"):
        runs.check_settings(lifted_rooms, folder, ("lift", "scenes"))
    changed = load_config([], ["lift.steps=11", "backbone.name=test_tiny"])
    with pytest.raises(UserError, match=r"different settings \(lift, backbone\)"):
        runs.check_settings(changed, folder, ("lift", "backbone", "scenes"))
    (folder / runs.CONFIG_FILE).write_text("lift: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        runs.check_settings(cfg, folder, ("lift",))


def test_check_settings_reads_a_setting_added_since_as_its_default(tmp_path: Path):
    """A run folder written before `finetune.objective` existed is the same run as one with
    the default objective, and a different one from any other objective."""
    cfg = load_config([], ["finetune.lr=0.5"])
    runs.write_config(cfg, tmp_path)
    path = tmp_path / runs.CONFIG_FILE
    old = yaml.safe_load(path.read_text())
    del old["finetune"]["objective"], old["finetune"]["adapter"]
    path.write_text(yaml.safe_dump(old))
    assert runs.check_settings(cfg, tmp_path, ("finetune",)) is True
    other = load_config([], ["finetune.lr=0.5", "finetune.objective=equivariance"])
    with pytest.raises(UserError, match=r"different settings \(finetune\)"):
        runs.check_settings(other, tmp_path, ("finetune",))


def test_check_settings_leaves_out_settings_that_do_not_apply(tmp_path: Path):
    """A full fine-tune is the same run whatever LoRA's settings say; a LoRA run is not."""
    full = load_config([], ["finetune.lora_lr_scale=10", "finetune.equiv_weight=0.5"])
    runs.write_config(full, tmp_path / "full")
    assert runs.check_settings(load_config([], []), tmp_path / "full", ("finetune",)) is True
    lora = load_config([], ["finetune.adapter=lora", "finetune.lora_lr_scale=10"])
    runs.write_config(lora, tmp_path / "lora")
    with pytest.raises(UserError, match=r"different settings \(finetune\)"):
        runs.check_settings(
            load_config([], ["finetune.adapter=lora"]), tmp_path / "lora", ("finetune",)
        )
    # every rule names fields of its section and holds or fails on the defaults without error
    from fit3d.config import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = runs.to_dict(load_config([], []))["finetune"]
    for key, rule in FinetuneConfig.applies.items():
        assert key in names
        assert eval(rule, {"__builtins__": {}}, values) in (True, False)


def test_build_backbone_and_provenance(tmp_path: Path):
    """The configured alias is built; a weights file (argument over config) is recorded with the
    file's own sha256, under the key the caller names, beside the source tree's commit."""
    cfg = load_config([], ["backbone.name=test_tiny"])
    bb = runs.build_backbone(cfg)
    assert bb.alias == "test_tiny" and bb.weights_info.source == "random"
    sd = Backbone("test_tiny").model.state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    cfg_file = load_config([], ["backbone.name=test_tiny", "backbone.weights=random"])
    for built in (
        runs.build_backbone(cfg_file, str(path)),
        runs.build_backbone(
            load_config([], ["backbone.name=test_tiny", f"backbone.weights={path}"])
        ),
    ):
        assert built.weights_info.source == "file"
        assert torch.equal(built.model.pos_embed, sd["pos_embed"])
    prov = runs.provenance(runs.build_backbone(cfg_file, str(path)), weights_key="base_weights")
    assert set(prov) == {"backbone", "timm_name", "embed_dim", "base_weights", "git_commit"}
    assert (prov["backbone"], prov["timm_name"], prov["embed_dim"]) == (
        "test_tiny",
        "vit_small_patch14_dinov2",
        48,
    )
    assert prov["base_weights"] == {
        "source": "file",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(runs.__file__).parent,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert prov["git_commit"].removesuffix("-dirty") == (head or "unknown")


def test_read_meta(tmp_path: Path):
    (tmp_path / "meta.json").write_text('{"steps": 3, "metrics": {"psnr": 20.5}}')
    assert runs.read_meta(tmp_path / "meta.json") == {"steps": 3, "metrics": {"psnr": 20.5}}
    with pytest.raises(UserError, match="missing .*nope.json"):
        runs.read_meta(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"steps": 3')
    with pytest.raises(UserError, match="bad.json is not readable JSON"):
        runs.read_meta(tmp_path / "bad.json")
