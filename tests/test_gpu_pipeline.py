"""GPU: stage 2 and the whole pipeline on CUDA (gsplat rendering, Lightning on `cuda`).

Marked `gpu` and skipped without CUDA; `make gpu-check` runs them (`pytest -m gpu`). The CPU
versions of these checks are tests/test_pipeline.py, test_finetune.py and test_stage2_data.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_demo import TINY_DEMO
from test_finetune import _record_gradients

import stage1_lift.__main__ as lift_main
import stage2_finetune.__main__ as finetune_main
from fit3d.cli import parse_cli
from fit3d.config import load_config
from fit3d.eval.__main__ import main as eval_main
from fit3d.scenes import generate_demo_set
from stage2_finetune.data import FinetuneDataModule, FinetuneDataset, read_lift_run
from stage2_finetune.synthetic import write_lift_run, write_scenes
from stage2_finetune.train import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """`<out>/scenes` with 3 scenes (4 train views each) and `<out>/lift/default` of them."""
    out = tmp_path_factory.mktemp("gpu_stage2")
    ids = ["s0", "s1", "s2"]
    write_scenes(out / "scenes", ids)
    write_lift_run(out / "lift" / "default", out / "scenes", ids)
    return out


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        f"run.out={out}",
        "run.device=cuda",
        "backbone.name=test_tiny",
        "finetune.devices=1",
        "finetune.corr_pairs=0",
        "finetune.pca_views=0",
        "finetune.lr=0.001",
        "finetune.max_steps=3",
        *extra,
    ]


def test_tiny_pipeline_on_cuda_through_the_entry_points(tmp_path):
    common = [
        f"run.out={tmp_path}",
        "run.device=cuda",
        "backbone.name=test_tiny",
        *TINY_DEMO,
        "lift.steps=30",
        "lift.checkpoint_every=10",
        "finetune.devices=1",
        "finetune.max_steps=3",
        "finetune.val_views=1",
        "finetune.corr_pairs=1",
        "eval.epochs=1",
        "eval.seeds=[0]",
        "eval.lrs=[0.01]",
        "eval.max_views=4",
        "eval.pairs_per_scene=2",
    ]
    generate_demo_set(parse_cli(["--preset", "demo", *common], "test", ""))
    assert lift_main.main(["--preset", "demo", *common]) == 0
    assert finetune_main.main(["--preset", "demo", *common]) == 0
    assert eval_main(["--preset", "demo", *common]) == 0
    scene_metas = [
        json.loads(p.read_text()) for p in (tmp_path / "lift/default").glob("*/meta.json")
    ]
    assert len(scene_metas) == 1 and scene_metas[0]["steps"] == 30
    ft = json.loads((tmp_path / "finetune" / "default" / "meta.json").read_text())
    assert ft["steps"] == 3 and ft["batch"]["global_batch"] == 2 and ft["world_size"] == 1
    assert all(v == v for v in ft["heldout"]["masked_l1"].values())  # finite, not NaN
    results = json.loads((tmp_path / "eval" / "default" / "results.json").read_text())
    for feature_set in ("original", "fine-tuned", "assembled", "control"):
        assert feature_set in json.dumps(results)


def test_targets_rendered_by_gsplat_match_the_cpu_renderer(fake):
    lift = read_lift_run(fake / "lift" / "default")
    cpu = FinetuneDataModule(lift, lambda h, w: (h // 14, w // 14)).train_dataset()
    gpu = FinetuneDataset(cpu.run, cpu.scenes, cpu.pairs, cpu.grids, 1, "cuda")
    for i in range(len(cpu)):
        t_cpu, m_cpu = cpu.render(i)
        t_gpu, m_gpu = gpu.render(i)
        assert t_gpu.is_cuda
        scale = float(t_cpu.abs().max())
        assert torch.allclose(t_gpu.cpu(), t_cpu, rtol=0, atol=1e-4 * scale), i
        assert torch.allclose(m_gpu.cpu(), m_cpu)


def test_accumulated_step_on_cuda_equals_the_one_pass_step(fake, monkeypatch):
    grads = _record_gradients(monkeypatch)
    run(load_config([], _argv(fake, "run.name=one", "finetune.grad_clip=0")))
    one = grads[:]
    grads.clear()
    two = run(load_config([], _argv(fake, "run.name=two", "finetune.grad_clip=0",
                                    "finetune.device_batch=1")))  # fmt: skip
    assert two["batch"]["accumulation"] == 2 and len(one) == len(grads) == 3
    for a, b in zip(one, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * float(a.abs().max()))


def test_loader_workers_on_cuda_read_targets_rendered_by_the_main_process(fake):
    """Workers never touch CUDA: training targets come from the store, validation renders on CPU."""
    argv = ("run.name=workers", "finetune.num_workers=1", "finetune.val_views=1")
    meta = run(load_config([], _argv(fake, *argv, "finetune.max_steps=-1")))  # whole epoch
    assert meta["steps"] == 6 and meta["losses"]["val"] > 0  # validation ran, in the workers


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_clips_the_unscaled_gradient(fake, monkeypatch, precision):
    """The clip acts on the true (unscaled) gradient: the step sees norm 0.1, not 0.1 / scale."""
    grads = _record_gradients(monkeypatch)
    name = precision.replace("-", "_")
    meta = run(load_config([], _argv(fake, f"run.name={name}", f"finetune.precision={precision}")))
    assert meta["steps"] == 3 and meta["losses"]["train_last_epoch"] > 0
    norms = [float(g.float().norm()) for g in grads]
    assert norms and max(norms) == pytest.approx(0.1, rel=1e-3)
    assert all(n <= 0.1 * (1 + 1e-3) for n in norms)


def test_depth_rendered_by_gsplat_matches_the_cpu_renderer(fake):
    """The equivariance objective's depth (expected depth, 1/4 resolution) on CUDA."""
    lift = read_lift_run(fake / "lift" / "default")
    cpu = FinetuneDataModule(lift, lambda h, w: (h // 14, w // 14)).train_dataset()
    gpu = FinetuneDataset(cpu.run, cpu.scenes, cpu.pairs, cpu.grids, 1, "cuda")
    for i in range(len(cpu)):
        d_cpu, d_gpu = cpu.render_depth(i), gpu.render_depth(i)
        assert d_gpu.is_cuda and d_gpu.shape == d_cpu.shape
        both = (d_cpu > 0) & (d_gpu.cpu() > 0)
        assert both.float().mean() > 0.9 * (d_cpu > 0).float().mean(), i
        assert torch.allclose(d_gpu.cpu()[both], d_cpu[both], rtol=1e-3), i


def test_equivariance_objective_with_lora_on_cuda(fake):
    meta = run(load_config([], _argv(
        fake, "run.name=equiv_lora", "finetune.objective=fit3d+equivariance",
        "finetune.adapter=lora", "finetune.equiv_points=16",
    )))  # fmt: skip
    assert meta["steps"] == 3 and meta["adapter"] == "lora"
    assert 0 < meta["trainable_params"] < 1e5 and meta["losses"]["train_last_epoch"] > 0
