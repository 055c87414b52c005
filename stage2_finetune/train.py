"""One fine-tuning run: check inputs, train with Lightning, write `outputs/finetune/<run>/`.

Outputs: `backbone.safetensors` (plain timm state dict), `timm_model/` (the same weights as a
timm / Hugging Face model folder with a model card, `fit3d.export`), `meta.json` (written last),
`config.yaml`, `checkpoints/last.ckpt` (resume only), `logs/metrics.csv`, `pca.png`; `targets/`
holds rendered targets while training (`stage2_finetune.data`) and is removed at the end.

`finetune.batch_size` is the global batch G (paper: 2), whatever the device count N (devices x
nodes): each rank gets G / N samples per optimizer step, run in forward/backward passes of
`finetune.device_batch` images (accumulating gradients), and the loss is normalised over the
whole global batch (`stage2_finetune.module`), so the optimizer steps, lr and clipping are the
paper's on any N that divides G; otherwise the run stops before training (`batch_plan`).
"""

from __future__ import annotations

import netrc
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger

from fit3d.config import Config, to_dict
from fit3d.errors import UserError
from fit3d.export import export_dir, write_export
from fit3d.io import sha256_file, write_json, write_safetensors
from fit3d.lora import add_lora, has_lora, merge_lora
from fit3d.runs import (
    BACKBONE_FILE,
    META_FILE,
    autocast,
    build_backbone,
    check_settings,
    finetune_checkpoint,
    finetune_target_dir,
    provenance,
    read_meta,
    resolve_device,
    resolve_precision,
    run_dir,
    write_config,
)
from fit3d.scenes import Scene, list_scenes, open_scene
from stage2_finetune import heldout
from stage2_finetune.data import FinetuneDataModule, LiftRun, read_lift_run
from stage2_finetune.module import FinetuneModule

_ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}
SETTINGS = ("scenes", "backbone", "finetune")
"""Config sections a fine-tune run folder is tied to: a rerun with others is refused."""


def _wandb_logger(cfg: Config, out: Path) -> Logger:
    """WandbLogger that never prompts: honours WANDB_MODE; without it and without credentials
    (WANDB_API_KEY or a ~/.netrc entry) it logs offline."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        try:
            known = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            known = False
        mode = "online" if os.environ.get("WANDB_API_KEY") or known else "offline"
    return WandbLogger(
        project="fit3d", name=f"finetune-{cfg.run.name}", save_dir=str(out), mode=mode
    )


def _loggers(cfg: Config, out: Path) -> list[Logger]:
    if cfg.run.logger not in ("csv", "wandb"):
        raise UserError(f"run.logger must be csv or wandb, got '{cfg.run.logger}'")
    loggers: list[Logger] = [CSVLogger(str(out), name="logs")]  # logs/version_<k>/ per session
    if cfg.run.logger == "wandb":
        loggers.append(_wandb_logger(cfg, out))
    return loggers


def _heldout_scenes(run: LiftRun, split: str) -> tuple[list[Scene], str]:
    """Held-out scenes of the dataset behind `run` (for the correspondence check), or a reason."""
    meta = run.metas[0]
    try:
        ids = list_scenes(meta["scenes_root"], split)
    except UserError as e:
        return [], str(e)
    return [open_scene(meta["scenes_root"], s, float(meta["resolution"])) for s in ids], ""


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is split: `devices` x `accumulation` passes of `device_batch`."""

    global_batch: int
    """Samples per optimizer step, over all devices (`finetune.batch_size`)."""
    devices: int
    """Processes taking part in a step (devices per node x nodes)."""
    device_batch: int
    """Images per forward/backward pass on one device."""
    accumulation: int
    """Passes per device per optimizer step."""

    @property
    def per_device(self) -> int:
        """Samples per device per optimizer step (its share of the global batch)."""
        return self.device_batch * self.accumulation


def _device_choices(global_batch: int, devices: int) -> str:
    ok = [n for n in range(1, min(global_batch, devices) + 1) if global_batch % n == 0]
    return " or ".join(str(n) for n in ok)


def batch_plan(global_batch: int, device_batch: int, devices: int) -> BatchPlan:
    """Split `global_batch` over `devices`; `device_batch` 0 = each device's whole share in one
    pass. A split that cannot honour the global batch is a one-line `UserError` naming the
    choices."""
    if global_batch < 1:
        raise UserError(f"finetune.batch_size must be >= 1, got {global_batch}")
    if global_batch % devices:
        why = (
            f"more devices ({devices}) than samples per step ({global_batch})"
            if devices > global_batch
            else f"{global_batch} samples per step do not split evenly over {devices} devices"
        )
        raise UserError(
            f"finetune.batch_size={global_batch} is the global batch (paper: 2) and cannot be "
            f"honoured: {why} (finetune.devices x finetune.num_nodes); set finetune.batch_size "
            f"to a multiple of {devices}, or use {_device_choices(global_batch, devices)} devices"
        )
    share = global_batch // devices
    size = device_batch or share
    if size < 1 or share % size:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        raise UserError(
            f"finetune.device_batch={device_batch} must divide each device's share of the global "
            f"batch ({global_batch} / {devices} devices = {share}): use one of {divisors}, or 0"
        )
    return BatchPlan(global_batch, devices, size, share // size)


class LastCheckpoint(Callback):
    """Keep one resumable `last.ckpt`: every `every` steps, at `max_steps`, at each epoch end.

    An epoch cut short by `max_steps` is saved at its last batch, not at the epoch end hook (a
    checkpoint taken there would claim the epoch finished and a resumed run would skip the rest).
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), max(every, 1)
        self._last_batch = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._last_batch = batch_idx
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._last_batch + 1 >= trainer.num_training_batches:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable


def lightning_precision(cfg: Config) -> str:
    """`finetune.precision` as Lightning takes it: `auto` -> `bf16-mixed` where the device has
    bf16 natively, else `32-true`; any other value as it is."""
    if cfg.finetune.precision != "auto":
        return cfg.finetune.precision
    resolved = resolve_precision("auto", resolve_device(cfg.run.device))
    return {"bf16": "bf16-mixed", "fp32": "32-true"}[resolved]


def make_trainer(cfg: Config, out: Path, callbacks: list[Callback]) -> L.Trainer:
    f = cfg.finetune
    if cfg.run.device not in _ACCELERATORS:
        raise UserError(f"run.device must be auto, cpu or cuda, got '{cfg.run.device}'")
    ckpt = LastCheckpoint(finetune_checkpoint(out), f.checkpoint_every)
    return L.Trainer(
        accelerator=_ACCELERATORS[cfg.run.device],
        devices=f.devices,
        num_nodes=f.num_nodes,
        strategy=f.strategy,
        precision=lightning_precision(cfg),
        max_epochs=f.epochs,
        max_steps=f.max_steps,
        logger=_loggers(cfg, out),
        callbacks=[ckpt, *callbacks],
        log_every_n_steps=max(f.log_every, 1),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_checkpointing=False,  # LastCheckpoint instead of Lightning's default callback
        default_root_dir=str(out),
    )


def run(cfg: Config, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Fine-tune per `cfg`; returns the meta dict (rank 0) or {} (other DDP ranks)."""
    # what this device runs: config.yaml and meta.json record it
    cfg = replace(cfg, finetune=replace(cfg.finetune, precision=lightning_precision(cfg)))
    f = cfg.finetune
    out = run_dir(cfg, "finetune")
    lift = read_lift_run(run_dir(cfg, "lift", f.lift_run))  # fails before the model is built
    val_lift = read_lift_run(run_dir(cfg, "lift", f.val_lift_run)) if f.val_lift_run else None
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)  # random-init backbones too
    backbone = build_backbone(cfg)
    for r in (lift, val_lift):
        if r is not None:
            r.check_width(backbone.embed_dim)
    ckpt_path = finetune_checkpoint(out)
    if f.resume and not ckpt_path.is_file():
        raise UserError(f"finetune.resume=true but {ckpt_path} does not exist")
    resume = f.resume
    if not f.resume and check_settings(cfg, out, SETTINGS):
        if (out / META_FILE).is_file():
            print(f"stage2_finetune: {out} is finished; skipped (another run.name trains again)")
            return read_meta(out / META_FILE)
        resume = ckpt_path.is_file()  # same settings, interrupted: carry on from the checkpoint
    trainer = make_trainer(cfg, out, list(callbacks or []))
    plan = batch_plan(f.batch_size, f.device_batch, trainer.num_devices * trainer.num_nodes)
    paired = f.objective != "fit3d"  # an equivariance term: view pairs
    if paired and (plan.per_device % 2 or plan.device_batch % 2):
        raise UserError(
            f"finetune.objective={f.objective} trains on view pairs: each device's share of "
            f"finetune.batch_size ({plan.per_device}) and its passes ({plan.device_batch}) "
            "must be even"
        )
    data = FinetuneDataModule(
        lift,
        backbone.token_grid,
        batch_size=plan.per_device,
        num_workers=f.num_workers,
        window=f.target_window,
        seed=cfg.run.seed,
        val_run=val_lift,
        val_views=f.val_views,
        target_dir=finetune_target_dir(out),
        val_batch_size=plan.device_batch,
        all_views=f.views == "all",
        image_scale=f.image_scale,
        crop=f.crop,
        patch=backbone.patch_size,
        view_pairs=f.equiv_max_angle if paired else None,
    )
    fused = f.precision != "16-mixed"  # fp16's loss scaler unscales inside a fused step
    lr = f.lr * (f.lora_lr_scale if f.adapter == "lora" else 1.0)
    module = FinetuneModule(
        backbone, lr, f.weight_decay, f.grad_clip, plan.device_batch, fused, f.objective,
        f.equiv_weight, f.equiv_temperature, f.equiv_points, cfg.run.seed,
    )  # fmt: skip
    if f.adapter == "lora":  # after the module made every weight trainable: freezes the base
        add_lora(backbone.model, f.lora_rank, f.lora_blocks, f.lora_targets, f.lora_alpha or None)
    if trainer.is_global_zero:
        write_config(cfg, out)
    # mid-epoch resumption is exact (FinetuneDataModule.state_dict), unlike Lightning assumes
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if resume else None)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    return _finish(cfg, out, trainer, module, data, plan, lift, val_lift, seconds)


def _finish(
    cfg: Config,
    out: Path,
    trainer: L.Trainer,
    module: FinetuneModule,
    data: FinetuneDataModule,
    plan: BatchPlan,
    lift: LiftRun,
    val_lift: LiftRun | None,
    seconds: float,
) -> dict[str, Any]:
    """Rank 0 after training: weights, before/after checks, pca.png, the exported model folder,
    meta.json (last)."""
    tuned = module.backbone.eval()
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    if has_lora(tuned.model):  # every consumer reads a plain timm state dict
        merge_lora(tuned.model)
    weights_file = out / BACKBONE_FILE
    write_safetensors(
        weights_file,
        tuned.timm_state_dict(),
        {"timm_name": tuned.timm_name, "base_sha256": tuned.weights_info.sha256, "format": "timm"},
    )
    original = build_backbone(cfg).to(trainer.strategy.root_device).eval()
    models = {"original": original, "finetuned": tuned}
    val_set = data.val_dataset()
    # the checks run in the precision the model trained in (bf16 on the demo's CPU: ~2x faster)
    amp = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(cfg.finetune.precision, "fp32")
    with autocast(trainer.strategy.root_device, amp):
        l1 = heldout.dataset_l1(models, val_set)
        scenes, why = _heldout_scenes(lift, cfg.scenes.val_split)
        corr = heldout.correspondence_cosine(models, scenes, cfg.finetune.corr_pairs, cfg.run.seed)
        heldout.save_pca(out / "pca.png", original, tuned, val_set, cfg.finetune.pca_views)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    meta = {
        **provenance(tuned, weights_key="base_weights"),  # tuned keeps its starting weights' info
        "weights_sha256": sha256_file(weights_file),
        "lift_run": str(lift.path),
        "val_lift_run": str(val_lift.path) if val_lift else "",
        "train_scenes": len(lift.scene_ids),
        "train_views": len(data.train_pairs),
        "steps": trainer.global_step,  # optimizer steps
        "epochs": round(trainer.global_step / max(trainer.num_training_batches, 1), 3),
        "world_size": trainer.world_size,
        "batch": {**asdict(plan), "per_device": plan.per_device},
        "objective": cfg.finetune.objective,
        "adapter": cfg.finetune.adapter,
        "trainable_params": trainable,
        "optimizer": {
            "lr": module.lr,
            "weight_decay": cfg.finetune.weight_decay,
            "grad_clip": cfg.finetune.grad_clip,
        },
        "seconds": round(seconds, 2),
        "losses": {
            "train_last_epoch": metrics.get("finetune/loss_epoch"),
            **{
                f"train_last_epoch_{k}": metrics[f"finetune/{k}_epoch"]
                for k in ("l1", "equiv")
                if f"finetune/{k}_epoch" in metrics
            },
            "val": metrics.get("finetune/val_loss"),
        },
        "heldout": {
            "masked_l1": {"views": len(val_set), **l1},
            "correspondence_cosine": corr if corr is not None else f"skipped: {why or 'no depth'}",
        },
        "config": to_dict(cfg),
    }
    meta["export"] = str(write_export(export_dir(out), tuned, meta, weights_file))
    write_json(out / META_FILE, meta)
    return meta
