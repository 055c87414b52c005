"""Teacher features for stage 1, computed once per view and cached in half precision.

FiT3D re-runs the frozen teacher every step; the teacher is deterministic, so one forward per view
gives the same targets for a fraction of the cost (docs/method.md, "Stage 1: lifting").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fit3d.backbones import Backbone


@torch.inference_mode()
def teacher_tokens(
    backbone: Backbone,
    load_image: Callable[[int], torch.Tensor],
    views: Iterable[int],
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """{view: last-block final-norm patch tokens [C,h,w] f16 on CPU} for each view.

    `load_image(i)` returns [H,W,3] float in [0,1]; the backbone resizes (no crop) to a multiple of
    its patch size and normalises.
    """
    out = {}
    for i in views:
        image = load_image(i).permute(2, 0, 1)[None].to(device)  # [1, 3, H, W]
        tokens = backbone(backbone.preprocess(image))  # [1, C, h, w]
        out[i] = tokens[0].to("cpu", torch.float16)
    return out
