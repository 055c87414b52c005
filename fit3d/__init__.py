"""fit3d: 3D-aware fine-tuning of 2D vision foundation models (FiT3D) with Probe3D-style probes.

The library has no side effects at import; entry points live in `stage1_lift`, `stage2_finetune`
and `fit3d.eval`.
"""

__version__ = "0.1.0"
