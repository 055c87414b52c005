"""protocol=paper pieces: iteration scaling, FiT3D's augmentations, slide inference and flip
test-time augmentation (with features that are the image itself, so the answer is known)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fit3d.backbones import IMAGENET_MEAN
from fit3d.eval import paper as P


def test_iterations_scale_with_the_global_batch():
    assert P.scaled_iters(40000, 16) == 40000
    assert P.scaled_iters(40000, 8) == 80000  # half the batch, twice the steps, same images
    assert P.scaled_iters(38400, 32) == 19200
    assert P.scaled_iters(5, 64) == 2  # rounded up


def test_rescale_keeps_the_ratio_within_the_scale():
    assert P.rescale_size(584, 876, (2048, 512)) == (512, 768)  # ScanNet++ at 0.5
    assert P.rescale_size(480, 640, (2048, 512)) == (512, 683)  # NYUv2
    assert P.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds


def test_seg_augment_shapes_padding_and_seed():
    image = torch.rand(30, 45, 3)
    seg = torch.zeros(30, 45, dtype=torch.long)
    seg[:, 20:] = 1
    seg[:3] = 255
    a = P.seg_augment(image, seg, np.random.default_rng(3), crop=64, scale=(48, 16))
    b = P.seg_augment(image, seg, np.random.default_rng(3), crop=64, scale=(48, 16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded: repeatable
    img, lab = a
    assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
    assert set(lab.unique().tolist()) <= {0, 1, 255}
    # the resized image (at most 48 x 32 at ratio 2) is smaller than the crop: the rest is padding,
    # labels 255 and the mean colour (0 after the backbone's normalisation)
    assert (lab[40:] == 255).all() and (lab[:, 60:] == 255).all()
    torch.testing.assert_close(img[50, 62], torch.tensor(IMAGENET_MEAN))


def test_depth_augment_crops_and_keeps_depth_values():
    depth = torch.arange(1, 41 * 61 + 1, dtype=torch.float32).reshape(41, 61) / 100
    image = torch.rand(41, 61, 3)
    for seed in range(6):
        img, dep = P.depth_augment(image, depth, np.random.default_rng(seed), (24, 32))
        assert img.shape == (24, 32, 3) and dep.shape == (24, 32)
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        kept = dep[dep > 0]  # nearest-neighbour rotation: only original values (or 0 outside)
        assert torch.isin(kept, depth.flatten()).all()


@pytest.fixture
def image_features(monkeypatch):
    """Features = the image itself, channels first; the head returns them at the label size."""

    def fake(backbones, parts, images, kind, precision):
        return images.permute(0, 3, 1, 2)

    monkeypatch.setattr(P, "live_features", fake)

    def head(x, size):
        return torch.nn.functional.interpolate(x, size=size, mode="nearest")

    return head


def test_slide_inference_places_every_window(image_features):
    image = torch.rand(70, 95, 3)
    logits = P.slide_logits(image_features, {}, (), image, crop=32, stride=21, precision="fp32")
    torch.testing.assert_close(logits, image.permute(2, 0, 1))  # overlaps average to the same
    small = P.slide_logits(image_features, {}, (), image[:20, :25], 32, 21, "fp32")
    torch.testing.assert_close(small, image[:20, :25].permute(2, 0, 1))  # one window


def test_flip_tta_mirrors_the_mirrored_prediction_back(image_features):
    image = torch.rand(9, 14, 3)

    def depth_head(x, size):
        return image_features(x, size)[:, 0]  # "depth" = red channel, pixel by pixel

    depth = P.flip_depth(depth_head, {}, (), image, (9, 14), "fp32")
    torch.testing.assert_close(depth, image[..., 0])
