"""Stage 2: 3D-aware fine-tuning of a 2D backbone on features rendered from lifted scenes.

`python -m stage2_finetune [--preset demo] [key=value ...]` (docs/method.md, "Stage 2:
fine-tuning"). The LightningModule is `module.FinetuneModule`, the LightningDataModule
`data.FinetuneDataModule`; `train.run(cfg)` does one whole run. Nothing is imported here, so the
command line is checked before Lightning and torch load.
"""
