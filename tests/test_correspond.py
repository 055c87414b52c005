"""fit3d.correspond against independent analytic references: plane-induced homographies and
ray-cast depth maps (no use of fit3d.geometry here), an occluder seen from two views, a dense
layer of opaque Gaussians rendered by the CPU renderer, planted precision counts, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fit3d.correspond import (
    _sample_depth,
    correspondence_precision,
    dense_correspondences,
    match_reference,
    render_depth,
    resize_depth,
)
from fit3d.gaussians import LiftedScene

W, H, F = 64, 48, 50.0
EPS = 1e-6


def _rot(axis: list[float], degrees: float) -> torch.Tensor:
    """Rotation [3, 3] float64 about `axis` by `degrees` (Rodrigues)."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    th = math.radians(degrees)
    skew = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return (
        torch.eye(3, dtype=torch.float64) + math.sin(th) * skew + (1 - math.cos(th)) * skew @ skew
    )


def _viewmat(rot_w2c: torch.Tensor, centre: list[float]) -> torch.Tensor:
    """World-to-camera [4, 4] float64 of a camera at `centre` with rotation `rot_w2c`."""
    vm = torch.eye(4, dtype=torch.float64)
    vm[:3, :3] = rot_w2c
    vm[:3, 3] = -rot_w2c @ torch.tensor(centre, dtype=torch.float64)
    return vm


def _K(f: float = F, w: int = W, h: int = H, dx: float = 0.3, dy: float = -0.2) -> torch.Tensor:
    return torch.tensor([[f, 0.0, w / 2 + dx], [0.0, f, h / 2 + dy], [0.0, 0.0, 1.0]]).double()


def _rays(K: torch.Tensor, vm: torch.Tensor, w: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera centre [3] and world ray directions [h, w, 3] through pixel centres (x+.5, y+.5),
    scaled so that the ray parameter is the depth along the optical axis."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pix = torch.stack([xs + 0.5, ys + 0.5, torch.ones(h, w)], -1).double()  # [h, w, 3]
    cam = pix @ torch.linalg.inv(K).T  # [h, w, 3], z = 1
    rot = vm[:3, :3]
    centre = -rot.T @ vm[:3, 3]
    return centre, cam @ rot  # world dirs = R^T cam


def _hit_plane(
    centre: torch.Tensor, dirs: torch.Tensor, n: list[float], d: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray parameter (= depth) [...] and points [..., 3] where rays meet the plane n.X = d."""
    nv = torch.tensor(n, dtype=torch.float64)
    s = (d - nv @ centre) / (dirs @ nv)
    return s, centre + s[..., None] * dirs


def _project(
    K: torch.Tensor, vm: torch.Tensor, pts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [..., 3] -> (pixel-index coordinates [..., 2], camera z [...])."""
    cam = pts @ vm[:3, :3].T + vm[:3, 3]
    uv = cam @ K.T
    return uv[..., :2] / uv[..., 2:] - 0.5, cam[..., 2]


def _inside_status(xy: torch.Tensor, z: torch.Tensor, w: int, h: int) -> tuple[torch.Tensor, ...]:
    """(clearly inside and in front, clearly outside or behind) by nearest pixel, [...] bool."""
    x, y = xy[..., 0], xy[..., 1]
    inside = (z > 0) & (x > -0.5 + EPS) & (x < w - 0.5 - EPS) & (y > -0.5 + EPS)
    inside &= y < h - 0.5 - EPS
    outside = (z <= 0) | (x < -0.5 - EPS) | (x > w - 0.5 + EPS) | (y < -0.5 - EPS)
    outside |= y > h - 0.5 + EPS
    return inside, outside


# ----------------------------------------------------------------------------------------------
# 1. a tilted textured plane: the correspondences are its homography, all of them


PLANE_N = [0.1, -0.2, 1.0]
PLANE_D = 4.0
VM_A = _viewmat(_rot([0.0, 1.0, 0.0], 5.0), [0.0, 0.0, 0.0])
VM_B = _viewmat(_rot([0.2, 1.0, 0.1], 6.0), [0.8, -0.3, 0.2])
K_A, K_B = _K(), _K(f=46.0, dx=-0.7, dy=0.4)


def _plane_depth(K: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    centre, dirs = _rays(K, vm, W, H)
    s, _ = _hit_plane(centre, dirs, PLANE_N, PLANE_D)
    return torch.where(s > 0, s, torch.zeros_like(s))  # [H, W]


def _homography() -> torch.Tensor:
    """H = K_b (R + t n_a^T / d_a) K_a^-1 for the plane n_a . X_a = d_a in camera-a coordinates."""
    n_w = torch.tensor(PLANE_N, dtype=torch.float64)
    rot_a, t_a = VM_A[:3, :3], VM_A[:3, 3]
    rot_b, t_b = VM_B[:3, :3], VM_B[:3, 3]
    n_a = rot_a @ n_w
    d_a = PLANE_D + n_a @ t_a
    rot = rot_b @ rot_a.T
    t = t_b - rot @ t_a
    return K_B @ (rot + torch.outer(t, n_a) / d_a) @ torch.linalg.inv(K_A)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plane_matches_homography_with_full_recall(dtype: torch.dtype) -> None:
    depth_a, depth_b = _plane_depth(K_A, VM_A), _plane_depth(K_B, VM_B)
    assert (depth_a > 0).all() and (depth_b > 0).all()
    hom = _homography()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pix = torch.stack([xs + 0.5, ys + 0.5, torch.ones(H, W)], -1).double()  # [H, W, 3]
    q = pix @ hom.T
    ref_b = q[..., :2] / q[..., 2:] - 0.5  # [H, W, 2]
    inside, outside = _inside_status(ref_b, q[..., 2], W, H)
    assert inside.sum() > 0.5 * H * W and outside.sum() > 50  # part of a falls outside b

    cast = [t.to(dtype) for t in (depth_a, depth_b, K_A, K_B, VM_A, VM_B)]
    xy_a, xy_b = dense_correspondences(*cast)
    assert xy_a.dtype == torch.long and xy_b.dtype == dtype
    got = torch.zeros(H, W, dtype=torch.bool)
    got[xy_a[:, 1], xy_a[:, 0]] = True
    assert got[inside].all(), "recall 1 on the clearly inside pixels"
    assert not got[outside].any()
    err = (xy_b.double() - ref_b[xy_a[:, 1], xy_a[:, 0]]).norm(dim=1)
    assert err.max() < 1e-3


def test_plane_reverse_direction_is_the_inverse_homography() -> None:
    depth_a, depth_b = _plane_depth(K_A, VM_A), _plane_depth(K_B, VM_B)
    xy_b, xy_a = dense_correspondences(depth_b, depth_a, K_B, K_A, VM_B, VM_A)
    pix = torch.cat([xy_b.double() + 0.5, torch.ones(len(xy_b), 1, dtype=torch.float64)], 1)
    q = pix @ torch.linalg.inv(_homography()).T
    assert len(xy_b) > 0.5 * H * W
    assert ((q[:, :2] / q[:, 2:] - 0.5) - xy_a).norm(dim=1).max() < 1e-6


def test_depth_sampling_is_exact_on_planes_and_never_blends_across_edges() -> None:
    """The cycle check's depth at a float location: inverse-depth bilinear is exact on a plane
    (inverse depth is affine in the pixel coordinates), also extrapolated half a pixel past the
    border; across a depth step it takes the nearest pixel's depth."""
    depth_b = _plane_depth(K_B, VM_B)
    xy = torch.rand(500, 2, dtype=torch.float64) * torch.tensor([W, H]) - 0.5  # whole image
    xy = xy.clamp(max=torch.tensor([W - 0.5 - EPS, H - 0.5 - EPS], dtype=torch.float64))
    centre, _ = _rays(K_B, VM_B, 1, 1)
    pix = torch.cat([xy + 0.5, torch.ones(500, 1, dtype=torch.float64)], 1)
    dirs = (pix @ torch.linalg.inv(K_B).T) @ VM_B[:3, :3]
    exact, _ = _hit_plane(centre, dirs, PLANE_N, PLANE_D)
    assert (_sample_depth(depth_b, xy, 0.05) - exact).abs().max() < 1e-9
    step = torch.full((4, 4), 2.0, dtype=torch.float64)
    step[:, 2:] = 3.0
    at = torch.tensor([[1.4, 1.5], [1.6, 1.5], [0.3, 0.2]], dtype=torch.float64)
    assert _sample_depth(step, at, 0.05).tolist() == [2.0, 3.0, 2.0]


# ----------------------------------------------------------------------------------------------
# 2. occlusion: a small rectangle in front of a back plane, seen by both cameras with parallax

BACK_Z, OCC_X, OCC_Y, OCC_HALF = 4.0, 0.2, 0.0, (0.3, 0.25)
VM_C = _viewmat(_rot([0.0, 1.0, 0.0], 10.0), [1.2, 0.1, 0.0])


def _occ_margin(pts: torch.Tensor) -> torch.Tensor:
    """Signed distance [...] (> 0 inside) of points on the occluder plane to its rectangle."""
    return torch.minimum(
        OCC_HALF[0] - (pts[..., 0] - OCC_X).abs(), OCC_HALF[1] - (pts[..., 1] - OCC_Y).abs()
    )


def _two_plane_depth(
    K: torch.Tensor, vm: torch.Tensor, occ_z: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray-cast depth [H, W] of back plane + occluder rectangle, first-hit points [H, W, 3] and
    which pixels see the occluder [H, W]."""
    centre, dirs = _rays(K, vm, W, H)
    s_back, p_back = _hit_plane(centre, dirs, [0.0, 0.0, 1.0], BACK_Z)
    s_occ, p_occ = _hit_plane(centre, dirs, [0.0, 0.0, 1.0], occ_z)
    on_occ = (s_occ > 0) & (_occ_margin(p_occ) > 0)
    depth = torch.where(on_occ, s_occ, s_back)
    pts = torch.where(on_occ[..., None], p_occ, p_back)
    return depth, pts, on_occ


def _occlusion_status(
    K: torch.Tensor, occ_z: float, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per a pixel: (clearly visible in c, clearly hidden from c (inside c's image but occluded),
    reference c location [H, W, 2]), with an ambiguous band of `margin` (world units on the
    occluder plane) around the occluder's edges left out of both."""
    _, pts, on_occ = _two_plane_depth(K, VM_A, occ_z)
    ref_c, z_c = _project(K, VM_C, pts)
    inside, _ = _inside_status(ref_c, z_c, W, H)
    centre_c = -VM_C[:3, :3].T @ VM_C[:3, 3]
    s = (occ_z - centre_c[2]) / (pts[..., 2] - centre_c[2])  # segment c -> point meets occluder
    crossing = _occ_margin(centre_c + s[..., None] * (pts - centre_c))
    on_back = ~on_occ
    hidden = on_back & (s > 0) & (s < 1) & (crossing > margin) & inside
    seen_back = on_back & ((s <= 0) | (s >= 1) | (crossing < -margin))
    seen_occ = on_occ & (_occ_margin(pts) > margin)
    return (seen_back | seen_occ) & inside, hidden, ref_c


def test_occluded_pixels_are_rejected_and_visible_ones_kept() -> None:
    occ_z = 2.5
    depth_a, _, _ = _two_plane_depth(K_A, VM_A, occ_z)
    depth_c, _, on_occ_c = _two_plane_depth(K_A, VM_C, occ_z)
    seen, hidden, ref_c = _occlusion_status(K_A, occ_z, margin=0.1)  # 0.1 m ~ 2 px at z = 2.5
    assert hidden.sum() >= 30 and on_occ_c.sum() >= 50
    xy_a, xy_c = dense_correspondences(depth_a, depth_c, K_A, K_A, VM_A, VM_C)
    got = torch.zeros(H, W, dtype=torch.bool)
    got[xy_a[:, 1], xy_a[:, 0]] = True
    assert got[seen].all()
    assert not got[hidden].any()
    assert (xy_c - ref_c[xy_a[:, 1], xy_a[:, 0]]).norm(dim=1).max() < 1e-3


def test_cycle_check_rejects_what_a_loose_depth_test_accepts() -> None:
    """Occluder 12% in front of the back plane: with rel_tol 0.2 the depth test alone accepts
    back-plane points hidden behind it in c; the round trip through c's depth lands ~5 px away
    in a (parallax 120 * 1.2 * (1/3.5 - 1/4)) and rejects them."""
    occ_z, K = 3.5, _K(f=120.0)
    depth_a, _, _ = _two_plane_depth(K, VM_A, occ_z)
    depth_c, _, _ = _two_plane_depth(K, VM_C, occ_z)
    seen, hidden, _ = _occlusion_status(K, occ_z, margin=0.06)  # 2 px at z = 3.5
    loose = dense_correspondences(depth_a, depth_c, K, K, VM_A, VM_C, 0.2, math.inf)[0]
    strict = dense_correspondences(depth_a, depth_c, K, K, VM_A, VM_C, 0.2, 1.0)[0]
    for xy, expect_hidden in ((loose, True), (strict, False)):
        got = torch.zeros(H, W, dtype=torch.bool)
        got[xy[:, 1], xy[:, 0]] = True
        assert got[seen].all()
        assert (got[hidden].sum() >= 20) if expect_hidden else not got[hidden].any()


# ----------------------------------------------------------------------------------------------
# 3. rendered expected depth of a dense layer of opaque Gaussians on a plane


LAYER_Z, LAYER_HALF, LAYER_N = 3.0, 1.0, 60


def _layer_scene() -> LiftedScene:
    g = torch.linspace(-LAYER_HALF, LAYER_HALF, LAYER_N)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    n = LAYER_N * LAYER_N
    means = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((n,), LAYER_Z)], 1)
    step = 2 * LAYER_HALF / (LAYER_N - 1)
    gaussians = {
        "means": means,
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        "scales": torch.tensor([[0.7 * step, 0.7 * step, 0.002]]).repeat(n, 1),
        "opacities": torch.full((n,), 0.99),
        "sh": torch.zeros(n, 1, 3),
        "features": torch.zeros(n, 4),
    }
    return LiftedScene(gaussians=gaussians, decoder=torch.nn.Conv2d(4, 8, 3, padding=1), meta={})


def _layer_depth(K: torch.Tensor, vm: torch.Tensor, margin: float) -> torch.Tensor:
    """Analytic depth [H, W] of the layer's square footprint grown by `margin` (0 outside)."""
    centre, dirs = _rays(K, vm, W, H)
    s, pts = _hit_plane(centre, dirs, [0.0, 0.0, 1.0], LAYER_Z)
    inside = (s > 0) & (pts[..., :2].abs().amax(-1) <= LAYER_HALF + margin)
    return torch.where(inside, s, torch.zeros_like(s))


def test_rendered_layer_depth_and_correspondences() -> None:
    scene = _layer_scene()
    vm_a = _viewmat(_rot([1.0, 0.0, 0.0], 4.0), [0.0, 0.1, 0.0])
    vm_b = _viewmat(_rot([0.1, 1.0, 0.0], 20.0), [1.0, 0.0, 0.3])
    full_K = _K(f=4 * F, w=4 * W, h=4 * H, dx=1.2, dy=-0.8)  # a 256 x 192 view, rendered at 1/4
    K_small = torch.diag(torch.tensor([0.25, 0.25, 1.0], dtype=torch.float64)) @ full_K
    depths = []
    for vm in (vm_a, vm_b):
        depth = render_depth(scene, vm.float(), full_K.float(), 4 * W, 4 * H, scale=0.25)
        assert depth.shape == (H, W) and depth.dtype == torch.float32
        core = _layer_depth(K_small, vm, margin=-0.1)  # well inside the footprint
        grown = _layer_depth(K_small, vm, margin=0.1)  # beyond any Gaussian's reach
        assert core.count_nonzero() > 300 and (grown == 0).sum() > 300
        assert (depth[core > 0] > 0).all()
        assert (depth[grown == 0] == 0).all()
        rel = ((depth.double() - core) / core)[core > 0].abs()
        assert rel.max() < 0.02
        depths.append(depth)

    xy_a, xy_b = dense_correspondences(depths[0], depths[1], K_small, K_small, vm_a, vm_b)
    # reference: the homography of the layer's plane, for a pixels on its footprint that land
    # inside b. The layer is solid (alpha >= 0.5) a little beyond its square of centres: ~1.3
    # sigma (0.03 m) plus the renderer's 0.3 px^2 screen-space dilation (~0.55 px = 0.035 m).
    exact_a = _layer_depth(K_small, vm_a, margin=0.08)
    centre, dirs = _rays(K_small, vm_a, W, H)
    _, pts = _hit_plane(centre, dirs, [0.0, 0.0, 1.0], LAYER_Z)
    ref_b, z_b = _project(K_small, vm_b, pts)
    inside, _ = _inside_status(ref_b, z_b, W, H)
    keep = inside & (exact_a > 0)
    gt_a = torch.nonzero(keep).flip(1)  # [G, 2] (x, y)
    gt_b = ref_b[keep]
    stats = correspondence_precision(xy_a, xy_b, gt_a, gt_b, radius=1.0)
    assert stats["predicted"] > 300
    assert (xy_b.double() - ref_b[xy_a[:, 1], xy_a[:, 0]]).norm(dim=1).max() < 0.25
    assert stats["precision"] >= 0.95, stats
    assert stats["recall"] >= 0.9, stats


# ----------------------------------------------------------------------------------------------
# 4. precision on planted correspondences


def test_precision_on_planted_points() -> None:
    gt_a = torch.tensor([[x, 2 * x + 1] for x in range(10)])  # 10 reference pixels
    gt_b = torch.randint(0, 200, (10, 2)) / 4.0  # exact in float32
    offsets = {0: (0.5, 0.0), 1: (0.0, -0.25), 2: (0.3, 0.4), 3: (1.0, 0.0), 4: (1.5, 0.0)}
    offsets |= {5: (0.0, 3.0)}  # correct: 0-3 (error 0.5, 0.25, 0.5, 1.0 = radius), wrong: 4, 5
    pred_a = [gt_a[i].tolist() for i in offsets] + [[40, 1], [41, 2], [0, 0]]  # 3 unmatched
    pred_b = [(gt_b[i] + torch.tensor(o)).tolist() for i, o in offsets.items()]
    pred_b += [[1.0, 1.0]] * 3
    xy_a, xy_b = torch.tensor(pred_a), torch.tensor(pred_b)
    stats = correspondence_precision(xy_a, xy_b, gt_a, gt_b, radius=1.0)
    assert stats["predicted"] == 9 and stats["reference"] == 10 and stats["correct"] == 4
    assert stats["precision"] == pytest.approx(4 / 9)
    assert stats["recall"] == pytest.approx(4 / 10)
    assert stats["median_error_px"] == pytest.approx(0.5, abs=1e-6)  # lower median of 6
    has_ref, err = match_reference(xy_a, xy_b, gt_a, gt_b)
    assert has_ref.tolist() == [True] * 6 + [False] * 3
    assert torch.isinf(err[6:]).all()
    # order does not matter
    perm = torch.randperm(9)
    assert correspondence_precision(xy_a[perm], xy_b[perm], gt_a, gt_b) == stats
    empty = correspondence_precision(xy_a[:0], xy_b[:0], gt_a, gt_b)
    assert math.isnan(empty["precision"]) and empty["recall"] == 0.0


def test_resize_depth_takes_the_pixel_under_each_centre() -> None:
    depth = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    small = resize_depth(depth, 3, 2)  # 4 x 4 blocks: centres at input index 1.5 -> pixel 2
    assert small.tolist() == [
        [depth[2, 2], depth[2, 6], depth[2, 10]],
        [depth[6, 2], depth[6, 6], depth[6, 10]],
    ]


# ----------------------------------------------------------------------------------------------
# 5. bad inputs


def test_bad_shapes_raise() -> None:
    d = torch.ones(H, W)
    K, vm = K_A.float(), VM_A.float()
    with pytest.raises(ValueError):
        dense_correspondences(d[None], d, K, K, vm, vm)
    with pytest.raises(ValueError):
        dense_correspondences(d, d[0], K, K, vm, vm)
    with pytest.raises(ValueError):
        dense_correspondences(d, d, K[:2], K, vm, vm)
    with pytest.raises(ValueError):
        dense_correspondences(d, d, K, K, vm, vm[:3])
    xy = torch.tensor([[0, 0], [1, 0]])
    with pytest.raises(ValueError):
        correspondence_precision(xy, xy[:1].float(), xy, xy.float())
    with pytest.raises(ValueError):
        correspondence_precision(xy, xy.float(), xy[:, :1], xy.float())
    with pytest.raises(ValueError):
        correspondence_precision(torch.tensor([[0, 0], [0, 0]]), xy.float(), xy, xy.float())
    with pytest.raises(ValueError):
        render_depth(_layer_scene(), vm, K[:2], W, H)
    with pytest.raises(ValueError):
        resize_depth(d[None], 4, 4)
