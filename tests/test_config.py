"""Config: defaults <- presets <- overrides; bad keys and types are one-line errors (exit 2)."""

import dataclasses

import pytest
import yaml

from fit3d.config import CONFIG_DIR, load_config, save_config
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
