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

    def fake(backbones, parts, images, kind, precision, *plan):
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


def _colour_augmented(seed: int, gamma_on_255: bool) -> torch.Tensor:
    """The interior 2x2 pixels (a rotation of this flat image only blackens its corners) after
    FiT3D's depth augmentation with the draws of `seed`."""
    image = torch.full((6, 8, 3), 0.2)
    depth = torch.ones(6, 8)
    out = P.depth_augment(image, depth, np.random.default_rng(seed), (6, 8), (0.75, 1.25),
                          gamma_on_255)[0]  # fmt: skip
    return out[2:4, 3:5]


def test_fit3d_colour_aug_raises_0_255_values_to_the_gamma():
    """Same draws, gamma on 0-255 (FiT3D's ColorAug) vs on [0, 1]: brightness and colour cancel
    in the ratio of the two, which is 255^(gamma - 1) on every pixel and channel."""
    flat = torch.tensor(0.2)
    seeds = [s for s in range(40) if not torch.allclose(_colour_augmented(s, False), flat)]
    assert len(seeds) > 5  # the colour branch has p 0.5
    for seed in seeds[:5]:
        published, fixed = _colour_augmented(seed, True), _colour_augmented(seed, False)
        ratio = published / fixed
        torch.testing.assert_close(ratio, ratio[0, 0, 0].expand_as(ratio))
        gamma = 1 + float(torch.log(ratio[0, 0, 0])) / np.log(255)
        assert 0.9 <= gamma <= 1.1 and abs(gamma - 1) > 1e-4


class _OneView(dict):
    """A one-view set: `ds[0]` is the sample; carries the attributes AugmentedViews reads."""

    name = "kitti"
    color_brightness = (0.9, 1.1)  # FiT3D's KITTI config


def test_kitti_brightness_range_reaches_the_depth_augmentation(monkeypatch):
    from types import SimpleNamespace

    from fit3d.datasets.kitti import KITTI

    assert KITTI.color_brightness == _OneView.color_brightness  # others 0.75-1.25
    seen = {}

    def spy(image, depth, rng, crop, brightness, gamma_on_255):
        seen.update(brightness=brightness, gamma=gamma_on_255)
        return image, depth

    monkeypatch.setattr(P, "depth_augment", spy)
    labels = SimpleNamespace(read=lambda k, tasks: {"depth": torch.ones(4, 4)})
    ds = _OneView({0: SimpleNamespace(image=torch.zeros(4, 4, 3))})
    split = SimpleNamespace(ds=ds, views=[0], labels=labels, __len__=lambda: 1)
    views = P.AugmentedViews(split, "depth", 0, 512, (2048, 512), (4, 4), gamma_on_255=True)
    views[0]
    assert seen == {"brightness": (0.9, 1.1), "gamma": True}


def test_probe3d_augment_crops_image_and_labels_together():
    h = w = 40
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    code = (ys * w + xs).float()  # each pixel's own index
    image = torch.rand(h, w, 3)
    labels = {"depth": code.clone(), "normals": torch.stack([code, -code, code, code], -1)}
    cropped = jittered = 0
    for seed in range(60):
        img, out = P.probe3d_augment(image, labels, np.random.default_rng(seed))
        assert img.shape == (h, w, 3) and out["depth"].shape == (h, w)
        assert torch.equal(out["normals"][..., 0], out["depth"])  # labels move together
        idx = out["depth"].long()
        rows, cols = idx // w, idx % w
        if not torch.equal(out["depth"], code):
            cropped += 1  # a square of 0.5-1 of the area, resized back by nearest neighbours
            side = int(rows.max() - rows.min() + 1)
            assert side == int(cols.max() - cols.min() + 1)
            assert 0.5 * h * w - 2 * h <= side * side <= h * w
        jittered += not torch.equal(img, image) and torch.equal(out["depth"], code)
    assert 15 <= cropped <= 45  # p 0.5
    assert jittered >= 10  # colour jitter (p 0.8) on the uncropped ones too


def test_probe3d_navi_jitter_acts_after_normalisation_and_clamps():
    image = torch.full((4, 4, 3), 0.1)  # normalised: (0.1 - mean) / std < 0
    for seed in range(20):
        img, _ = P.probe3d_augment(image, {}, np.random.default_rng(seed), "imagenet")
        mean, std = (torch.tensor(v) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        normalised = (img - mean) / std
        assert float(normalised.min()) >= -1e-6 or torch.allclose(img, image)


def test_as_published_and_fixes_lists():
    from fit3d.config import load_config

    paper = load_config([], ["eval.protocol=paper"]).eval
    quirks = P.as_published(paper, ("seg", "depth"), dpt=False)
    assert len(quirks) == 4 and any("0-255" in q for q in quirks)
    assert (
        any("avg_non_ignore" in q for q in quirks) and P.fixes_applied(paper, ("seg",), False) == []
    )
    fixed = load_config([], ["eval.protocol=paper", "eval.fixes=true"]).eval
    assert P.as_published(fixed, ("seg", "depth"), False) == []
    assert len(P.fixes_applied(fixed, ("seg", "depth"), False)) == 4
    fast = load_config([], []).eval
    assert P.as_published(fast, ("seg", "depth"), dpt=False) == []
    old = load_config([], ["eval.probe3d=published"]).eval
    assert len(P.as_published(old, ("depth",), dpt=True)) == 2
    assert "2025" in P.fixes_applied(fast, ("depth",), dpt=True)[0]


def test_parity_options_are_checked_and_resolved():
    from fit3d.config import load_config
    from fit3d.errors import UserError

    for bad in ("eval.probe3d=v2", "eval.fit=crop", "eval.normals_valid=any"):
        with pytest.raises(UserError, match=bad.split("=")[0]):  # the config checks choices
            load_config([], [bad])
    with pytest.raises(UserError, match="paper_gpu_batch"):
        P.check_options(load_config([], ["eval.protocol=paper", "eval.paper_batch_size=15"]).eval)
    P.check_options(load_config([], ["eval.protocol=paper", "eval.fixes=true",
                                     "eval.paper_batch_size=15"]).eval)  # fmt: skip
    ec = load_config([], []).eval
    assert P.empty_rule(ec, "depth", "linear") == "skip"  # FiT3D's toolbox
    assert P.empty_rule(ec, "depth", "dpt") == P.empty_rule(ec, "normals", "linear") == "zero"
    assert P.corr_protocol(ec, "navi") == "navi" and P.corr_protocol(ec, "demo") == "scannet"
