"""fit3d: 3D-aware fine-tuning of 2D vision foundation models (FiT3D) with Probe3D-style probes.

The library has no side effects at import; entry points live in `stage1_lift`, `stage2_finetune`
and `fit3d.eval`. The public API for other code, `fit3d.load_backbone` and `fit3d.Backbone`, is
imported on first use, so that `import fit3d` stays free of torch and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Backbone", "load_backbone"]

if TYPE_CHECKING:
    from fit3d.backbones import Backbone
    from fit3d.export import load_backbone


def __getattr__(name: str) -> Any:
    """`fit3d.load_backbone` and `fit3d.Backbone`, imported when first asked for."""
    if name == "load_backbone":
        from fit3d.export import load_backbone

        return load_backbone
    if name == "Backbone":
        from fit3d.backbones import Backbone

        return Backbone
    raise AttributeError(f"module 'fit3d' has no attribute {name!r}")
