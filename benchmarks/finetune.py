"""Fine-tuning step overhead: our full Lightning training step vs a bare timm forward+backward.

Ours = what `python -m stage2_finetune` runs per step: sample 2 (scene, view) pairs, render their
features from the frozen Gaussians, decode at the token grid, forward, masked L1, backward,
gradient clipping, AdamW step. Bare = a plain timm forward + backward of the same
architecture on the same preprocessed batch (no data, no optimiser). Both run in this process,
alternating one step of each, so machine load affects them alike; medians after 2 warm-up steps.
`--bf16` uses bf16 autocast for both (`finetune.precision=bf16-mixed` for ours). Weights are
random (speed does not depend on them).

Targets come from the stage-1 run `outputs/lift/<finetune.lift_run>` when it exists; otherwise
from synthetic lifted scenes written to a temp folder: the config's train scenes with one
Gaussian per sparse point (scale = mean distance to 3 nearest neighbours), random features and
decoder (stage 1's initial state, before densification).

    python benchmarks/finetune.py [--preset demo] [--steps 8] [--bf16] [key=value ...]

Prints a table and writes outputs/bench/finetune.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.backbones import Backbone  # noqa: E402
from fit3d.config import Config, load_config  # noqa: E402
from fit3d.gaussians import save_lifted_scene  # noqa: E402
from fit3d.io import write_json  # noqa: E402
from fit3d.runs import benchmark_output, run_dir  # noqa: E402
from fit3d.scenes import open_scene, resolve_scenes  # noqa: E402
from stage2_finetune.data import FinetuneDataModule, read_lift_run  # noqa: E402
from stage2_finetune.module import FinetuneModule  # noqa: E402
from stage2_finetune.train import batch_plan, make_trainer  # noqa: E402


class Interleaved(L.Callback):
    """Times our Lightning steps and, after each, one bare step on the same batch.

    Ours = time from the end of the previous bare step to the end of this training batch (data,
    render, forward, backward, clipping, optimiser, hooks); the bare step runs inside
    `on_train_batch_end`, so the two alternate step by step under the same machine load.
    """

    def __init__(self, bare: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
        self.bare, self.x, self.bf16 = bare, x, bf16
        self.ours: list[float] = []
        self.bare_times: list[float] = []
        self._resume = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._resume = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ours.append(time.perf_counter() - self._resume)
        self.bare_times.append(bare_step_seconds(self.bare, self.x, self.bf16))
        self._resume = time.perf_counter()


def synthetic_lift_run(cfg: Config, out: Path, embed_dim: int, feature_dim: int = 64) -> Path:
    """Lifted scenes at stage 1's initial state for the config's train scenes."""
    root, ids, resolution = resolve_scenes(cfg, "train")
    g = torch.Generator().manual_seed(0)
    for sid in ids:
        xyz, rgb = open_scene(root, sid, resolution).points()  # [N, 3] each
        dist, _ = cKDTree(xyz.numpy()).query(xyz.numpy(), k=4)
        scale = torch.from_numpy(dist[:, 1:].mean(1)).float().clamp_min(1e-4)
        n = len(xyz)
        gaussians = {
            "means": xyz,
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "scales": scale[:, None].repeat(1, 3),
            "opacities": torch.full((n,), 0.1),
            "sh": torch.cat([(rgb[:, None] - 0.5) / 0.28209479, torch.zeros(n, 15, 3)], 1),
            "features": torch.randn(n, feature_dim, generator=g),
        }
        decoder = torch.randn(embed_dim, feature_dim, 3, 3, generator=g) * 0.05
        meta = {"scene_id": sid, "scenes_root": str(root), "resolution": resolution}
        meta |= {"backbone": cfg.backbone.name, "embed_dim": embed_dim, "feature_dim": feature_dim}
        save_lifted_scene(out / sid, gaussians, decoder, meta)
    return out


def bare_step_seconds(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    """One bare timm forward (pooled, no head) + backward on a preprocessed x [B, 3, H', W']."""
    t = time.perf_counter()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().abs().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", default=[])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    parser.add_argument("--out", default=str(benchmark_output("finetune")))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset or ["demo"], args.overrides)
    warmup = 2
    torch.manual_seed(0)
    backbone = Backbone(cfg.backbone.name, "random")
    tmp = Path(tempfile.mkdtemp(prefix="fit3d-bench-"))
    lift_run = run_dir(cfg, "lift", cfg.finetune.lift_run)
    source = "stage-1 run"
    if not lift_run.is_dir():
        lift_run, source = synthetic_lift_run(cfg, tmp / "lift", backbone.embed_dim), "synthetic"
    lift = read_lift_run(lift_run)
    lift.check_width(backbone.embed_dim)
    n_gauss = [int(m.get("num_gaussians", 0)) for m in lift.metas]
    f = dataclasses.replace(
        cfg.finetune,
        max_steps=warmup + args.steps,
        checkpoint_every=10**9,
        log_every=10**9,
        precision="bf16-mixed" if args.bf16 else cfg.finetune.precision,
    )
    cfg = dataclasses.replace(cfg, finetune=f)
    trainer = make_trainer(cfg, tmp / "finetune", [])  # only to know the device count
    plan = batch_plan(f.batch_size, f.device_batch, trainer.num_devices * trainer.num_nodes)
    # a window of one batch renders each step's own targets in that step, so every timed step
    # carries its rendering (training renders the same views, a window at a time)
    data = FinetuneDataModule(
        lift, backbone.token_grid, plan.per_device, f.num_workers, window=plan.per_device
    )
    batch = next(iter(data.train_dataloader()))
    data.teardown("fit")
    bare = copy.deepcopy(backbone.model).train()
    timer = Interleaved(bare, backbone.preprocess(batch["image"]), args.bf16)
    trainer = make_trainer(cfg, tmp / "finetune", [timer])
    module = FinetuneModule(backbone, f.lr, f.weight_decay, f.grad_clip, plan.device_batch)
    trainer.fit(module, datamodule=data)
    ours, bare_times = timer.ours[warmup:], timer.bare_times[warmup:]
    med_bare, med_ours = statistics.median(bare_times), statistics.median(ours)
    ratios = [o / b for o, b in zip(ours, bare_times, strict=True)]
    result = {
        "backbone": cfg.backbone.name,
        "batch": list(batch["image"].shape),
        "tokens": list(batch["target"].shape[-2:]),
        "targets": source,
        "gaussians_per_scene": n_gauss if source == "stage-1 run" else "points",
        "bf16": args.bf16,
        "num_workers": f.num_workers,
        "threads": torch.get_num_threads(),
        "bare_seconds": med_bare,
        "ours_seconds": med_ours,
        "ratio": med_ours / med_bare,
        "ratio_median_per_step": statistics.median(ratios),
        "bare_all": bare_times,
        "ours_all": ours,
    }
    print(f"{'':<28}{'s/step':>8}")
    print(f"{'bare timm fwd+bwd':<28}{med_bare:>8.3f}")
    print(f"{'ours (render+fwd+bwd+opt)':<28}{med_ours:>8.3f}")
    per_step = result["ratio_median_per_step"]
    print(f"ratio {result['ratio']:.2f}x (per-step median {per_step:.2f}x)", end="  ")
    print(f"batch {result['batch']} tokens {result['tokens']}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
