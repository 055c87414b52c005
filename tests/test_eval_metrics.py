"""Probe metrics against hand-computed cases (and torchmetrics for the confusion matrix)."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from fit3d.eval.metrics import (
    DEPTH_KEYS,
    NORMAL_KEYS,
    aligned_depth_per_image,
    confusion_matrix,
    correspondence_recall,
    depth_metrics,
    depth_per_image,
    mean_metrics,
    navi_recall,
    normal_metrics,
    normal_per_image,
    scale_shift,
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


def test_image_without_valid_depth_is_skipped_or_averaged_in_as_zero():
    pred = torch.tensor([[[1.0, 2.0]], [[3.0, 3.0]]])
    gt = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])  # image 1 has no valid pixel
    # image 0: errors 0 and 1 -> RMSE sqrt(1/2), delta1 1/2
    skip = mean_metrics(depth_per_image(pred, gt, empty="skip"), DEPTH_KEYS)
    assert skip["rmse"] == pytest.approx(math.sqrt(0.5)) and skip["delta1"] == pytest.approx(0.5)
    # Probe3D: the empty image's valid count is clamped to 1, so every metric of it is 0
    zero = mean_metrics(depth_per_image(pred, gt, empty="zero"), DEPTH_KEYS)
    assert zero["rmse"] == pytest.approx(math.sqrt(0.5) / 2)
    assert zero["delta1"] == pytest.approx(0.25)
    normals = torch.zeros(2, 1, 2, 3)
    normals[0, ..., 2] = 1.0  # image 1: no normal anywhere
    got = normal_per_image(normals, normals, empty="zero")
    assert len(got) == 2 and got[1] == dict.fromkeys(NORMAL_KEYS, 0.0)
    assert len(normal_per_image(normals, normals)) == 1


def test_depth_masked_normals_score_a_pixel_without_normal_at_90_degrees():
    # 4 pixels with depth; pixel 3 has no ground-truth normal (zero vector) but counts (Probe3D)
    pred = torch.tensor([[0.0, 0.0, 1.0]] * 4)[None, None]  # [1, 1, 4, 3]
    xyz = torch.tensor([[0.0, 0.0, 1.0]] * 3 + [[0.0, 0.0, 0.0]])
    gt = torch.cat([xyz, torch.ones(4, 1)], -1)[None, None]  # validity channel: depth > 0
    m = normal_metrics(pred, gt)
    assert m["within_11"] == pytest.approx(75.0) and m["within_30"] == pytest.approx(75.0)
    assert m["ang_rmse"] == pytest.approx(math.sqrt(90.0**2 / 4))
    # counted by the normal itself instead: the pixel without normal drops out
    assert normal_metrics(pred, xyz[None, None])["ang_rmse"] == pytest.approx(0.0, abs=1e-6)
    gt_no_depth = gt.clone()
    gt_no_depth[..., 0, 3] = 0.0  # pixel 0 has no depth: it does not count even with a normal
    assert normal_metrics(pred, gt_no_depth)["within_11"] == pytest.approx(200 / 3)


def test_scale_shift_matches_least_squares():
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(6, 7, generator=gen) + 0.5
    gt = torch.rand(6, 7, generator=gen) * 3
    gt[gt < 0.6] = 0  # invalid pixels are left out of the fit
    m = gt > 0
    a = torch.stack([pred[m].double(), torch.ones(int(m.sum()), dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(a, gt[m].double()[:, None]).solution[:, 0]
    s, t = scale_shift(pred, gt)
    assert (s, t) == pytest.approx((float(ref[0]), float(ref[1])), rel=1e-9)
    assert scale_shift(torch.ones(3, 3), torch.ones(3, 3)) == (1.0, 0.0)  # singular: identity


def test_aligned_metrics_recover_a_planted_scale_and_shift():
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 5, 6, generator=gen) * 4 + 0.5
    gt[0, 0, :3] = 0  # a few invalid pixels
    pred = (gt - 0.7) / 2.5  # gt = 2.5 * pred + 0.7 exactly on the valid pixels
    pred[0, 0, :3] = 100.0  # invalid pixels must not move the fit
    plain = mean_metrics(depth_per_image(pred, gt), DEPTH_KEYS)
    assert plain["delta1"] < 0.5 and plain["rmse"] > 0.5
    aligned = aligned_depth_per_image(pred, gt)
    for m in aligned:
        assert m["aligned_rmse"] == pytest.approx(0.0, abs=1e-6)  # fp32 inputs
        assert m["aligned_delta1"] == m["aligned_delta3"] == 1.0
    # a shifted copy: rmse of the residual after the best fit, by hand on one image
    p = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    g = torch.tensor([[2.0, 2.0, 4.0, 4.0]])
    # least squares by hand: s = cov / var = 4 / 5, t = 3 - 0.8 * 2.5 = 1; fit 1.8 2.6 3.4 4.2,
    # residuals 0.2 -0.6 0.6 -0.2 -> RMSE sqrt(0.8 / 4); ratios 1.8/2 2.6/2 3.4/4 4.2/4 < 1.25
    one = aligned_depth_per_image(p[None], g[None])[0]
    assert one["aligned_rmse"] == pytest.approx(math.sqrt(0.2))
    assert one["aligned_delta1"] == pytest.approx(0.75)  # 2.6 / 2 = 1.3 is the one above
    assert aligned_depth_per_image(p[None], torch.zeros(1, 1, 4))[0]["aligned_rmse"] == 0.0


def test_a_180_degree_pair_falls_in_no_bin_as_in_probe3d():
    errors = [torch.tensor([1.0, 30.0]), torch.tensor([1.0, 1.0]), torch.tensor([30.0, 30.0])]
    m = correspondence_recall(errors, torch.tensor([180.0, 179.9, 60.0]))
    assert m["recall_10px_rot60-180"] == pytest.approx((1.0 + 0.0) / 2)  # the 180 pair is out
    assert m["recall_10px"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # but counts overall
    assert math.isnan(
        correspondence_recall(errors[:1], torch.tensor([180.0]))["recall_10px_rot60-180"]
    )


def test_navi_recall_hand_computed():
    err3d = [torch.tensor([0.005, 0.015, 0.03, 0.2]), torch.tensor([0.001, 0.001])]
    err2d = [torch.tensor([1.0, 10.0, 30.0, 60.0]), torch.tensor([4.0, 49.0])]
    m = navi_recall(err3d, err2d, torch.tensor([45.0, 120.0]))
    assert m["recall_1cm"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["recall_2cm"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["recall_5cm"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["recall2d_5px"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["recall2d_25px"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["recall2d_50px"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["recall_2cm_rot30-60"] == pytest.approx(0.5)
    for lo, hi in ((0, 30), (60, 90), (90, 120)):  # 120 deg is past the last bin
        assert math.isnan(m[f"recall_2cm_rot{lo}-{hi}"])
