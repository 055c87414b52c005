"""Probe metrics against hand-computed cases (and torchmetrics for the confusion matrix)."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from fit3d.eval.metrics import (
    confusion_matrix,
    correspondence_recall,
    depth_metrics,
    normal_metrics,
    seg_metrics,
)
from fit3d.geometry import rotation_angle


def test_seg_metrics_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    m = seg_metrics(confusion_matrix(pred, target, 3))
    # class 0: I=1, U=2; class 1: I=2, U=4; class 2: I=0, U=1 -> IoU 1/2, 1/2, 0
    assert m["miou"] == pytest.approx(1 / 3)
    assert m["macc"] == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)
    assert m["aacc"] == pytest.approx(3 / 5)


def test_seg_metrics_absent_and_spurious_classes():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 3])
    m = seg_metrics(confusion_matrix(pred, target, 5))
    # class 2, 4: absent everywhere -> skipped; class 3: predicted, never labelled -> IoU 0
    assert m["miou"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert m["macc"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["aacc"] == pytest.approx(3 / 4)


def test_confusion_matches_torchmetrics():
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (4, 9, 7), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    pred = torch.randint(0, 6, (4, 9, 7), generator=gen)
    ref = MulticlassConfusionMatrix(num_classes=6, ignore_index=255)(pred, target)
    assert torch.equal(confusion_matrix(pred, target, 6), ref)


def test_depth_metrics_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 2.0], [5.0, 9.0]]])
    gt = torch.tensor([[[1.0, 1.0], [3.0, 2.0]], [[2.0, 2.0], [5.0, 0.0]]])
    m = depth_metrics(pred, gt)
    # image 0: errors 0,1,0,2 -> RMSE sqrt(5/4), AbsRel (0+1+0+1)/4, delta1 2/4; image 1 exact
    assert m["rmse"] == pytest.approx(math.sqrt(1.25) / 2)
    assert m["absrel"] == pytest.approx(0.5 / 2)
    assert m["delta1"] == pytest.approx((0.5 + 1.0) / 2)


def test_all_depth_metrics_of_the_toolbox_hand_computed():
    pred = torch.tensor([[[2.0, 1.0, 1.3, 7.0]]])
    gt = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])  # last pixel invalid
    m = depth_metrics(pred, gt)
    assert m["delta1"] == pytest.approx(1 / 3)  # ratios 2, 1, 1.3
    assert m["delta2"] == pytest.approx(2 / 3)  # 1.3 < 1.5625
    assert m["delta3"] == pytest.approx(2 / 3)  # 2 > 1.953125
    assert m["absrel"] == pytest.approx((1 + 0 + 0.3) / 3)
    assert m["sqrel"] == pytest.approx((1 + 0 + 0.09) / 3)
    logs = [math.log(2.0), 0.0, math.log(1.3)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 3))
    assert m["log10"] == pytest.approx(sum(abs(v) for v in logs) / math.log(10) / 3)
    mean = sum(logs) / 3
    silog = math.sqrt(sum(v * v for v in logs) / 3 - mean**2) * 100
    assert m["silog"] == pytest.approx(silog)


def test_normal_metrics_hand_computed():
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 45.0]))
    pred = torch.stack([torch.zeros(4), -torch.sin(angles), torch.cos(angles)], -1) * 3.0
    gt = torch.tensor([0.0, 0.0, 1.0]).expand(4, 3).clone()
    gt_img = torch.cat([gt, torch.zeros(1, 3)])[None, None]  # [1, 1, 5, 3]; last pixel invalid
    pred_img = torch.cat([pred, torch.ones(1, 3)])[None, None]
    m = normal_metrics(pred_img, gt_img)
    assert m["within_11"] == pytest.approx(50.0)
    assert m["within_22"] == pytest.approx(75.0)
    assert m["within_30"] == pytest.approx(75.0)
    assert m["ang_rmse"] == pytest.approx(math.sqrt((0 + 100 + 400 + 2025) / 4), rel=1e-6)


def test_rotation_angle_and_recall_bins():
    t = math.radians(30.0)
    rz = torch.tensor([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    assert float(rotation_angle(rz)) == pytest.approx(30.0, abs=1e-4)
    errors = [torch.tensor([1.0, 6.0, 12.0, 30.0]), torch.tensor([1.0, 1.0])]
    m = correspondence_recall(errors, torch.tensor([5.0, 70.0]))
    assert m["recall_5px"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["recall_10px"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["recall_20px"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["recall_10px_rot0-15"] == pytest.approx(0.5)
    assert m["recall_10px_rot60-180"] == pytest.approx(1.0)
    assert math.isnan(m["recall_10px_rot15-30"])
