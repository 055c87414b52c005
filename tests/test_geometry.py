"""fit3d.geometry against planted cameras and points: centres, rotation angles and bins, grid
pixels by hand, reprojection against forward projection, the visibility test, and pair selection
on rolled cameras whose relative rotations are known."""

from __future__ import annotations

import math

import pytest
import torch

from fit3d.geometry import (
    ROTATION_BINS,
    camera_centres,
    covisibility,
    grid_pixels,
    relative_rotation,
    reproject,
    rotation_angle,
    rotation_bin,
    select_pairs,
    visible,
)


def _rotation(axis: list[float], degrees: float) -> torch.Tensor:
    """Rotation matrix [3, 3] (float64) about `axis` by `degrees`, as the exponential of the
    skew-symmetric matrix of the scaled axis."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm() * math.radians(degrees)
    skew = torch.tensor(
        [[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64
    )
    return torch.linalg.matrix_exp(skew)


def _viewmat(rot_w2c: torch.Tensor, centre: list[float]) -> torch.Tensor:
    """World-to-camera [4, 4] of a camera at `centre` with world-to-camera rotation `rot_w2c`."""
    vm = torch.eye(4, dtype=torch.float64)
    vm[:3, :3] = rot_w2c
    vm[:3, 3] = -rot_w2c @ torch.tensor(centre, dtype=torch.float64)
    return vm


def _look(centre: list[float]) -> torch.Tensor:
    """World-to-camera of an axis-aligned camera at `centre` looking along +z."""
    vm = torch.eye(4)
    vm[:3, 3] = -torch.tensor(centre)
    return vm


def test_camera_centres():
    vms = torch.stack([_look([0.0, 0.0, 0.0]), _look([2.0, 0.0, 0.0]), _look([1.0, 3.0, 0.0])])
    assert torch.allclose(camera_centres(vms), torch.tensor([[0.0, 0, 0], [2, 0, 0], [1, 3, 0]]))
    rotated = torch.stack(
        [
            _viewmat(_rotation([1.0, 2.0, 3.0], 70.0), [0.5, -1.0, 2.0]),
            _viewmat(_rotation([0.0, 1.0, 0.0], 180.0), [-3.0, 0.0, 1.0]),
        ]
    )
    want = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(camera_centres(rotated), want)


@pytest.mark.parametrize("degrees", [0.0, 1.0, 30.0, 90.0, 135.0, 179.5])
def test_rotation_angle_of_axis_angle_rotations(degrees: float):
    rots = torch.stack(
        [_rotation(axis, degrees) for axis in ([1.0, 0, 0], [0, 1.0, 0], [1.0, -2.0, 0.5])]
    )
    got = rotation_angle(rots)  # [3]
    assert got.shape == (3,)
    torch.testing.assert_close(
        got, torch.full((3,), degrees, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_relative_rotation_ignores_translation_and_order():
    axis = [0.3, 1.0, -0.2]
    v0 = _viewmat(_rotation(axis, 10.0), [0.0, 0.0, 0.0])
    v1 = _viewmat(_rotation(axis, 47.0), [5.0, -2.0, 1.0])
    assert relative_rotation(v0, v1) == pytest.approx(37.0, abs=1e-5)
    assert relative_rotation(v1, v0) == pytest.approx(37.0, abs=1e-5)
    assert relative_rotation(v0.float(), v0.float()) == pytest.approx(0.0, abs=1e-2)


def test_rotation_bins_are_half_open_and_the_last_closed():
    assert [rotation_bin(d) for d in (0.0, 14.99, 15.0, 29.9, 30.0, 59.9, 60.0, 179.0, 180.0)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        3,
    ]
    assert len(ROTATION_BINS) == 4 and ROTATION_BINS[-1][1] == 180.0


def test_grid_pixels_by_hand():
    # 9 x 11 image, stride 3: 3 rows centred at y = 1, 4, 7; 3 columns of 11/3 px centred at
    # x = 1.33, 5, 8.67 -> pixels 1, 5, 9; row-major (x, y)
    want = [[x, y] for y in (1, 4, 7) for x in (1, 5, 9)]
    assert grid_pixels(9, 11, 3).tolist() == want
    # a ViT grid: 28 x 42 image, patch 14 -> 2 x 3 tokens; each pixel is one nearest to its
    # token's centre (k + 0.5) * 14 - 0.5 (ties either way)
    px = grid_pixels(28, 42, 14).double()  # [6, 2]
    cy, cx = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], 1).double() * 14 + 6.5
    assert px.shape == (6, 2) and ((px - centres).abs() <= 0.5).all()
    # an image smaller than the stride still has one cell, centred on the image
    small = grid_pixels(2, 3, 8).double()
    assert small.shape == (1, 2) and ((small - torch.tensor([[1.0, 0.5]])).abs() <= 0.5).all()


def test_reproject_matches_forward_projection_of_planted_points():
    gen = torch.Generator().manual_seed(0)
    world = (
        torch.rand(50, 3, generator=gen, dtype=torch.float64) * 2
        - 1
        + torch.tensor([0.0, 0.0, 6.0], dtype=torch.float64)
    )  # [50, 3] in front of both cameras
    v0 = _viewmat(_rotation([0.2, 1.0, 0.1], 8.0), [0.1, -0.2, 0.0])
    v1 = _viewmat(_rotation([1.0, 0.3, 0.0], -12.0), [0.8, 0.3, -0.5])
    K0 = torch.tensor([[300.0, 0, 160], [0, 310.0, 120], [0, 0, 1]], dtype=torch.float64)
    K1 = torch.tensor([[250.0, 0, 100], [0, 250.0, 90], [0, 0, 1]], dtype=torch.float64)

    def project(vm: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = world @ vm[:3, :3].T + vm[:3, 3]  # [50, 3]
        uv = cam @ K.T
        return uv[:, :2] / uv[:, 2:] - 0.5, cam[:, 2]  # pixel-index coordinates, depth

    xy0, z0 = project(v0, K0)
    want_xy1, want_z1 = project(v1, K1)
    xy1, z1 = reproject(xy0, z0, K0, K1, v0.float(), v1.float())
    assert xy1.dtype == torch.float64
    torch.testing.assert_close(xy1, want_xy1, atol=2e-3, rtol=0)
    torch.testing.assert_close(z1, want_z1, atol=1e-5, rtol=1e-5)


def test_visible_by_hand():
    depth1 = torch.full((4, 6), 5.0)
    depth1[0, 0] = 0.0  # invalid depth
    xy1 = torch.tensor(
        [
            [3.4, 2.6],  # pixel (3, 3), depth agrees: seen
            [3.0, 1.0],  # 4% nearer than the surface: within 5%, seen
            [3.0, 1.0],  # 8% farther: behind the surface, occluded
            [6.2, 1.0],  # rounds to x = 6: outside a 6-wide image
            [1.0, 1.0],  # behind the camera
            [0.2, 0.3],  # pixel (0, 0) has no depth
        ],
        dtype=torch.float64,
    )
    z1 = torch.tensor([5.0, 4.8, 5.4, 5.0, -5.0, 5.0], dtype=torch.float64)
    assert visible(xy1, z1, depth1).tolist() == [True, True, False, False, False, False]
    assert visible(xy1, z1, depth1, rel_tol=0.1).tolist() == [True, True, True, False, False, False]


def test_covisibility_of_a_sideways_shift_is_the_analytic_fraction():
    """A wall at depth 4 filling a 64 x 48 view; the camera moved 0.5 sideways sees it shifted
    by f * 0.5 / 4 = 10 px, so the grid columns within 10 px of one edge fall outside."""
    K = torch.tensor([[80.0, 0, 32], [0, 80.0, 24], [0, 0, 1]])
    depth = torch.full((48, 64), 4.0)
    v0, v1 = _look([0.0, 0.0, 0.0]), _look([0.5, 0.0, 0.0])
    xs = grid_pixels(48, 64, 8)[:, 0]  # [N] grid columns
    want = float(((xs - 10 >= -0.5) & (xs - 10 < 63.5)).double().mean())
    assert 0.5 < want < 1.0
    assert covisibility(depth, depth, K, K, v0, v1) == pytest.approx(want)
    assert covisibility(torch.zeros(48, 64), depth, K, K, v0, v1) == 0.0  # no valid depth


def _rolled(degrees: float) -> torch.Tensor:
    """A camera at the origin rolled about its optical axis (+z) by `degrees`."""
    return _viewmat(_rotation([0.0, 0.0, 1.0], degrees), [0.0, 0.0, 0.0]).float()


def test_select_pairs_draws_round_robin_over_the_rotation_bins():
    """Six cameras rolled about the optical axis in front of a wall at depth 3: every pair sees
    most of the wall, and its relative rotation is the difference of the rolls (planted)."""
    rolls = [0.0, 10.0, 20.0, 45.0, 90.0, 170.0]
    vms = [_rolled(r) for r in rolls]
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]])
    depths = [torch.full((64, 64), 3.0)] * len(rolls)
    truth = {(i, j): abs(rolls[j] - rolls[i]) for i in range(len(rolls)) for j in range(i + 1, 6)}
    everything = select_pairs(depths, [K] * 6, vms, num_pairs=100, min_overlap=0.3)
    assert sorted((i, j) for i, j, _ in everything) == sorted(truth)
    for i, j, rot in everything:
        assert rot == pytest.approx(truth[(i, j)], abs=1e-3)
    four = select_pairs(depths, [K] * 6, vms, num_pairs=4, min_overlap=0.3, seed=3)
    assert len(four) == 4
    assert sorted(rotation_bin(truth[(i, j)]) for i, j, _ in four) == [0, 1, 2, 3]
    assert four == select_pairs(depths, [K] * 6, vms, num_pairs=4, min_overlap=0.3, seed=3)
    # of a square image's grid, only a quarter turn loses no pixel: one pair at overlap 1
    assert [(i, j) for i, j, _ in select_pairs(depths, [K] * 6, vms, 4, min_overlap=1.0)] == [
        (0, 4)
    ]
