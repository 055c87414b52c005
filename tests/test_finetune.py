"""Stage 2: targets, loss, sampling, data module and whole runs on tiny fake stage-1 runs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fit3d.backbones import Backbone
from fit3d.config import load_config
from fit3d.errors import UserError
from fit3d.gaussians import save_lifted_scene
from fit3d.losses import masked_l1
from fit3d.render import rasterization
from fit3d.scenes.scannetpp import viewmat_to_nerfstudio
from fit3d.targets import decode_to_tokens, mask_to_tokens, resample_taps
from stage2_finetune.__main__ import main
from stage2_finetune.data import (
    EpochSampler,
    FinetuneDataModule,
    LiftedCache,
    read_lift_run,
)
from stage2_finetune.heldout import _pair_cosines
from stage2_finetune.train import run

W, H, FOCAL = 70, 56, 60.0
TINY = dict(embed_dim=48, depth=2, num_heads=3, img_size=224)  # test_tiny's timm kwargs


# --- fakes: a ScanNet++-layout scene set and a stage-1 run following the contract ------------
def _viewmat(k: int) -> np.ndarray:
    """World-to-camera of view k: identity rotation, camera moving along x."""
    vm = np.eye(4)
    vm[0, 3] = -0.1 * k
    return vm


def write_scenes(root: Path, ids: list[str], n_views: int = 6, test_every: int = 3) -> Path:
    """Minimal ScanNet++ DSLR scenes: random images, masks with an invalid strip, poses."""
    rng = np.random.default_rng(0)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "nvs_sem_train.txt").write_text("\n".join(ids) + "\n")
    (root / "splits" / "nvs_sem_val.txt").write_text(ids[-1] + "\n")
    for sid in ids:
        dslr = root / "data" / sid / "dslr"
        for d in ("undistorted_images", "undistorted_anon_masks", "nerfstudio"):
            (dslr / d).mkdir(parents=True, exist_ok=True)
        frames, train, test = [], [], []
        for k in range(n_views):
            name = f"DSC{k:04d}.JPG"
            img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(dslr / "undistorted_images" / name), img)
            mask = np.full((H, W), 255, np.uint8)
            mask[:, : 5 + k] = 0
            cv2.imwrite(str(dslr / "undistorted_anon_masks" / f"DSC{k:04d}.png"), mask)
            c2w = viewmat_to_nerfstudio(_viewmat(k))
            frames.append(
                {
                    "file_path": name,
                    "transform_matrix": c2w.tolist(),
                    "mask_path": f"DSC{k:04d}.png",
                }
            )
            (test if k % test_every == test_every - 1 else train).append(name)
        meta = {"fl_x": FOCAL, "fl_y": FOCAL, "cx": W / 2, "cy": H / 2, "w": W, "h": H}
        meta["frames"] = frames
        (dslr / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
        (dslr / "train_test_lists.json").write_text(json.dumps({"train": train, "test": test}))
    return root


def write_lift_run(
    run_dir: Path, scenes_root: Path, ids: list[str], C: int = 48, D: int = 8, N: int = 300
) -> Path:
    """A stage-1 run folder per the contract: random Gaussians in front of the cameras."""
    g = torch.Generator().manual_seed(1)
    for i, sid in enumerate(ids):
        means = torch.rand(N, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) + torch.tensor(
            [-1.2, -1.0, 2.0]
        )
        gaussians = {
            "means": means,
            "quats": F.normalize(torch.randn(N, 4, generator=g), dim=1),
            "scales": torch.rand(N, 3, generator=g) * 0.08 + 0.02,
            "opacities": torch.rand(N, generator=g) * 0.5 + 0.4,
            "sh": torch.randn(N, 16, 3, generator=g) * 0.1,
            "features": torch.randn(N, D, generator=g),
        }
        decoder = torch.randn(C, D, 3, 3, generator=g) * 0.1
        meta = {
            "scene_id": sid,
            "scenes_root": str(scenes_root),
            "resolution": 1.0,
            "backbone": "test_tiny",
            "timm_name": "vit_small_patch14_dinov2",
            "embed_dim": C,
            "feature_dim": D,
            "sh_degree": 3,
            "weights": {"source": "random", "path": "", "sha256": ""},
            "steps": 1,
            "num_gaussians": N,
            "seconds": 0.0,
            "git_commit": "test",
            "metrics": {"psnr": 0.0, "feat_l1": 0.0, "feat_cos": 0.0},
            "index": i,
        }
        save_lifted_scene(run_dir / sid, gaussians, decoder, meta)
    return run_dir


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """`<out>/scenes` with 3 scenes and `<out>/lift/default` lifting all of them."""
    out = tmp_path_factory.mktemp("finetune")
    ids = ["s0", "s1", "s2"]
    write_scenes(out / "scenes", ids)
    write_lift_run(out / "lift" / "default", out / "scenes", ids)
    return out


def tiny_argv(out: Path, *extra: str) -> list[str]:
    return [
        f"run.out={out}",
        "run.device=cpu",
        "backbone.name=test_tiny",
        "finetune.batch_size=2",
        "finetune.corr_pairs=0",
        "finetune.pca_views=1",
        "finetune.lr=0.001",
        "finetune.log_every=1",
        *extra,
    ]


# --- targets and loss -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size", [(56, 70, 4, 5), (224, 336, 16, 24), (31, 17, 40, 3), (5, 7, 1, 1)]
)
def test_decode_to_tokens_matches_conv_then_bilinear_in_float64(size):
    Hs, Ws, h, w = size
    render = torch.randn(2, 6, Hs, Ws, dtype=torch.float64)
    weight = torch.randn(10, 6, 3, 3, dtype=torch.float64)
    ref = F.interpolate(
        F.conv2d(render, weight, padding=1), size=(h, w), mode="bilinear", align_corners=False
    )
    out = decode_to_tokens(render.float(), weight.float(), (h, w))
    assert out.shape == (2, 10, h, w)
    assert torch.allclose(out.double(), ref, atol=1e-4 * ref.abs().max())


def test_bilinear_downsampling_commutes_with_flip():
    """Flipping the target at the token grid == flipping the image-resolution map (FiT3D)."""
    x = torch.randn(1, 3, 56, 70, dtype=torch.float64)
    down = F.interpolate(x, size=(4, 5), mode="bilinear", align_corners=False)
    down_of_flip = F.interpolate(x.flip(-1), size=(4, 5), mode="bilinear", align_corners=False)
    assert torch.allclose(down.flip(-1), down_of_flip)
    idx, wt = resample_taps(56, 4)  # 14x: samples halfway between pixels 14i+6 and 14i+7
    assert idx.sort(1).values.tolist() == [[14 * i + 6, 14 * i + 7] for i in range(4)]
    assert torch.allclose(wt, torch.full((4, 2), 0.5))


def test_mask_to_tokens_hand_computed():
    rows = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0])[:, None].expand(8, 2)  # H=8 -> h=4
    out = mask_to_tokens(rows[None].bool(), (4, 1))[0, :, 0]
    assert out.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_masked_l1_hand_computed():
    out = torch.zeros(1, 2, 1, 2)
    tgt = torch.tensor([[[[1.0, 3.0]], [[2.0, 5.0]]]])  # |diff| per pixel: (1,2), (3,5)
    mask = torch.tensor([[[1.0, 0.5]]])
    # sum = 1*1 + 2*1 + 3*0.5 + 5*0.5 = 7; sum(m) * C = 1.5 * 2 = 3
    assert masked_l1(out, tgt, mask).item() == pytest.approx(7 / 3)


# --- sampling ---------------------------------------------------------------------------------
def test_sampler_ranks_disjoint_grouped_deterministic_and_resumable():
    pair_scene = [s for s in range(5) for _ in range(7)]  # 5 scenes x 7 views
    ranks = [EpochSampler(pair_scene, group=2, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    keys = [list(s) for s in ranks]
    assert len(keys[0]) == len(keys[1]) == len(pair_scene) // 2 == len(ranks[0])
    assert not {i for i, _ in keys[0]} & {i for i, _ in keys[1]}
    assert list(ranks[0]) == keys[0]  # deterministic
    flips = [f for k in keys for _, f in k]
    assert 0.2 < sum(flips) / len(flips) < 0.8
    # the common order visits scenes in groups of <= 2: each scene's samples are contiguous
    # within its group, so a cache of 2 scenes loads each scene once per epoch
    idx, _ = EpochSampler(pair_scene, group=2, seed=3).order()
    scenes = [pair_scene[i] for i in idx.tolist()]
    blocks = [set(scenes[a : a + 14]) for a in (0, 14)] + [set(scenes[28:])]
    assert all(len(b) <= 2 for b in blocks) and set().union(*blocks) == set(range(5))
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != keys[0]
    full = list(ranks[0])
    ranks[0].skip_once(1, 5)
    assert list(ranks[0]) == full[5:]
    assert list(ranks[0]) == full  # the skip applies once


# --- data -------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[int, int]:
    return h // 14, w // 14


def test_lifted_cache_memory_is_bounded_by_its_size(fake):
    run = read_lift_run(fake / "lift" / "default")
    cache = LiftedCache(run.path, size=2)
    for sid in ["s0", "s1", "s2", "s0", "s0", "s1"]:
        assert cache.get(sid).meta["scene_id"] == sid
        assert len(cache) <= 2
    assert cache.loads == 5  # s0, s1, s2, s0 (evicted by s2), s1 (evicted by s0)


def test_one_epoch_loads_each_scene_once_with_grouped_sampling(fake):
    data = FinetuneDataModule(read_lift_run(fake / "lift" / "default"), _grid, cache_size=1)
    loader = data.train_dataloader()
    for _ in loader:
        pass
    assert loader.dataset.cache.loads == 3
    assert len(loader.dataset.cache) == 1


def test_item_target_is_rendered_decoded_downsampled_and_flips_jointly(fake):
    run = read_lift_run(fake / "lift" / "default")
    data = FinetuneDataModule(run, _grid)
    ds = data.train_dataset()
    si, view = data.train_pairs[4]
    item, flipped = ds[(4, False)], ds[(4, True)]
    # independent reference: rasterise, full-resolution conv, bilinear (float64)
    scene = data.scenes[si]
    lifted = ds.cache.get(scene.scene_id)
    g = lifted.gaussians
    render, _, _ = rasterization(
        g["means"], g["quats"], g["scales"], g["opacities"], g["features"],
        scene.viewmat(view)[None], scene.K(view)[None], W, H,
    )  # fmt: skip
    ref = F.interpolate(
        F.conv2d(render.permute(0, 3, 1, 2).double(), lifted.decoder.weight.double(), padding=1),
        size=(4, 5),
        mode="bilinear",
        align_corners=False,
    )[0]
    assert item["target"].shape == (48, 4, 5)
    assert torch.allclose(item["target"].double(), ref, atol=1e-5)
    assert item["target"].abs().max() > 0.1  # the fake Gaussians are visible
    image = torch.from_numpy(
        cv2.cvtColor(cv2.imread(str(scene.dslr_dir / "undistorted_images" / f"DSC{view:04d}.JPG")),
                     cv2.COLOR_BGR2RGB)
    ).permute(2, 0, 1).float() / 255  # fmt: skip
    assert torch.allclose(item["image"], image)
    # mask: columns < 5 + view are anonymised; token column 0 averages pixel columns 6 and 7
    assert (
        item["mask"][:, 0].tolist() == [float(view + 5 <= 6) * 0.5 + float(view + 5 <= 7) * 0.5] * 4
    )
    assert item["key"].tolist() == [si, view, 0] and flipped["key"].tolist() == [si, view, 1]
    for k in ("image", "target", "mask"):
        assert torch.equal(flipped[k], item[k].flip(-1))


def test_train_views_only_and_validation_on_held_out_views(fake):
    data = FinetuneDataModule(read_lift_run(fake / "lift" / "default"), _grid, val_views=0)
    assert all(v % 3 != 2 for _, v in data.train_pairs) and len(data.train_pairs) == 12
    assert sorted(data.val_pairs) == [(s, v) for s in range(3) for v in (2, 5)]


# --- bad input --------------------------------------------------------------------------------
def test_bad_lift_runs_are_one_line_errors_before_training(fake, tmp_path, capsys):
    assert main(tiny_argv(fake, "finetune.lift_run=nope")) == 2
    assert "not found" in capsys.readouterr().err
    (fake / "lift" / "empty").mkdir(exist_ok=True)
    assert main(tiny_argv(fake, "finetune.lift_run=empty")) == 2
    err = capsys.readouterr().err
    assert "no finished scene" in err and err.count("\n") == 1
    write_lift_run(tmp_path / "lift" / "wide", fake / "scenes", ["s0"], C=64)
    assert main(tiny_argv(tmp_path, "finetune.lift_run=wide")) == 2
    err = capsys.readouterr().err
    assert "width 64" in err and "width 48" in err and err.count("\n") == 1
    assert not (tmp_path / "finetune").exists()


# --- whole runs -------------------------------------------------------------------------------
def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "finetune" / name / "backbone.safetensors"))


def test_run_writes_outputs_loadable_by_timm_and_backbone(fake, tmp_path):
    # FiT3D's released checkpoints are plain timm state dicts saved with torch.save
    base = Backbone("test_tiny")
    fit3d_style = tmp_path / "fit3d_finetuned.pth"
    torch.save(base.model.state_dict(), fit3d_style)
    argv = tiny_argv(
        fake, "run.name=full", "finetune.max_steps=3", f"backbone.weights={fit3d_style}"
    )
    assert main(argv) == 0
    out = fake / "finetune" / "full"
    for f in (
        "config.yaml",
        "meta.json",
        "pca.png",
        "checkpoints/last.ckpt",
        "logs/version_0/metrics.csv",
    ):
        assert (out / f).is_file(), f
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 3 and meta["timm_name"] == "vit_small_patch14_dinov2"
    assert meta["base_weights"]["path"] == str(fit3d_style)
    assert meta["losses"]["train_last_epoch"] > 0
    l1 = meta["heldout"]["masked_l1"]
    assert l1["views"] == 6 and l1["original"] > 0 and l1["finetuned"] > 0
    sd = _weights(fake, "full")
    assert any(not torch.equal(sd[k], v) for k, v in base.model.state_dict().items())
    path = str(out / "backbone.safetensors")
    plain = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        num_classes=0,
        dynamic_img_size=True,
        **TINY,
    )
    ours = Backbone("test_tiny", weights=path)
    for k, v in sd.items():
        assert torch.equal(plain.state_dict()[k], v) and torch.equal(ours.model.state_dict()[k], v)
    x = torch.rand(1, 3, H, W)
    assert ours(ours.preprocess(x)).shape == (1, 48, *ours.token_grid(H, W))


def test_resume_from_checkpoint_equals_uninterrupted_run(fake):
    common = ("finetune.epochs=2", "finetune.checkpoint_every=1", "finetune.pca_views=0")
    # 12 train views, batch 2 -> 6 steps per epoch; stop mid-epoch 0, resume across the boundary
    run(load_config([], tiny_argv(fake, "run.name=straight", "finetune.max_steps=8", *common)))
    run(load_config([], tiny_argv(fake, "run.name=resumed", "finetune.max_steps=4", *common)))
    meta = run(
        load_config(
            [],
            tiny_argv(
                fake, "run.name=resumed", "finetune.max_steps=8", "finetune.resume=true", *common
            ),
        )
    )
    assert meta["steps"] == 8
    a, b = _weights(fake, "straight"), _weights(fake, "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trainer_uses_reference_optimiser_and_clipping(fake):
    from stage2_finetune.module import FinetuneModule
    from stage2_finetune.train import make_trainer

    cfg = load_config([], tiny_argv(fake))
    trainer = make_trainer(cfg, fake / "finetune" / "cfgcheck", [])
    assert trainer.gradient_clip_val == 0.1 and trainer.gradient_clip_algorithm == "norm"
    opt = FinetuneModule(Backbone("test_tiny")).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 1e-5 and opt.defaults["weight_decay"] == 1e-4
    n_params = sum(p.numel() for p in Backbone("test_tiny").parameters())
    assert sum(p.numel() for grp in opt.param_groups for p in grp["params"]) == n_params


# --- held-out correspondence check ------------------------------------------------------------
def test_pair_cosines_follow_ground_truth_reprojection(fake):
    """Plane at depth 2, cameras 0.1 m apart along x: features that are a function of the world
    x coordinate agree (cosine 1) exactly where the reprojection is right."""
    from fit3d.scenes import open_scene

    scene = open_scene(fake / "scenes", "s0")
    depth = torch.full((H, W), 2.0)
    h, w = 8, 10
    xs = (torch.arange(w) + 0.5) * W / w - 0.5  # token-centre pixel columns

    def feats(view: int) -> torch.Tensor:
        world_x = (xs - W / 2) * 2.0 / FOCAL + 0.1 * view  # camera k sits at x = 0.1 k
        angle = world_x * 3.0
        f = torch.stack([angle.cos(), angle.sin()])  # [2, w]
        return f[:, None, :].expand(2, h, w).contiguous()

    cos = _pair_cosines(feats(0), feats(1), H // h, scene, 0, 1, depth, depth)
    assert len(cos) > 0.5 * h * w
    # exact except the first column, whose reprojection lies left of every token centre in view 1
    assert cos.median() > 0.999 and (cos > 0.99).float().mean() > 0.85 and cos.min() > 0.95
    wrong = _pair_cosines(feats(0), feats(3), H // h, scene, 0, 1, depth, depth)
    assert wrong.mean() < 0.9


def test_loader_workers_render_the_same_batches(fake):
    run_ = read_lift_run(fake / "lift" / "default")
    serial = list(FinetuneDataModule(run_, _grid).train_dataloader())
    parallel = list(FinetuneDataModule(run_, _grid, num_workers=1).train_dataloader())
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_wandb_never_prompts(fake, monkeypatch, tmp_path):
    """No WANDB_MODE and no credentials -> offline; an explicit WANDB_MODE is honoured."""
    from stage2_finetune.train import _loggers

    cfg = load_config([], tiny_argv(fake, "run.logger=wandb"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    csv, wandb = _loggers(cfg, tmp_path)
    assert wandb._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _loggers(cfg, tmp_path)[1]._wandb_init["mode"] == "disabled"
    assert len(_loggers(load_config([], tiny_argv(fake)), tmp_path)) == 1  # csv only by default


def test_rerun_skips_finished_run_and_refuses_other_settings(fake):
    argv = ("run.name=rerun", "finetune.max_steps=2", "finetune.pca_views=0")
    first = run(load_config([], tiny_argv(fake, *argv)))
    stamp = (fake / "finetune" / "rerun" / "backbone.safetensors").stat().st_mtime_ns
    again = run(load_config([], tiny_argv(fake, *argv)))
    assert again == json.loads(json.dumps(first))  # the finished run's meta, nothing retrained
    assert (fake / "finetune" / "rerun" / "backbone.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="different settings"):
        run(load_config([], tiny_argv(fake, *argv, "finetune.lr=0.01")))
