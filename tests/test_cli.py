"""fit3d.cli: presets stack in order and overrides win; the weights and show command lines give
the documented options and defaults; a bad option is one line (a UserError), not a usage block;
`parse_cli(inputs=...)` checks the paths of the sections an entry point reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fit3d.cli import exit_if_invalid, labels_config, parse_cli, show_args, weights_args
from fit3d.config import CONFIG_DIR, load_config
from fit3d.errors import UserError


def test_parse_cli_stacks_presets_in_order_and_overrides_win(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lift:\n  steps: 5\n  feature_dim: 8\n")
    second.write_text("lift:\n  steps: 7\n")
    cfg = parse_cli(["--preset", str(first), "--preset", str(second)], "prog", "")
    assert (cfg.lift.steps, cfg.lift.feature_dim) == (7, 8)
    cfg = parse_cli(["--preset", str(second), "--preset", str(first)], "prog", "")
    assert cfg.lift.steps == 5
    cfg = parse_cli(["--preset", str(first), "lift.steps=9", "run.name=x"], "prog", "")
    assert (cfg.lift.steps, cfg.lift.feature_dim, cfg.run.name) == (9, 8, "x")
    assert parse_cli([], "prog", "") == load_config()


def test_parse_cli_reads_a_shipped_preset_by_name() -> None:
    shipped = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    cfg = parse_cli(["--preset", "demo"], "prog", "")
    assert cfg.scenes.name == "demo" and cfg.lift.steps == shipped["lift"]["steps"]
    assert cfg.scenes.demo_views == shipped["scenes"]["demo_views"]


def test_parse_cli_rejects_unknown_options_in_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match="python -m stage1_lift: unrecognized arguments: --presets"):
        parse_cli(["--presets", "demo"], "python -m stage1_lift", "")
    assert capsys.readouterr().err == ""  # no usage block: cli_entry prints the one line


def test_parse_cli_checks_the_paths_of_the_sections_it_is_given(tmp_path: Path) -> None:
    argv = [f"eval.dataset_root={tmp_path / 'nope'}"]
    assert parse_cli(argv, "prog", "", inputs=("backbone",)).eval.dataset_root  # not read here
    with pytest.raises(UserError, match=r"eval\.dataset_root=.*nope: no such folder"):
        parse_cli(argv, "prog", "", inputs=("backbone", "eval"))


def test_exit_if_invalid_exits_2_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["labels", "scenes.nosuch=1"])
    with pytest.raises(SystemExit) as e:
        exit_if_invalid(labels_config)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: unknown config key 'scenes.nosuch'")
    monkeypatch.setattr("sys.argv", ["labels", "scenes.max_scenes=1"])
    exit_if_invalid(labels_config)  # good settings: returns, prints nothing
    assert capsys.readouterr().err == ""


def test_weights_args() -> None:
    assert weights_args([], None).prepare is False
    assert weights_args(["--prepare"], None).prepare is True
    with pytest.raises(UserError, match="unrecognized arguments: --download"):
        weights_args(["--download"], None)


def test_show_args_defaults_and_values() -> None:
    args = show_args(["demo_003"], None)
    assert (args.scene, args.root, args.views, args.resolution, args.out) == (
        "demo_003",
        "",
        4,
        1.0,
        "",
    )
    args = show_args(
        ["s1", "--root", "/d", "--views", "2", "--resolution", "0.5", "--out", "x.png"], None
    )
    assert (args.scene, args.root, args.views, args.resolution, args.out) == (
        "s1",
        "/d",
        2,
        0.5,
        "x.png",
    )
    with pytest.raises(UserError, match="required: scene"):
        show_args([], None)  # the scene id is required
    with pytest.raises(UserError, match="--views: invalid int value: 'many'"):
        show_args(["s1", "--views", "many"], None)
