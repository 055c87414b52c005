"""Stage 2: targets, loss, the global batch, optimiser and whole runs on tiny fake stage-1 runs
(sampling and the data module: tests/test_stage2_data.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from fit3d.backbones import Backbone
from fit3d.config import load_config
from fit3d.errors import UserError
from fit3d.losses import masked_l1
from fit3d.targets import decode_to_tokens, mask_to_tokens, resample_taps
from stage2_finetune.__main__ import main
from stage2_finetune.heldout import _pair_cosines
from stage2_finetune.synthetic import FOCAL, HEIGHT, WIDTH, write_lift_run, write_scenes
from stage2_finetune.train import run

TINY = dict(embed_dim=48, depth=2, num_heads=3, img_size=224)  # test_tiny's timm kwargs
W, H = WIDTH, HEIGHT


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
    assert meta["batch"] == {
        "global_batch": 2, "devices": 1, "device_batch": 2, "accumulation": 1, "per_device": 2
    }  # fmt: skip
    assert meta["optimizer"] == {"lr": 0.001, "weight_decay": 1e-4, "grad_clip": 0.1}
    assert not (out / "targets").exists()  # rendered targets are removed after training
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


def test_auto_precision_is_bf16_mixed_where_native_and_recorded(fake, monkeypatch):
    """`finetune.precision=auto`: bf16-mixed on a device with native bf16 (32-true elsewhere),
    written into config.yaml and meta.json; both train to a finite loss and finite weights."""
    from fit3d import runs

    for native, want in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(runs, "native_bf16", lambda device, v=native: v)
        name = f"auto_{want}"
        argv = tiny_argv(
            fake, f"run.name={name}", "finetune.max_steps=2", "finetune.precision=auto"
        )
        assert main(argv) == 0
        out = fake / "finetune" / name
        meta = json.loads((out / "meta.json").read_text())
        assert meta["config"]["finetune"]["precision"] == want and meta["steps"] == 2
        assert f"precision: {want}" in (out / "config.yaml").read_text()
        assert math.isfinite(meta["losses"]["train_last_epoch"])
        weights = Backbone("test_tiny", str(out / "backbone.safetensors")).model.state_dict()
        assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_from_checkpoint_equals_uninterrupted_run(fake):
    common = ("finetune.epochs=2", "finetune.checkpoint_every=1", "finetune.pca_views=0")
    common += ("finetune.target_window=5",)
    # 12 train views, batch 2 -> 6 steps per epoch; stop mid-epoch 0 (and mid target window),
    # resume across the epoch boundary
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


def test_optimiser_is_adamw_over_every_parameter_with_the_paper_settings():
    from stage2_finetune.module import FinetuneModule

    module = FinetuneModule(Backbone("test_tiny"))
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and module.grad_clip == 0.1
    assert opt.defaults["lr"] == 1e-5 and opt.defaults["weight_decay"] == 1e-4
    n_params = sum(p.numel() for p in Backbone("test_tiny").parameters())
    assert sum(p.numel() for grp in opt.param_groups for p in grp["params"]) == n_params


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _record_gradients(monkeypatch) -> list[torch.Tensor]:
    """Patch AdamW.step to record the flat gradient each step applies (after clipping)."""
    grads: list[torch.Tensor] = []
    original = torch.optim.AdamW.step

    def step(self, closure=None):
        if closure is not None:  # Lightning's closure runs the hooks (and the clipping)
            closure()
        grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
        return original(self)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return grads


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_norm_is_clipped_to_0_1_before_every_step(fake, monkeypatch, precision):
    """Also under bf16-mixed with the fused AdamW (Lightning's own clip refuses that pair)."""
    import lightning as L

    raw = []

    class Raw(L.Callback):  # callbacks see the gradient before the module clips it
        def on_before_optimizer_step(self, trainer, module, optimizer):
            raw.append(_grad_norm(p for g in optimizer.param_groups for p in g["params"]))

    grads = _record_gradients(monkeypatch)
    argv = (f"run.name=clip_{precision}", "finetune.max_steps=3", "finetune.pca_views=0",
            f"finetune.precision={precision}")  # fmt: skip
    meta = run(load_config([], tiny_argv(fake, *argv)), callbacks=[Raw()])
    assert meta["steps"] == len(grads) == len(raw) == 3
    assert min(raw) > 0.2  # the raw gradient norm is well above the clip
    assert [float(g.norm()) for g in grads] == pytest.approx([0.1] * 3, rel=1e-5)


def test_gradient_accumulation_gives_the_one_pass_step(fake, monkeypatch):
    """finetune.device_batch=1: two forward/backward passes per step of global batch 2; the loss is
    normalised over the whole global batch, so every step's gradient is the one-pass run's."""
    argv = ("finetune.max_steps=3", "finetune.pca_views=0", "finetune.grad_clip=0")
    grads = _record_gradients(monkeypatch)
    one = run(load_config([], tiny_argv(fake, "run.name=pass1", *argv)))
    one_grads = grads[:]
    grads.clear()
    two = run(load_config([], tiny_argv(fake, "run.name=pass2", "finetune.device_batch=1", *argv)))
    assert two["batch"]["accumulation"] == 2 and two["batch"]["device_batch"] == 1
    assert one["steps"] == two["steps"] == len(one_grads) == len(grads) == 3
    assert two["losses"]["train_last_epoch"] == pytest.approx(one["losses"]["train_last_epoch"])
    for g1, g2 in zip(one_grads, grads, strict=True):
        # float summation order only: ~1e-8 of the norm here (a lost half-batch or a missing
        # 1/2 would be 0.5 or more); elementwise, small components get an absolute floor
        assert float((g1 - g2).norm() / g1.norm()) < 1e-5
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5 * float(g1.abs().max()))
    a, b = _weights(fake, "pass1"), _weights(fake, "pass2")
    assert_adam_weights_agree(torch.cat([v.flatten() for v in a.values()]),
                              torch.cat([b[k].flatten() for k in a]), lr=1e-3, steps=3)  # fmt: skip


def assert_adam_weights_agree(a: torch.Tensor, b: torch.Tensor, lr: float, steps: int) -> None:
    """Weights after equal gradients up to rounding: Adam divides by the gradient's running RMS,
    so a component whose gradient is ~0 can move either way by up to ~3.2 lr per step (the bound
    of |m/sqrt(v)| for beta1 0.9, beta2 0.999); all the others agree."""
    diff = (a - b).abs()
    assert float(diff.max()) <= 2 * 3.2 * lr * steps
    assert int((diff > 1e-5).sum()) <= max(1, a.numel() // 10_000)


def test_batch_plan_splits_the_global_batch_or_names_the_choices():
    from stage2_finetune.train import BatchPlan, batch_plan

    assert batch_plan(2, 0, 1) == BatchPlan(2, 1, 2, 1)
    assert batch_plan(2, 0, 2) == BatchPlan(2, 2, 1, 1)
    plan = batch_plan(16, 4, 2)
    assert (plan.device_batch, plan.accumulation, plan.per_device) == (4, 2, 8)
    with pytest.raises(UserError) as e:
        batch_plan(2, 0, 8)
    msg = str(e.value)
    assert "more devices (8) than samples per step (2)" in msg and "\n" not in msg
    assert "multiple of 8" in msg and "use 1 or 2 devices" in msg
    with pytest.raises(UserError, match="do not split evenly over 4 devices.*use 1 or 2 or 3 dev"):
        batch_plan(6, 0, 4)
    with pytest.raises(UserError, match=r"device_batch=3 .* one of \[1, 2, 4\]"):
        batch_plan(4, 3, 1)


def test_more_devices_than_the_global_batch_stops_before_training(fake, tmp_path, capsys):
    argv = tiny_argv(fake, f"run.out={tmp_path}", "finetune.devices=4", "finetune.strategy=ddp")
    (tmp_path / "lift").symlink_to(fake / "lift")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finetune.batch_size=2" in err and "1 or 2 devices" in err
    assert not (tmp_path / "finetune").exists()


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


def test_correspondence_cosine_runs_each_view_once_per_model(tmp_path):
    """Every view in the selected pairs goes through each backbone once (not once per pair);
    two copies of one model score the same; the figures are means over the pairs."""
    from fit3d.backbones import Backbone
    from fit3d.cli import parse_cli
    from fit3d.scenes import generate_demo_set, list_scenes, open_scene
    from stage2_finetune.heldout import correspondence_cosine

    demo = [f"run.out={tmp_path}", "scenes.demo_train=2", "scenes.demo_val=0"]
    demo += ["scenes.demo_views=5", "scenes.demo_width=112", "scenes.demo_height=84"]
    root = generate_demo_set(parse_cli(["--preset", "demo", *demo], "test", ""))

    torch.manual_seed(0)
    a = Backbone("test_tiny")
    b = Backbone("test_tiny")
    b.load_state_dict(a.state_dict())
    calls: list[int] = []
    for m in (a, b):
        m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    scenes = [open_scene(root, s) for s in list_scenes(root, "nvs_sem_train")]
    out = correspondence_cosine({"a": a, "b": b}, scenes, 4, seed=0)
    assert out is not None and out["matches"] > 0
    assert out["a"] == out["b"]
    assert 0 < out["a"]["match"] <= 1 and -1 <= out["a"]["any"] <= 1
    views = sum(len(s) for s in scenes)
    assert sum(calls) <= 2 * views  # at most one forward per view and model
    assert sum(calls) < 2 * 2 * 4 * len(scenes)  # fewer than two per pair and model


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
