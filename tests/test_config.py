"""Config: defaults <- presets <- overrides; bad keys, types, values outside a field's range and
broken relations between fields are one-line errors (exit 2); every numeric field states its
range; `check_inputs` checks the paths an entry point reads, files by their content."""

import dataclasses
import re
import typing
from typing import Any

import pytest
import yaml

from fit3d.config import (
    CONFIG_DIR,
    FEATURE_SET_NAMES,
    Config,
    check_inputs,
    load_config,
    save_config,
    setting,
    validate,
)
from fit3d.errors import UserError


def test_defaults_match_the_paper() -> None:
    cfg = load_config()
    assert cfg.backbone.name == "dinov2"
    assert cfg.lift.feature_dim == 64
    assert (cfg.finetune.lr, cfg.finetune.weight_decay, cfg.finetune.grad_clip) == (1e-5, 1e-4, 0.1)
    assert (cfg.finetune.batch_size, cfg.finetune.epochs) == (2, 1)


def test_preset_then_overrides_win(tmp_path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("lift:\n  steps: 7\nscenes:\n  name: scannetpp\n")
    cfg = load_config(
        [str(preset)], ["lift.steps=9", "finetune.lr=1", "finetune.weight_decay=1e-5"]
    )
    assert cfg.finetune.weight_decay == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert cfg.lift.steps == 9
    assert cfg.scenes.name == "scannetpp"
    assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)  # int accepted as float
    assert cfg.scenes.train_split == "nvs_sem_train"  # untouched defaults survive the merge


def test_every_shipped_preset_loads() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"demo", "scannetpp"} <= set(names)
    for name in names:
        cfg = load_config([name])
        preset = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        for section, values in preset.items():
            for key, value in values.items():  # every key of the file reached the config
                got = getattr(getattr(cfg, section), key)
                if isinstance(got, tuple):
                    assert list(got) == list(value), (name, section, key)
                elif isinstance(got, float):
                    assert got == pytest.approx(float(value)), (name, section, key)
                else:
                    assert got == value, (name, section, key)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lift.stepz=3", "unknown config key 'lift.stepz'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("lift.steps=abc", "config key 'lift.steps' expects int"),
        ("lift.steps=1.5", "config key 'lift.steps' expects int"),
        ("finetune.lr=fast", "config key 'finetune.lr' expects float"),
        ("lift.steps=true", "config key 'lift.steps' expects int"),
        ("lift=3", "config key 'lift' is a section"),
        ("lift.steps", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_are_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config([], [override])


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(UserError, match="known: .*demo"):
        load_config(["no_such_preset"])


def test_saved_config_reloads_identically(tmp_path) -> None:
    cfg = load_config(["demo"], ["lift.steps=11", "run.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lift"]["steps"] == 11


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().lift.steps = 3  # type: ignore[misc]


# --- allowed values: every numeric field has a range, and load_config enforces it ---------------
def _numeric(tp: Any) -> bool:
    """Whether an annotation holds numbers: int or float, in a union or a tuple (not bool)."""
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)


def fields_without_range(cls: type, prefix: str = "") -> list[str]:
    """Keys of the numeric fields of `cls` and its nested sections that state no range."""
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            missing += fields_without_range(tp, f"{prefix}{f.name}.")
        elif _numeric(tp) and "allowed" not in f.metadata:
            missing.append(prefix + f.name)
    return missing


def _numeric_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """(key, field, annotation) of every numeric field of `Config`'s sections."""
    out = []
    for name, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        out += [(f"{name}.{f.name}", f, hints[f.name]) for f in dataclasses.fields(cls)]
    return [(key, f, tp) for key, f, tp in out if _numeric(tp)]


def test_every_numeric_field_states_its_range() -> None:
    """A field added without `setting(default, allowed)` fails here: state its range."""

    @dataclasses.dataclass(frozen=True)
    class Planted:
        ok: int = setting(1, ">= 1")
        bare: float = 0.5
        pair: tuple[int, int] = (1, 2)
        name: str = "x"
        flag: bool = False

    @dataclasses.dataclass(frozen=True)
    class Root:
        sub: Planted = dataclasses.field(default_factory=Planted)

    assert fields_without_range(Root) == ["sub.bare", "sub.pair"]
    assert fields_without_range(Config) == []
    assert len(_numeric_fields()) > 80


def _override(key: str, value: Any) -> str:
    """`key=value` in the override syntax."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).splitlines()[0]}"


@pytest.mark.parametrize(
    ("key", "fld", "tp"), [pytest.param(*f, id=f[0]) for f in _numeric_fields()]
)
def test_values_outside_each_numeric_range_are_one_line_errors(key, fld, tp) -> None:
    """Table-driven over every numeric field: each value just outside its stated range is a
    UserError naming the key, the value and the range; the default is inside it."""
    allowed, length = fld.metadata["allowed"], fld.metadata["length"]
    is_tuple = typing.get_origin(tp) is tuple
    item_tp = typing.get_args(tp)[0] if is_tuple else tp
    default = fld.default
    assert all(map(allowed.test, default)) if is_tuple else allowed.test(default)
    if str(allowed) == "any value":
        assert not allowed.outside  # stated as unconstrained (e.g. a block index from the end)
        return
    assert allowed.outside, f"{key}: its range names no value outside it"
    good = (default[0] if default else 1) if is_tuple else default
    n = len(typing.get_args(tp)) if is_tuple and Ellipsis not in typing.get_args(tp) else 1
    n = next(k for k in range(n, 9) if length is None or length.test(k))  # items it may have
    for bad in allowed.outside:
        if item_tp is int and isinstance(bad, float):
            bad = int(bad)
        value = [bad] + [good] * (n - 1) if is_tuple else bad
        with pytest.raises(UserError) as e:
            load_config([], [_override(key, value)])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(key) and f"{allowed}, got " in msg, msg
    if length is not None:
        for n in length.outside:
            if n >= 0:
                with pytest.raises(UserError, match=rf"^{re.escape(key)} needs {length} items"):
                    load_config([], [_override(key, [good] * int(n))])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune.lr=-1"], "finetune.lr must be > 0, got -1.0"),
        (["finetune.lr=0"], "finetune.lr must be > 0, got 0.0"),
        (["finetune.batch_size=0"], "finetune.batch_size must be >= 1, got 0"),
        (["lift.feature_pixels=0"], "lift.feature_pixels must be in (0, 1], got 0.0"),
        (["lift.feature_pixels=1.01"], "lift.feature_pixels must be in (0, 1], got 1.01"),
        (["lift.image_scale=0"], "lift.image_scale must be > 0, got 0.0"),
        (["lift.init_opacity=1"], "lift.init_opacity must be in (0, 1), got 1.0"),
        (["lift.lr_means_final=0"], "lift.lr_means_final must be > 0, got 0.0"),
        (["eval.val_fraction=1"], "eval.val_fraction must be in (0, 1), got 1.0"),
        (["finetune.max_steps=0"], "finetune.max_steps must be -1 or >= 1, got 0"),
        (["finetune.max_steps=-2"], "finetune.max_steps must be -1 or >= 1, got -2"),
        (["finetune.devices=0"], "finetune.devices must be auto, -1 (all), a count >= 1"),
        (["run.device=gpu"], "run.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["run.seed=-1"], "run.seed must be in [0, 4294967295], got -1"),
        (["lift.precision=half"], "lift.precision must be one of ['fp32', 'bf16', 'fp16', 'auto']"),
        (["finetune.precision=fp32"], "finetune.precision must be one of ['auto', '32-true',"),
        (["eval.protocol=fats"], "eval.protocol must be one of ['fast', 'paper'], got 'fats'"),
        (["eval.probes=[seg,dpeth]"], "eval.probes items must be one of ['seg', 'depth'"),
        (["eval.feature_sets=[finetuned]"], "eval.feature_sets items must be one of"),
        (["eval.lrs=[0.1,-1]"], "eval.lrs items must be > 0, got [0.1, -1.0]"),
        (["eval.seeds=[]"], "eval.seeds needs >= 1 items, got []"),
        (["eval.depth_crop=[416]"], "eval.depth_crop needs 0 or 2 items, got [416]"),
        (["eval.seg_scale=[2048]"], "config key 'eval.seg_scale' expects 2 items, got [2048]"),
        (["eval.dataset=nyu2"], "eval.dataset must be '' or one of ['demo', 'scannetpp', 'nyuv2'"),
        (["scenes.name=scanetpp"], "scenes.name must be one of ['demo', 'scannetpp', 'colmap'"),
        (["run.logger=tensorboard"], "run.logger must be one of ['csv', 'wandb']"),
        (["lift.split=test"], "lift.split must be one of ['train', 'val'], got 'test'"),
        # relations between fields of a section
        (
            ["lift.refine_start=200", "lift.refine_stop=200"],
            "lift.refine_start=200, lift.refine_stop=200: need refine_start < refine_stop",
        ),
        (
            ["eval.seg_iters=100", "eval.seg_warmup=101"],
            "eval.seg_iters=100, eval.seg_warmup=101: need seg_warmup <= seg_iters",
        ),
        (["eval.depth_warmup=40000"], "need depth_warmup <= depth_iters"),
        (["eval.sigloss_warmup=40000"], "need sigloss_warmup <= depth_iters"),
        (
            ["eval.micro_batch=3"],
            "eval.batch_size=8, eval.micro_batch=3: need micro_batch == 0 or batch_size % ",
        ),
        (["eval.micro_batch=8", "eval.paper_batch_size=12"], "paper_batch_size % micro_batch"),
        (["scenes.demo_train=0", "scenes.demo_val=0"], "need demo_train + demo_val >= 1"),
    ],
)
def test_bad_values_name_key_value_and_range(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(["demo"], overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["finetune.lr=1e-6", "finetune.batch_size=1", "lift.feature_pixels=1.0"],
        ["finetune.max_steps=-1", "finetune.devices=auto", "run.device=cuda:1"],
        ["finetune.max_steps=5", "finetune.devices=-1", "finetune.precision=bf16-mixed"],
        ['finetune.devices="0,1"', "finetune.devices=2", "eval.dataset=nyuv2"],
        ["lift.refine_start=0", "lift.refine_stop=1", "lift.steps=1"],  # stop past steps: fine
        ["eval.micro_batch=4", "eval.depth_crop=[416,544]", "eval.min_overlap=0"],
        ["eval.seg_iters=2", "eval.seg_warmup=2", "scenes.demo_train=0", "scenes.demo_val=1"],
        ["eval.corr_block=-2", "lift.sh_degree=0", "lift.ssim_weight=1"],
    ],
)
def test_values_at_the_edges_of_their_ranges_load(overrides: list[str]) -> None:
    load_config(["demo"], overrides)


def test_validate_checks_configs_built_in_code() -> None:
    """`validate` is what load_config applies; run functions call it on configs built in code."""
    cfg = load_config()
    validate(cfg)
    bad = dataclasses.replace(cfg, lift=dataclasses.replace(cfg.lift, steps=0))
    with pytest.raises(UserError, match=r"^lift\.steps must be >= 1, got 0$"):
        validate(bad)


def test_feature_set_names_are_the_evaluators() -> None:
    from fit3d.eval.features import FEATURE_SETS

    assert set(FEATURE_SET_NAMES) == set(FEATURE_SETS)


# --- paths an entry point reads: checked by content before any work ----------------------------
def test_check_inputs_weights_files_by_content(tmp_path) -> None:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    png = tmp_path / "w.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    good = tmp_path / "w.safetensors"
    header = b'{"__metadata__":{}}'
    good.write_bytes(len(header).to_bytes(8, "little") + header)
    cases = [
        (str(tmp_path / "nope.pth"), "eval.finetuned_weights: weights file not found: "),
        (str(text), "it is a text file starting 'root:x:0:0:root:/root:/bin/bash', not a state"),
        (str(png), f"cannot read weights file {png}: it is a PNG image, not a state dict"),
    ]
    for value, message in cases:
        cfg = load_config([], [f"eval.finetuned_weights={value}"])  # ranges: fine
        check_inputs(cfg, ("backbone",))  # a section this entry point does not read
        with pytest.raises(UserError) as e:
            check_inputs(cfg, ("backbone", "eval"))
        assert message in str(e.value) and "\n" not in str(e.value)
    for value in (str(good), "", "fit3d:dinov2_small"):
        check_inputs(load_config([], [f"eval.finetuned_weights={value}"]), ("eval",))
    for value in ("random", "", str(good)):
        check_inputs(load_config([], [f"backbone.weights={value}"]), ("backbone",))
    with pytest.raises(UserError, match=r"^backbone\.weights: weights file not found"):
        check_inputs(load_config([], ["backbone.weights=nope.pth"]), ("backbone",))


def test_check_inputs_folders(tmp_path) -> None:
    missing = tmp_path / "nope"
    cfg = load_config([], [f"eval.dataset_root={missing}"])
    with pytest.raises(UserError, match=f"^eval.dataset_root={missing}: no such folder$"):
        check_inputs(cfg, ("eval",))
    check_inputs(load_config([], [f"eval.dataset_root={tmp_path}"]), ("eval",))
