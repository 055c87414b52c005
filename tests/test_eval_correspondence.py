"""Correspondence evaluator on synthetic view pairs with exactly known geometry."""

import math

import torch

from fit3d.eval.correspondence import pair_errors
from fit3d.eval.metrics import correspondence_recall
from fit3d.geometry import covisibility, grid_pixels, select_pairs

H, W, F = 224, 336, 300.0
K = torch.tensor([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])  # pixel centres at +0.5


def _pose(yaw_deg: float, tx: float) -> torch.Tensor:
    """World-to-camera [4, 4]: camera rotated about y by yaw, centred at (tx, 0, 0)."""
    t = math.radians(yaw_deg)
    r = torch.tensor([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    c2w = torch.eye(4)
    c2w[:3, :3], c2w[0, 3] = r, tx
    return torch.linalg.inv(c2w)


def _plane_points(viewmat: torch.Tensor, xy: torch.Tensor, z_plane: float = 4.0) -> torch.Tensor:
    """World points [N, 3] where the rays through pixel indices xy [N, 2] meet z = z_plane."""
    c2w = torch.linalg.inv(viewmat)
    uv1 = torch.cat([xy.float() + 0.5, torch.ones(len(xy), 1)], 1)
    rays = torch.linalg.solve(K, uv1.T)  # [3, N]
    dirs, origin = c2w[:3, :3] @ rays, c2w[:3, 3:]
    s = (z_plane - origin[2]) / dirs[2]
    return (origin + dirs * s).T


def _depth(viewmat: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pts = _plane_points(viewmat, torch.stack([xs.reshape(-1), ys.reshape(-1)], 1))
    return (viewmat[:3, :3] @ pts.T + viewmat[:3, 3:])[2].reshape(H, W)


def _position_features(viewmat: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Random Fourier features of the 3D point seen at each 1/4-grid pixel: [2D, H/4, W/4]."""
    pts = _plane_points(viewmat, grid_pixels(H, W, 4))  # [N, 3]
    phase = pts @ freqs.T  # [N, D]
    feat = torch.cat([phase.cos(), phase.sin()], 1)
    return feat.T.reshape(-1, H // 4, W // 4)


def test_exact_position_features_give_full_recall_and_shuffled_near_chance():
    gen = torch.Generator().manual_seed(0)
    freqs = torch.randn(512, 3, generator=gen) / 0.03
    v0, v1 = _pose(0.0, 0.0), _pose(5.0, 0.2)
    f0, f1 = _position_features(v0, freqs), _position_features(v1, freqs)
    err = pair_errors(f0, f1, _depth(v0), K, K, v0, v1, (H, W))
    assert len(err) == 1000
    rec = correspondence_recall([err], torch.tensor([5.0]))
    assert rec["recall_5px"] == 1.0

    perm = torch.randperm(f1[0].numel(), generator=gen)
    shuffled = f1.flatten(1)[:, perm].reshape(f1.shape)
    err = pair_errors(f0, shuffled, _depth(v0), K, K, v0, v1, (H, W))
    rec = correspondence_recall([err], torch.tensor([5.0]))
    chance = math.pi * 20**2 / (H * W)  # a 20 px disc over the image: ~1.7%
    assert rec["recall_20px"] < 3 * chance


def test_covisibility_and_pair_selection():
    v0, v1, back = _pose(0.0, 0.0), _pose(5.0, 0.2), _pose(180.0, 0.0)
    d0, d1 = _depth(v0), _depth(v1)
    assert covisibility(d0, d0, K, K, v0, v0) == 1.0
    assert 0.7 < covisibility(d0, d1, K, K, v0, v1) < 1.0
    empty = torch.zeros(H, W)  # the camera facing away sees no point of the plane
    assert covisibility(d0, empty, K, K, v0, back) == 0.0
    pairs = select_pairs([d0, d1, empty], [K] * 3, [v0, v1, back], num_pairs=5)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert abs(pairs[0][2] - 5.0) < 1e-3
