"""The fine-tuning LightningModule: the whole backbone trains on rendered targets (no new head).

One training batch is this rank's share of the global batch (`finetune.batch_size`); the module
runs it in forward/backward passes of `device_batch` images and takes one optimizer step. The loss
of the step is FiT3D's masked L1 over the whole global batch, `Σ|out - target|·m / (Σm · C)` with
the sums over every image of every rank (docs/method.md, "Stage 2: fine-tuning"): each pass
back-propagates its share of the numerator divided by the global `Σm · C` (one all-reduce), times
the world size because DDP averages gradients over ranks. So any split of one global batch over
devices and passes gives the gradient of the one-device, one-pass step, up to float rounding.

With an equivariance objective (`finetune.objective`, docs/method.md "Stage-2 objectives") the
batch is made of view pairs (items 2k, 2k+1) and the step adds `equiv_weight` x the mean over
the global batch's usable pairs of their InfoNCE (`stage2_finetune.equivariance`), normalised the
same way: each pass back-propagates its pairs' sum divided by the global count of usable pairs.
The correspondences depend on geometry only, so they are found before the passes.
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
from stage2_finetune.equivariance import pair_loss, pair_points


class FinetuneModule(L.LightningModule):
    """Student = the backbone's last block, final norm, patch tokens; loss = masked L1 to targets
    (`objective` `fit3d`), InfoNCE over view pairs' correspondences (`equivariance`) or the L1 +
    `equiv_weight` x InfoNCE (`fit3d+equivariance`); `temperature`, `points` per pair and `seed`
    (of the per-step point picks) are the InfoNCE's.

    AdamW over every trainable backbone parameter (all, or only LoRA updates added after this
    module is built), lr 1e-5, wd 1e-4, gradient norm clipped to `grad_clip`
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
        objective: str = "fit3d",
        equiv_weight: float = 0.1,
        temperature: float = 0.1,
        points: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False  # several passes per step, one global normaliser
        self.backbone = backbone.requires_grad_(True).train()
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.device_batch, self.fused = device_batch, fused
        self.l1_weight = 0.0 if objective == "equivariance" else 1.0
        self.equiv_weight = {"fit3d": 0.0, "equivariance": 1.0}.get(objective, equiv_weight)
        self.paired = objective != "fit3d"
        self.temperature, self.points, self.seed = temperature, points, seed

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

    def _pairs(self, batch: dict[str, Tensor]) -> list:
        """Matched points of every view pair (2k, 2k+1) of this rank's batch (None: unusable);
        the random picks are seeded by (run seed, global step, rank)."""
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.global_step) * 1009 + self.trainer.global_rank
        )
        sizes = [tuple(t.shape[-2:]) for t in batch["target"]]
        return [
            pair_points(batch, k, k + 1, (sizes[k], sizes[k + 1]), self.points, gen)
            for k in range(0, len(batch["target"]) - 1, 2)
        ]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, target, mask = batch["image"], batch["target"], batch["mask"]
        n = len(images)
        size = self.device_batch or n
        world = self.trainer.world_size
        total = self._sum_over_ranks(mask.float().sum()).clamp_min(1e-12)  # Σm, global batch
        points = self._pairs(batch) if self.paired else []
        if self.paired:  # usable view pairs of the global batch
            usable = torch.tensor(float(sum(p is not None for p in points)), device=images.device)
            n_pairs = self._sum_over_ranks(usable).clamp_min(1.0)
        opt = self.optimizers()
        opt.zero_grad()
        strategy = self.trainer.strategy
        share = torch.zeros((), device=images.device)
        l1_share = torch.zeros((), device=images.device)
        eq_share = torch.zeros((), device=images.device)
        starts = list(range(0, n, size))
        for i, a in enumerate(starts):
            part = slice(a, a + size)
            out = self._tokens(images[part], target[part])
            m = mask[part]
            l1 = masked_l1(out, target[part], m) * (m.float().sum() / total)
            loss = self.l1_weight * l1
            l1_share += l1.detach()
            if self.paired:
                eq = out.new_zeros(())
                for k in range(a, min(a + size, n) - 1, 2):  # whole pairs (even pass sizes)
                    p = points[k // 2]
                    if p is not None:
                        eq = eq + pair_loss(out[k - a], out[k + 1 - a], p, self.temperature)
                eq = eq / n_pairs
                loss = loss + self.equiv_weight * eq
                eq_share += eq.detach()
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
        loss = self._sum_over_ranks(share)  # the global batch's objective
        self.log("finetune/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if self.paired:  # the two terms apart
            l1_all, eq_all = self._sum_over_ranks(l1_share), self._sum_over_ranks(eq_share)
            self.log("finetune/l1", l1_all, on_step=True, on_epoch=True, batch_size=n)
            self.log("finetune/equiv", eq_all, on_step=True, on_epoch=True, batch_size=n)
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
