"""Teacher features for stage 1, computed once per view and cached in half precision.

FiT3D re-runs the frozen teacher every step; the teacher is deterministic, so one forward per view
gives the same targets for a fraction of the cost (docs/method.md, "Stage 1: lifting"). Views of
the same size go through the backbone in batches: on the 2-core CPU a batch of 4 demo views took
2.4x less time per view than one at a time (ViT-S/14 at 336x224, measured side by side).
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
    batch: int = 8,
) -> dict[int, torch.Tensor]:
    """{view: last-block final-norm patch tokens [C,h,w] f16 on CPU} for each view.

    `load_image(i)` returns [H,W,3] float in [0,1]; the backbone resizes (no crop) to a multiple of
    its patch size and normalises. Up to `batch` consecutive views of one size share a forward.
    """
    out: dict[int, torch.Tensor] = {}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        images = torch.stack([im for _, im in pending]).to(device)  # [B, 3, H, W]
        tokens = backbone(backbone.preprocess(images))  # [B, C, h, w]
        for (i, _), t in zip(pending, tokens, strict=True):
            out[i] = t.to("cpu", torch.float16)
        pending.clear()

    for i in views:
        image = load_image(i).permute(2, 0, 1)  # [3, H, W]
        if pending and (len(pending) == batch or pending[0][1].shape != image.shape):
            flush()
        pending.append((i, image))
    if pending:
        flush()
    return out
