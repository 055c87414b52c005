"""Probe losses against hand-computed values; heads learn separable synthetic problems."""

import math

import pytest
import torch
import torch.nn.functional as F

from fit3d.eval.probes import (
    TASKS,
    DepthHead,
    angular_nll,
    evaluate_probe,
    gradient_loss,
    resample,
    sig_loss,
    train_probe,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with other processes on the cores, a second thread only adds hand-off waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sig_loss_is_scale_invariant_up_to_lambda():
    gt = torch.rand(2, 5, 7) + 0.5
    gt[0, 0, 0] = 0.0  # invalid pixel ignored
    assert float(sig_loss(2 * gt, gt)) == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-4)


def test_gradient_loss_hand_computed():
    gt = torch.ones(1, 1, 3)
    pred = torch.tensor([[[1.0, math.e, math.e]]])  # log difference 0, 1, 1
    # stride 1: (1 + 0) / 2 pairs; stride 2: columns 0, 2 -> 1 / 1 pair; strides 4, 8: no pairs
    assert float(gradient_loss(pred, gt)) == pytest.approx(0.5 + 1.0, rel=1e-5)
    gt = torch.rand(1, 4, 4) + 0.5
    assert float(gradient_loss(3 * gt, gt)) == pytest.approx(0.0, abs=1e-6)


def test_angular_nll_hand_computed():
    t = math.radians(60.0)
    out = torch.tensor([[[[0.0, math.sin(t), math.cos(t), 2.0]]]])  # [1, 1, 1, 4]
    gt = torch.tensor([[[[0.0, 0.0, 1.0]]]])
    ref = -math.log(5.0) + 2.0 * t + math.log1p(math.exp(-2.0 * math.pi))
    assert float(angular_nll(out, gt)) == pytest.approx(ref, rel=1e-5)


def test_depth_head_conv_before_upsample_is_exact():
    head = DepthHead(6, max_depth=5.0).eval()
    x = torch.randn(2, 6, 3, 4)
    up = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    p = torch.relu(head.conv(head.bn(up))) + 0.1
    ref = ((p / p.sum(1, keepdim=True)) * head.centres[None, :, None, None]).sum(1)
    torch.testing.assert_close(head(x, (12, 16)), ref, rtol=1e-5, atol=1e-5)


def _synthetic(n: int, gen: torch.Generator):
    """Features [n, 8, 4, 6]; class = argmax of 3 channels; depth = 1 + 0.5 * channel 3."""
    x = torch.randn(n, 8, 4, 6, generator=gen)
    return x, x[:, :3].argmax(1), 2.0 + 0.5 * x[:, 3].clamp(-2, 2)


def test_probes_learn_separable_problems():
    gen = torch.Generator().manual_seed(0)
    x, seg, depth = _synthetic(48, gen)
    xt, segt, deptht = _synthetic(16, gen)
    task = TASKS["seg"]
    head = train_probe(task.head(8, num_classes=3), task, x, seg, 1e-1, 20, 8, seed=0)
    assert evaluate_probe(head, task, xt, segt, num_classes=3)["miou"] > 0.7
    task = TASKS["depth"]
    head = train_probe(task.head(8, max_depth=4.0), task, x, depth, 3e-2, 20, 8, seed=0)
    m = evaluate_probe(head, task, xt, deptht)
    assert m["rmse"] < 0.2  # a constant prediction gives ~0.45
    assert m["delta1"] > 0.8


@pytest.mark.parametrize("size", [(16, 24), (13, 22)])
def test_strided_resample_matches_full_resolution(size):
    x = torch.randn(2, 5, 4, 6)
    full = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resample(x, size, 3), full[:, :, 1::3, 1::3])
    head = TASKS["normals"].head(5).eval()
    torch.testing.assert_close(head(x, size, 2), head(x, size)[:, 1::2, 1::2])
