"""Own scene sets (`fit3d.scenes.own`): the prepared root and its marker, splits and
`scenes.val_scenes`, re-preparation when an input changes, a mix of sets, settings out of range,
and stage 1 lifting a prepared scene with its held-out PSNR and feature cosine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _scene_fixtures import write_wall_scene

from fit3d.config import load_config
from fit3d.errors import UserError
from fit3d.gaussians import load_lifted_scene
from fit3d.scenes import open_scene, resolve_scenes, scenes_root
from fit3d.scenes.demo import generate_demo
from fit3d.scenes.own import prepare
from fit3d.scenes.own.__main__ import main as own_main
from fit3d.view.data import scene_summary
from stage1_lift.__main__ import main as lift_main


def _cfg(name: str, out: Path, *extra: str):
    return load_config([name], [f"run.out={out}", *extra])


def test_scene_folders_splits_and_the_marker(tmp_path):
    for sid in ("kitchen", "lab", "office"):
        write_wall_scene(tmp_path / "captures" / sid)
    (tmp_path / "captures" / "notes").mkdir()  # no transforms.json: not a scene
    extra = (f"scenes.root={tmp_path / 'captures'}", "scenes.val_scenes=[lab]")
    cfg = _cfg("nerfstudio", tmp_path / "out", *extra)
    with pytest.raises(UserError, match="not prepared"):
        scenes_root(cfg)
    root = prepare(cfg, verbose=False)
    assert resolve_scenes(cfg, "train") == (root, ["kitchen", "office"], 1.0)
    assert resolve_scenes(cfg, "val") == (root, ["lab"], 1.0)
    assert root.parent == tmp_path / "out" / "scenes" / "nerfstudio"
    assert root.name.startswith("captures-")
    other = _cfg("nerfstudio", tmp_path / "out", *extra, "scenes.test_every=4")
    with pytest.raises(UserError, match="other settings"):
        scenes_root(other)
    with pytest.raises(UserError, match="val_scenes names attic"):
        prepare(_cfg("nerfstudio", tmp_path / "out2", extra[0], "scenes.val_scenes=[attic]"))


def test_a_changed_input_prepares_only_that_scene_again(tmp_path, capsys):
    for sid in ("a", "b"):
        write_wall_scene(tmp_path / "in" / sid)
    argv = ["--preset", "nerfstudio", f"scenes.root={tmp_path / 'in'}", f"run.out={tmp_path}/o"]
    assert own_main(argv) == 0
    root = scenes_root(_cfg("nerfstudio", tmp_path / "o", f"scenes.root={tmp_path / 'in'}"))
    before = {s: (root / "data" / s / "prepared.json").stat().st_mtime_ns for s in "ab"}
    image = tmp_path / "in" / "b" / "images" / "0003.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert own_main(argv) == 0
    out = capsys.readouterr().out
    assert "a: prepared already" in out and "b: 10 views" in out
    assert (root / "data" / "a" / "prepared.json").stat().st_mtime_ns == before["a"]
    assert (root / "data" / "b" / "prepared.json").stat().st_mtime_ns != before["b"]
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]


def test_mix_links_the_scenes_of_several_sets(tmp_path):
    write_wall_scene(tmp_path / "ns" / "wall")
    demo = generate_demo(
        tmp_path / "demo", seed=1, n_train=1, n_val=1, n_views=4, width=32, height=24, workers=1
    )
    sources = f"scenes.sources=[nerfstudio:{tmp_path / 'ns'},demo:{demo}]"
    demo_args = ("scenes.demo_seed=1", "scenes.demo_train=1", "scenes.demo_val=1")
    demo_args += ("scenes.demo_views=4", "scenes.demo_width=32", "scenes.demo_height=24")
    cfg = _cfg("mix", tmp_path / "out", sources, *demo_args, "scenes.val_scenes=[wall]")
    root = prepare(cfg, verbose=False)
    assert scenes_root(cfg) == root
    assert resolve_scenes(cfg, "train")[1] == ["demo_000"]
    assert resolve_scenes(cfg, "val")[1] == ["demo_001", "wall"]
    assert (root / "data" / "wall").is_symlink() and (root / "data" / "demo_000").is_symlink()
    wall = open_scene(root, "wall")
    alone = _cfg("nerfstudio", tmp_path / "out", f"scenes.root={tmp_path / 'ns'}")
    direct = open_scene(scenes_root(alone), "wall")  # the member prepared on its own
    assert wall.viewmat(3).equal(direct.viewmat(3)) and len(open_scene(root, "demo_001")) == 4
    clash = f"scenes.sources=[nerfstudio:{tmp_path / 'ns'},nerfstudio:{tmp_path / 'ns2'}]"
    write_wall_scene(tmp_path / "ns2" / "wall")
    with pytest.raises(UserError, match="'wall' is in two mixed sets"):
        prepare(_cfg("mix", tmp_path / "out", clash), verbose=False)
    with pytest.raises(UserError, match="scenes.sources is empty"):
        prepare(_cfg("mix", tmp_path / "out"), verbose=False)


@pytest.mark.parametrize(
    "override, message",
    [
        ("scenes.test_every=1", "test_every must be >= 2"),
        ("scenes.image_size=16", "image_size must be 0"),
        ("scenes.min_registered=0", "min_registered must be in (0, 1]"),
        ("scenes.matcher=vocab", "matcher must be one of ['auto', 'exhaustive', 'sequential']"),
        ("scenes.camera_model=FISH", "camera_model must be one of ['SIMPLE_PINHOLE'"),
        ("scenes.sources=[images]", "sources items must be name:root"),
        ("scenes.root=", "scenes.root is empty"),
    ],
)
def test_settings_out_of_range_are_one_line(tmp_path, capsys, override, message):
    write_wall_scene(tmp_path / "wall")
    argv = ["--preset", "nerfstudio", f"scenes.root={tmp_path / 'wall'}", override]
    assert own_main([*argv, f"run.out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_lift_reports_held_out_psnr_and_feature_cosine_of_an_own_scene(tmp_path):
    write_wall_scene(tmp_path / "wall", n_views=10)
    args = ["--preset", "nerfstudio", f"scenes.root={tmp_path / 'wall'}", f"run.out={tmp_path}"]
    args += ["scenes.test_every=4"]
    assert own_main(args) == 0
    tiny = [
        "run.device=cpu",
        "backbone.name=test_tiny",
        "lift.steps=40",
        "lift.feature_dim=8",
        "lift.refine_start=10",
        "lift.refine_stop=30",
        "lift.refine_every=5",
        "lift.sh_degree_interval=10",
        "lift.lr_features=0.01",
        "lift.lr_decoder=0.01",
        "lift.lr_means=0.002",
        "lift.lr_means_final=0.0002",
        "lift.init_opacity=0.5",
    ]
    assert lift_main([*args, *tiny]) == 0
    meta = json.loads((tmp_path / "lift" / "default" / "wall" / "meta.json").read_text())
    assert meta["init"] == "sparse" and meta["num_init_points"] == 300
    assert meta["test_views"] == 2 and meta["train_views"] == 8
    assert meta["metrics"]["views"] == 2
    assert meta["metrics"]["psnr"] > 14  # a flat grey image scores about 10 dB on this wall
    assert -1 <= meta["metrics"]["feat_cos"] <= 1
    root = scenes_root(
        _cfg("nerfstudio", tmp_path, f"scenes.root={tmp_path / 'wall'}", "scenes.test_every=4")
    )
    assert Path(meta["scenes_root"]) == root.resolve()
    # `make view` shows the same held-out figures
    lifted = load_lifted_scene(tmp_path / "lift" / "default" / "wall")
    line = scene_summary(lifted, len(lifted.gaussians["means"]))
    m = meta["metrics"]
    assert (
        f"held-out views (2): PSNR {m['psnr']:.2f} dB, feature cosine {m['feat_cos']:.3f}" in line
    )
