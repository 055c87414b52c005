"""fit3d.scenes: resolving a config's scene set is pure (the demo set is generated only when
asked), checks the set matches the config, and reads ScanNet++ roots and splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fit3d.config import Config, RunConfig, ScenesConfig
from fit3d.errors import UserError
from fit3d.scenes import generate_demo_set, list_scenes, resolve_scenes


def test_list_and_resolve_demo(tmp_path):
    scenes = ScenesConfig(
        root=str(tmp_path / "d"),
        demo_train=2,
        demo_val=1,
        demo_views=3,
        demo_width=24,
        demo_height=16,
        resolution=0.5,
    )
    cfg = Config(scenes=scenes)
    with pytest.raises(UserError, match="make scenes"):  # resolving is pure: nothing generated yet
        resolve_scenes(cfg, "train")
    assert not (tmp_path / "d").exists()
    generate_demo_set(cfg)
    root, ids, res = resolve_scenes(cfg, "train")
    assert ids == ["demo_000", "demo_001"] and res == 0.5
    assert resolve_scenes(cfg, "val")[1] == ["demo_002"] == list_scenes(root, "nvs_sem_val")
    assert list_scenes(root, "val") == ["demo_002"] and list_scenes(root, "train") == ids
    with pytest.raises(UserError, match="other settings"):  # a set made with other parameters
        resolve_scenes(Config(scenes=dataclasses.replace(scenes, demo_views=4)), "train")
    scenes2 = ScenesConfig(
        demo_train=1, demo_val=1, demo_views=2, demo_width=16, demo_height=16, max_scenes=1
    )
    cfg2 = Config(scenes=scenes2, run=RunConfig(out=str(tmp_path / "out")))
    generate_demo_set(cfg2)
    root2, ids2, _ = resolve_scenes(cfg2, "train")
    assert root2 == tmp_path / "out/scenes/demo" and ids2 == ["demo_000"]


def test_resolve_scannetpp_without_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SCANNETPP_ROOT", raising=False)
    with pytest.raises(UserError, match="undistort"):
        resolve_scenes(Config(scenes=ScenesConfig(name="scannetpp")), "train")
    monkeypatch.setenv("SCANNETPP_ROOT", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="missing"):
        resolve_scenes(Config(scenes=ScenesConfig(name="scannetpp")), "val")


def _scannetpp_root(tmp_path: Path, train: str, val: str) -> Path:
    """A ScanNet++ root with a data/ folder and the two split files (contents as given)."""
    root = tmp_path / "spp"
    (root / "data").mkdir(parents=True)
    (root / "splits").mkdir()
    (root / "splits" / "nvs_sem_train.txt").write_text(train)
    (root / "splits" / "nvs_sem_val.txt").write_text(val)
    return root


def test_resolve_scannetpp_root_splits_and_cap(tmp_path):
    root = _scannetpp_root(tmp_path, "a1\nb2\nc3\n", "\n")
    cfg = Config(scenes=ScenesConfig(name="scannetpp", root=str(root), resolution=0.25))
    assert resolve_scenes(cfg, "train") == (root, ["a1", "b2", "c3"], 0.25)
    capped = Config(scenes=dataclasses.replace(cfg.scenes, max_scenes=2))
    assert resolve_scenes(capped, "train")[1] == ["a1", "b2"]
    with pytest.raises(UserError, match="split 'val' of .* lists no scenes"):
        resolve_scenes(cfg, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_scenes(cfg, "test")


def test_resolve_refuses_a_root_without_data_and_an_unknown_set(tmp_path):
    (tmp_path / "empty").mkdir()
    no_data = Config(scenes=ScenesConfig(name="scannetpp", root=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="has no data/ folder"):
        resolve_scenes(no_data, "train")
    with pytest.raises(UserError, match="unknown scenes.name 'nyu'"):
        resolve_scenes(Config(scenes=ScenesConfig(name="nyu")), "train")
