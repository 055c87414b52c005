"""How evaluation images meet the patch grid (centre padding after normalisation, as FiT3D's
and Probe3D's evaluation code; resizing, as stage 1) and the per-block CLS tokens of Probe3D's
`dense-cls` DPT input, on the tiny random-weight ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fit3d.backbones import Backbone
from fit3d.eval.features import MapPlan, extract, fit_to_patch


def _backbone() -> Backbone:
    return Backbone("test_tiny")  # patch 14, 2 blocks, width 48


def test_pad_normalises_then_centre_pads_with_zeros():
    bb = _backbone()
    images = torch.rand(2, 3, 37, 51)  # pads to 42 x 56: rows 2 top + 3 bottom, columns 2 + 3
    x = fit_to_patch(bb, images, "pad")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert x.shape == (2, 3, 42, 56)
    torch.testing.assert_close(x[:, :, 2:39, 2:53], (images - mean) / std)
    assert (x[:, :, :2] == 0).all() and (x[:, :, 39:] == 0).all()  # the mean colour
    assert (x[..., :2] == 0).all() and (x[..., 53:] == 0).all()
    half = fit_to_patch(bb, images, "pad", "half")
    torch.testing.assert_close(half[:, :, 2:39, 2:53], (images - 0.5) / 0.5)


def test_pad_and_resize_agree_on_multiples_of_the_patch():
    bb = _backbone()
    images = torch.rand(1, 3, 28, 42)
    torch.testing.assert_close(fit_to_patch(bb, images, "pad"), fit_to_patch(bb, images, "resize"))
    assert fit_to_patch(bb, torch.rand(1, 3, 37, 51), "resize").shape == (1, 3, 28, 42)
    resized_half = fit_to_patch(bb, images, "resize", "half")
    torch.testing.assert_close(resized_half, (images - 0.5) / 0.5, atol=1e-6, rtol=1e-6)


def test_block_cls_tokens_are_each_blocks_prefix_token():
    bb = _backbone()
    images = torch.rand(2, 36, 36, 3)
    plan = MapPlan(final=False, blocks=(0, 1), block_cls=True, fit="pad")
    out = extract(bb, images, plan)
    assert plan.cls_names == ["cls_block0", "cls_block1"]
    assert out["maps"].shape == (2, 2, 48, 3, 3) and out["block_cls"].shape == (2, 2, 48)
    x = F.pad((images.permute(0, 3, 1, 2) - bb.mean) / bb.std, (3, 3, 3, 3))  # 36 -> 42
    with torch.no_grad():
        ref = bb.model.forward_intermediates(
            x, indices=[0, 1], norm=False, return_prefix_tokens=True, intermediates_only=True
        )
    for k in range(2):
        torch.testing.assert_close(out["block_cls"][:, k], ref[k][1][:, 0])
        torch.testing.assert_close(out["maps"][:, k], ref[k][0])
