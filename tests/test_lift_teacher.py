"""fit3d.lift.teacher: cached teacher tokens equal timm's own forward on the image resized (no
crop) and ImageNet-normalised by hand, one forward per requested view, f16 on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fit3d.backbones import Backbone
from fit3d.lift.teacher import teacher_tokens

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _reference(bb: Backbone, image: torch.Tensor) -> torch.Tensor:
    """image [H, W, 3] -> [C, h, w]: resize to multiples of 14 (antialiased bilinear, no crop),
    normalise, timm's forward_features (final norm), patch tokens (CLS dropped) on the grid."""
    h, w = image.shape[0] // 14, image.shape[1] // 14
    x = F.interpolate(
        image.permute(2, 0, 1)[None],
        (h * 14, w * 14),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    with torch.no_grad():
        tokens = bb.model.forward_features((x - MEAN) / STD)  # [1, 1 + h*w, C]
    return tokens[0, 1:].T.reshape(-1, h, w)


def test_teacher_tokens_match_timm_on_the_resized_image():
    bb = Backbone("test_tiny")
    gen = torch.Generator().manual_seed(0)
    images = {i: torch.rand(50 + 3 * i, 75, 3, generator=gen) for i in range(4)}
    calls: list[int] = []

    def load_image(i: int) -> torch.Tensor:
        calls.append(i)
        return images[i]

    out = teacher_tokens(bb, load_image, [3, 0, 2], torch.device("cpu"))
    assert list(out) == [3, 0, 2] and calls == [3, 0, 2]  # one read per requested view
    for i, tokens in out.items():
        ref = _reference(bb, images[i])  # [48, h, w]
        assert tokens.dtype == torch.float16 and tokens.device.type == "cpu"
        assert tokens.shape == ref.shape == (48, (50 + 3 * i) // 14, 5)
        # f16 storage: about 3 significant digits of values of order 1
        torch.testing.assert_close(tokens.float(), ref, atol=4e-3, rtol=2e-3)
    # views see different images, so their tokens differ (the cache is not one view repeated)
    assert not torch.equal(out[0][:, :3], out[2][:, :3])


def test_batched_views_match_one_at_a_time():
    # same-size views share forwards (batch 2: groups of 2, 2, 1 and a size change in between);
    # each view's tokens still equal timm's forward on that image alone
    bb = Backbone("test_tiny")
    gen = torch.Generator().manual_seed(1)
    sizes = [(42, 70), (42, 70), (42, 70), (56, 70), (42, 70), (42, 70)]
    images = {i: torch.rand(h, w, 3, generator=gen) for i, (h, w) in enumerate(sizes)}
    out = teacher_tokens(bb, images.__getitem__, list(images), torch.device("cpu"), batch=2)
    assert list(out) == list(images)
    for i, tokens in out.items():
        ref = _reference(bb, images[i])
        assert tokens.shape == ref.shape
        torch.testing.assert_close(tokens.float(), ref, atol=4e-3, rtol=2e-3)
