"""The fine-tuning LightningModule: the whole backbone trains on rendered targets (no new head).

One training batch is this rank's share of the global batch (`finetune.batch_size`); the module
runs it in forward/backward passes of `device_batch` images and takes one optimizer step. The loss
of the step is FiT3D's masked L1 over the whole global batch, `Σ|out - target|·m / (Σm · C)` with
the sums over every image of every rank (docs/method.md, "Stage 2: fine-tuning"): each pass
back-propagates its share of the numerator divided by the global `Σm · C` (one all-reduce), times
the world size because DDP averages gradients over ranks. So any split of one global batch over
devices and passes gives the gradient of the one-device, one-pass step, up to float rounding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from fit3d.backbones import Backbone
from fit3d.losses import masked_l1


class FinetuneModule(L.LightningModule):
    """Student = the backbone's last block, final norm, patch tokens; loss = masked L1 to targets.

    AdamW over every backbone parameter (lr 1e-5, wd 1e-4), gradient norm clipped to `grad_clip`
    (0.1) after accumulation, before the step (docs/method.md, "Stage 2: fine-tuning"). Neither
    is scaled with the batch or the device count. `device_batch`: images per forward pass (0 =
    the whole batch in one pass).
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-5,
        weight_decay: float = 1e-4,
        grad_clip: float = 0.1,
        device_batch: int = 0,
        fused: bool = True,
    ):
        super().__init__()
        self.automatic_optimization = False  # several passes per step, one global normaliser
        self.backbone = backbone.requires_grad_(True).train()
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.device_batch, self.fused = device_batch, fused

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, C, h, w]."""
        return self.backbone(self.backbone.preprocess(images))

    def _tokens(self, images: Tensor, target: Tensor) -> Tensor:
        out = self(images)  # [B, C, h, w]
        if out.shape != target.shape:
            raise RuntimeError(f"token map {tuple(out.shape)} != target {tuple(target.shape)}")
        return out

    def _sum_over_ranks(self, x: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(x.detach().clone(), reduce_op="sum")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, target, mask = batch["image"], batch["target"], batch["mask"]
        n = len(images)
        size = self.device_batch or n
        world = self.trainer.world_size
        total = self._sum_over_ranks(mask.float().sum()).clamp_min(1e-12)  # Σm, global batch
        opt = self.optimizers()
        opt.zero_grad()
        strategy = self.trainer.strategy
        share = torch.zeros((), device=images.device)
        starts = list(range(0, n, size))
        for i, a in enumerate(starts):
            part = slice(a, a + size)
            out = self._tokens(images[part], target[part])
            m = mask[part]
            loss = masked_l1(out, target[part], m) * (m.float().sum() / total)
            last = i == len(starts) - 1
            sync = (
                strategy.block_backward_sync()
                if isinstance(strategy, ParallelStrategy) and not last
                else contextlib.nullcontext()
            )
            with sync:  # gradients are all-reduced once, after the last pass
                self.manual_backward(loss * world)
            share += loss.detach()
        opt.step()
        loss = self._sum_over_ranks(share)  # the global batch's masked L1
        self.log("finetune/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after accumulation and (16-mixed) unscaling, before the step. torch's clip rather than
        # Lightning's, which refuses any fused optimizer under mixed precision, even bf16's
        # (no loss scale); with fp16's scaler the optimizer is not fused (configure_optimizers).
        if self.grad_clip > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = masked_l1(
            self._tokens(batch["image"], batch["target"]), batch["target"], batch["mask"]
        )
        self.log("finetune/val_loss", loss, sync_dist=True, batch_size=len(batch["image"]))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        # fused: one kernel per step over all tensors, the same update to float rounding
        # (benchmarks/lift_step.py: the optimizer part of a demo step ~5x faster on CPU). Not
        # under 16-mixed (train.py): a fused step unscales fp16's loss scale inside its kernel,
        # after the clip in on_before_optimizer_step would have seen scaled gradients.
        return torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, fused=self.fused
        )
