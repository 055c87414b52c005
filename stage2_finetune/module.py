"""The fine-tuning LightningModule: the whole backbone trains on rendered targets (no new head)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from fit3d.backbones import Backbone
from fit3d.losses import masked_l1


class FinetuneModule(L.LightningModule):
    """Student = the backbone's last block, final norm, patch tokens; loss = masked L1 to targets.

    AdamW over every backbone parameter (lr 1e-5, wd 1e-4; docs/method.md, "Stage 2: fine-tuning");
    gradient clipping (norm 0.1) is the Trainer's `gradient_clip_val`.
    """

    def __init__(self, backbone: Backbone, lr: float = 1e-5, weight_decay: float = 1e-4):
        super().__init__()
        self.backbone = backbone.requires_grad_(True).train()
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, C, h, w]."""
        return self.backbone(self.backbone.preprocess(images))

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        out = self(batch["image"])  # [B, C, h, w]
        if out.shape != batch["target"].shape:
            raise RuntimeError(
                f"token map {tuple(out.shape)} != target {tuple(batch['target'].shape)}"
            )
        return masked_l1(out, batch["target"], batch["mask"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        n = len(batch["image"])
        self.log("finetune/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("finetune/val_loss", loss, sync_dist=True, batch_size=len(batch["image"]))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
