"""stage1_lift (loop.py, run.py, __main__): the per-step view order and means schedule, and stage 1
end to end on tiny analytic scenes in the ScanNet++ layout (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import stage1_lift.loop
from fit3d import runs
from fit3d.config import load_config
from fit3d.errors import UserError
from fit3d.gaussians import load_lifted_scene
from fit3d.scenes.scannetpp import viewmat_to_nerfstudio
from stage1_lift.__main__ import main
from stage1_lift.loop import means_lr, view_for_step
from stage1_lift.run import run

W, H, FOCAL = 48, 32, 40.0


def test_every_epoch_visits_each_train_view_once():
    train = [0, 2, 3, 5, 8]
    for epoch in range(3):
        seen = [view_for_step(epoch * 5 + k, train, seed=4) for k in range(5)]
        assert sorted(seen) == train
    assert [view_for_step(k, train, 4) for k in range(10)] != [
        view_for_step(k, train, 5) for k in range(10)
    ]


def test_means_lr_decays_exponentially_from_first_to_final_times_extent():
    cfg = load_config([], ["lift.steps=100", "lift.lr_means=0.01", "lift.lr_means_final=0.0001"])
    assert means_lr(0, cfg, 2.0) == pytest.approx(0.02)
    assert means_lr(50, cfg, 2.0) == pytest.approx(2.0 * 0.001)  # geometric midpoint
    assert means_lr(25, cfg, 2.0) == pytest.approx(2.0 * 0.01 * 0.01**0.25)
    assert means_lr(100, cfg, 2.0) == pytest.approx(0.0002)
    assert means_lr(150, cfg, 2.0) == pytest.approx(0.0002)  # held after the schedule


def _texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth colour pattern on the wall plane z = 3: [..., 3] in [0,1]."""
    return np.stack(
        [0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2 * y), 0.5 + 0.3 * np.sin(2 * x + y)], -1
    )


def _viewmat(k: int) -> np.ndarray:
    """Camera k: at (0.15 k - 0.5, 0.05 k, 0) looking along +z, small yaw; world-to-camera."""
    yaw = 0.04 * (k - 4)
    rot = np.array(
        [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]]
    )  # camera-to-world rotation
    centre = np.array([0.15 * k - 0.5, 0.05 * k, 0.0])
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot, centre
    return np.linalg.inv(c2w)


def write_scene(root: Path, sid: str, n_views: int = 8, points: bool = True) -> None:
    """A wall with a smooth texture seen by n_views pinhole cameras; every 4th view is a test view.

    Images are computed analytically (ray-plane intersection), independently of the renderer.
    """
    dslr = root / "data" / sid / "dslr"
    (dslr / "undistorted_images").mkdir(parents=True)
    (dslr / "nerfstudio").mkdir()
    (dslr / "colmap").mkdir()
    K = np.array([[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1]])
    frames, test_frames = [], []
    for k in range(n_views):
        vm = _viewmat(k)
        c2w = np.linalg.inv(vm)
        u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T @ c2w[:3, :3].T
        t = (3.0 - c2w[2, 3]) / rays[..., 2]
        hit = c2w[:3, 3] + rays * t[..., None]
        img = (_texture(hit[..., 0], hit[..., 1]) * 255).round().astype(np.uint8)
        name = f"DSC{k:04d}.JPG"
        cv2.imwrite(
            str(dslr / "undistorted_images" / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100]
        )
        frame = {"file_path": name, "transform_matrix": viewmat_to_nerfstudio(vm).tolist()}
        (test_frames if k % 4 == 3 else frames).append(frame)
    meta = {"fl_x": FOCAL, "fl_y": FOCAL, "cx": W / 2, "cy": H / 2, "w": W, "h": H}
    meta |= {"frames": frames, "test_frames": test_frames}
    (dslr / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
    if points:
        rng = np.random.default_rng(0)
        xy = rng.uniform([-2.6, -1.6], [2.6, 2.0], size=(300, 2))
        rgb = (_texture(xy[:, 0], xy[:, 1]) * 255).round().astype(int)
        lines = [
            f"{i + 1} {x:.6f} {y:.6f} 3.0 {r} {g} {b} 0.1"
            for i, ((x, y), (r, g, b)) in enumerate(zip(xy, rgb, strict=True))
        ]
        (dslr / "colmap" / "points3D.txt").write_text("\n".join(lines) + "\n")


def make_root(tmp_path: Path, scenes: dict[str, bool]) -> Path:
    """Root with the given scenes ({id: has_points}) listed in the train split."""
    root = tmp_path / "scannetpp"
    (root / "splits").mkdir(parents=True)
    for sid, pts in scenes.items():
        write_scene(root, sid, points=pts)
    (root / "splits" / "nvs_sem_train.txt").write_text("\n".join(scenes) + "\n")
    (root / "splits" / "nvs_sem_val.txt").write_text("\n")
    return root


def _tensors(run_dir: Path, sid: str) -> dict[str, torch.Tensor]:
    lifted = load_lifted_scene(run_dir / sid)
    return {**lifted.gaussians, "decoder": lifted.decoder.weight}


def test_scannetpp_code_path_smoke(tmp_path):
    """CPU smoke test of the ScanNet++ preset's code path; the scene is learned, not just run."""
    root = make_root(tmp_path, {"s0": True})
    out = tmp_path / "out"
    assert main(_argv(root, out)) == 0
    run_dir = out / "lift" / "default"
    lifted = load_lifted_scene(run_dir / "s0")
    meta = lifted.meta
    assert meta["init"] == "sparse" and meta["num_init_points"] == 300
    assert meta["feature_dim"] == 8 and meta["embed_dim"] == lifted.decoder.weight.shape[0]
    assert meta["steps"] == 40 and meta["num_gaussians"] == len(lifted.gaussians["means"])
    assert (run_dir / "s0" / "pca.png").is_file() and (run_dir / "config.yaml").is_file()
    assert not (run_dir / "s0" / "checkpoint.pt").exists()
    # a flat grey image scores about 10 dB on this texture; the fit must beat it clearly
    assert meta["metrics"]["psnr"] > 14
    assert meta["metrics"]["feat_cos"] > 0.2
    g = lifted.gaussians
    assert torch.allclose(g["quats"].norm(dim=-1), torch.ones(len(g["quats"])), atol=1e-5)
    assert (g["scales"] > 0).all() and ((g["opacities"] > 0) & (g["opacities"] < 1)).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["done"] == 1 and summary["scenes"]["s0"]["psnr"] == meta["metrics"]["psnr"]
    # a rerun skips the finished scene and leaves it untouched
    before = (run_dir / "s0" / "gaussians.safetensors").stat().st_mtime_ns
    assert main(_argv(root, out)) == 0
    assert (run_dir / "s0" / "gaussians.safetensors").stat().st_mtime_ns == before


def test_auto_precision_is_resolved_and_a_bf16_lift_still_learns(tmp_path, monkeypatch):
    """`lift.precision=auto` on a device with native bf16 runs the teacher and decoder in bf16;
    config.yaml and meta.json say bf16 and the scene is still learned (same bars as fp32)."""
    monkeypatch.setattr(runs, "native_bf16", lambda device: True)
    root = make_root(tmp_path, {"s0": True})
    out = tmp_path / "out"
    assert main(_argv(root, out, "lift.precision=auto")) == 0
    run_dir = out / "lift" / "default"
    meta = load_lifted_scene(run_dir / "s0").meta
    assert meta["precision"] == "bf16"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lift"]["precision"] == "bf16"
    assert meta["metrics"]["psnr"] > 14 and meta["metrics"]["feat_cos"] > 0.2
    # the same run without native bf16 resolves to fp32, which the finished folder refuses
    monkeypatch.setattr(runs, "native_bf16", lambda device: False)
    with pytest.raises(UserError, match="different settings \\(lift\\)"):
        run(_cfg(root, out, "lift.precision=auto"))


def test_feature_loss_on_a_quarter_of_the_pixels_still_learns(tmp_path):
    """`lift.feature_pixels=0.25` (the decoder at a quarter of the pixels per step) meets the
    same bars as the full loss; a fraction outside (0, 1] stops before any work."""
    root = make_root(tmp_path, {"s0": True})
    out = tmp_path / "out"
    assert main(_argv(root, out, "lift.feature_pixels=0.25")) == 0
    meta = load_lifted_scene(out / "lift" / "default" / "s0").meta
    assert meta["metrics"]["psnr"] > 14 and meta["metrics"]["feat_cos"] > 0.2
    with pytest.raises(UserError, match="lift.feature_pixels must be in"):
        run(_cfg(root, tmp_path / "bad", "lift.feature_pixels=0"))
    assert not (tmp_path / "bad").exists()


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """Tiny-scene settings on top of the ScanNet++ preset (short schedule, higher lrs)."""
    return [
        "scenes.name=scannetpp",
        f"scenes.root={root}",
        "scenes.resolution=1.0",
        f"run.out={out}",
        "run.device=cpu",
        "backbone.name=test_tiny",
        "lift.steps=40",
        "lift.feature_dim=8",
        "lift.refine_start=10",
        "lift.refine_stop=30",
        "lift.refine_every=5",
        "lift.sh_degree_interval=10",
        "lift.checkpoint_every=10",
        "lift.lr_features=0.01",
        "lift.lr_decoder=0.01",
        "lift.lr_means=0.002",
        "lift.lr_means_final=0.0002",
        "lift.init_opacity=0.5",
        *extra,
    ]


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "scannetpp", *_overrides(root, out, *extra)]


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(["scannetpp"], _overrides(root, out, *extra))


class _Kill(Exception):
    pass


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_resume_equals_uninterrupted(tmp_path, fraction):
    """Also with the feature loss on a per-step draw of pixels (drawn from the step, not from a
    generator's state, so the resumed run draws the same)."""
    root = make_root(tmp_path, {"s0": True})
    argv = ["lift.steps=24", "lift.refine_stop=20", f"lift.feature_pixels={fraction}"]
    cfg_a = _cfg(root, tmp_path / "a", *argv)
    cfg_b = _cfg(root, tmp_path / "b", *argv)
    run(cfg_a)

    def kill(step: int) -> None:
        if step == 17:  # checkpoint at 10 (and densification since), killed mid-way to 20
            raise _Kill

    with pytest.raises(_Kill):
        run(cfg_b, on_step=kill)
    ckpt = tmp_path / "b" / "lift" / "default" / "s0" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 10
    assert not (ckpt.parent / "meta.json").exists()
    run(cfg_b)
    a = _tensors(tmp_path / "a" / "lift" / "default", "s0")
    b = _tensors(tmp_path / "b" / "lift" / "default", "s0")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_no_points_falls_back_with_warning(tmp_path):
    root = make_root(tmp_path, {"s0": False})
    extra = ("lift.steps=3", "lift.fallback_points=500", "lift.image_scale=0.5")
    with pytest.warns(UserWarning, match="no sparse points"):
        summary = run(_cfg(root, tmp_path / "out", *extra))
    assert summary["scenes"]["s0"]["status"] == "done"
    meta = load_lifted_scene(tmp_path / "out" / "lift" / "default" / "s0").meta
    assert meta["init"] == "random-frusta" and meta["num_init_points"] == 500
    # lifting at half size; stage 2 reads images at the scenes' resolution
    assert meta["resolution"] == 1.0 and meta["lift_resolution"] == 0.5


def test_bad_scenes_are_skipped_with_reason(tmp_path):
    root = make_root(tmp_path, {"s0": True})
    (root / "data" / "empty" / "dslr" / "nerfstudio").mkdir(parents=True)
    (root / "data" / "empty" / "dslr" / "nerfstudio" / "transforms_undistorted.json").write_text(
        json.dumps({"fl_x": 1, "fl_y": 1, "cx": 1, "cy": 1, "w": 2, "h": 2, "frames": []})
    )
    (root / "splits" / "nvs_sem_train.txt").write_text("missing\nempty\ns0\n")
    summary = run(_cfg(root, tmp_path / "out", "lift.steps=3"))
    scenes = summary["scenes"]
    assert scenes["s0"]["status"] == "done"
    assert scenes["missing"]["status"] == "skipped" and "not found" in scenes["missing"]["reason"]
    assert scenes["empty"]["status"] == "skipped" and "usable view" in scenes["empty"]["reason"]
    on_disk = json.loads((tmp_path / "out" / "lift" / "default" / "summary.json").read_text())
    assert on_disk["skipped"] == 2 and on_disk["done"] == 1


def test_nonfinite_loss_stops_scene_and_keeps_checkpoint(tmp_path, monkeypatch):
    root = make_root(tmp_path, {"s0": True})
    real = stage1_lift.loop.rgb_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 13 else loss

    monkeypatch.setattr(stage1_lift.loop, "rgb_loss", poisoned)
    summary = run(_cfg(root, tmp_path / "out"))
    status = summary["scenes"]["s0"]
    assert status["status"] == "failed" and "non-finite loss" in status["reason"]
    assert "step 12" in status["reason"]
    ckpt = tmp_path / "out" / "lift" / "default" / "s0" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 10


def test_shards_split_scenes_and_share_the_run_folder(tmp_path, monkeypatch):
    root = make_root(tmp_path, {"s0": True, "s1": True, "s2": True})
    cfg = _cfg(root, tmp_path / "out", "lift.steps=2")
    monkeypatch.setenv("SHARD", "1/2")
    summary = run(cfg)
    assert [s["status"] for s in summary["scenes"].values()] == ["pending", "done", "pending"]
    monkeypatch.setenv("SHARD", "0/2")
    summary = run(cfg)
    assert [s["status"] for s in summary["scenes"].values()] == ["done"] * 3
    monkeypatch.setenv("SHARD", "2/2")
    assert main(_argv(root, tmp_path / "out", "lift.steps=2")) == 2
