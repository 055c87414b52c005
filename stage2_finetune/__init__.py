"""Stage 2: 3D-aware fine-tuning of a 2D backbone on features rendered from lifted scenes.

`python -m stage2_finetune [--preset demo] [key=value ...]` (docs/method.md, "Stage 2:
fine-tuning"). The LightningModule is `FinetuneModule`, the LightningDataModule
`FinetuneDataModule`; `run(cfg)` does one whole run.
"""

from stage2_finetune.data import FinetuneDataModule, FinetuneDataset, ShuffledSampler, TargetStore
from stage2_finetune.module import FinetuneModule
from stage2_finetune.train import BatchPlan, batch_plan, run

__all__ = [
    "BatchPlan",
    "FinetuneDataModule",
    "FinetuneDataset",
    "FinetuneModule",
    "ShuffledSampler",
    "TargetStore",
    "batch_plan",
    "run",
]
