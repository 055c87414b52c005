"""Correspondence as Probe3D computes it, on a textured plane with a known homography, and the
covisible pair selection."""

import math

import pytest
import torch

from fit3d.eval.correspondence import canonical, quarter, ratio_matches_sets, top_indices
from fit3d.eval.correspondence import pair_errors as pair_errors_sets
from fit3d.eval.metrics import correspondence_recall
from fit3d.geometry import covisibility, select_pairs

H, W, F = 160, 240, 200.0  # full resolution; the 1/4 image is 40 x 60 with focal 50
K = torch.tensor([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]], dtype=torch.float64)
Z = 4.0  # the plane z = 4 faces both cameras
TX = 0.8  # view 1 sits 0.8 m to the right: the homography is x1 = x0 - 50 * 0.8 / 4 = x0 - 10
SHIFT = {0: 3, 1: 7, 2: 15, 3: 30}  # planted match error (1/4-res px) of each band of 10 rows


def _viewmat(tx: float) -> torch.Tensor:
    v = torch.eye(4, dtype=torch.float64)
    v[0, 3] = -tx  # world-to-camera of a camera at (tx, 0, 0) looking down +z
    return v


def pair_errors(feat0: torch.Tensor, feat1: torch.Tensor, *geometry, top_k: int) -> torch.Tensor:
    """Errors of one feature set made of one map per view."""
    return pair_errors_sets({"f": feat0}, {"f": feat1}, {"f": ("f",)}, *geometry, top_k=top_k)["f"]


def _codes(dim: int = 64) -> torch.Tensor:
    """A random unit code per (column, row) of the plane, indexed by view 0's 1/4 pixel."""
    gen = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(100, 40, dim, generator=gen), dim=-1)


def test_plane_with_known_homography_gives_hand_computed_recall():
    codes = _codes()
    # view 0: 1/4 pixel (x, y) sees the plane point of code (x, y)
    feat0 = codes[:60].permute(2, 1, 0)  # [C, 40, 60]
    # view 1: pixel (x1, y) sees code (x1 + 10, y); its features are planted SHIFT[band] columns
    # off, so the feature match of view-0 pixel x0 is x1 = x0 - 10 - shift: an error of `shift`
    feat1 = torch.empty_like(feat0)
    for y in range(40):
        cols = torch.arange(60) + 10 + SHIFT[y // 10]
        feat1[:, y] = codes[cols, y].T
    depth0 = torch.zeros(H, W, dtype=torch.float64)
    depth0[:, 160:200] = Z  # 1/4 columns 40..49 read full-res columns 160, 164, ..., 196
    depth0[:, 201:204] = Z  # never read: 1/4 column 50 reads full-res column 200 (nearest)
    depth1 = torch.full((H, W), Z, dtype=torch.float64)
    err = pair_errors(feat0, feat1, depth0, depth1, K, K, _viewmat(0.0), _viewmat(TX), top_k=1000)
    assert len(err) == 10 * 40  # every valid view-0 pixel, each with an exact feature match
    expected = sorted(float(SHIFT[y // 10]) for y in range(40) for _ in range(10))
    torch.testing.assert_close(err.sort().values, torch.tensor(expected, dtype=err.dtype))
    rec = correspondence_recall([err], torch.tensor([0.0]))
    # by hand: errors 3, 7, 15, 30 on a quarter of the points each; thresholds 5, 10, 20
    assert rec["recall_5px"] == pytest.approx(1 / 4)
    assert rec["recall_10px"] == pytest.approx(2 / 4)
    assert rec["recall_20px"] == pytest.approx(3 / 4)
    assert rec["recall_10px_rot0-15"] == pytest.approx(2 / 4)
    assert math.isnan(rec["recall_10px_rot15-30"])


def test_top_k_keeps_the_most_distinctive_matches():
    codes = _codes()
    feat0 = codes[:60].permute(2, 1, 0)
    feat1 = torch.empty_like(feat0)
    for y in range(40):
        feat1[:, y] = codes[torch.arange(60) + 10, y].T
    feat1[:, 20:] = feat1[:, 20:] * 0.2 + 0.8 * torch.nn.functional.normalize(
        torch.ones(64, 20, 60), dim=0
    )  # rows 20.. blurred towards one vector: less distinctive, lower ratio-test weights
    depth0 = torch.zeros(H, W, dtype=torch.float64)
    depth0[:, 160:200] = Z
    depth1 = torch.full((H, W), Z, dtype=torch.float64)
    err = pair_errors(feat0, feat1, depth0, depth1, K, K, _viewmat(0.0), _viewmat(TX), top_k=200)
    assert len(err) == 200 and float(err.max()) < 1e-6  # the 200 kept are the exact rows 0..19


def test_ratio_test_weights_by_hand():
    f0 = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    f1 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    idx, weight = ratio_matches_sets({"f": f0}, {"f": f1}, {"f": ("f",)})["f"]
    assert idx.tolist() == [0, 1]
    # row 0: cos 1 and 0.6 -> d = 1e-9 (clamped), 0.4; row 1: cos 0.96 and 0.8 -> d = 0.04, 0.2
    expected = torch.tensor([1 - 1e-9 / 0.4, 1 - 0.04 / 0.2], dtype=torch.float64)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-12)


def test_quarter_is_nearest_and_scales_K():
    depth = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    small, Kq = quarter(depth, K)
    assert small.tolist() == [[0.0, 4.0, 8.0], [48.0, 52.0, 56.0]]
    assert Kq[0, 0] == F / 4 and Kq[0, 2] == W / 8 and Kq[2, 2] == 1


def _pose(yaw_deg: float, tx: float) -> torch.Tensor:
    """World-to-camera [4, 4]: camera rotated about y by yaw, centred at (tx, 0, 0)."""
    t = math.radians(yaw_deg)
    r = torch.tensor([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    c2w = torch.eye(4)
    c2w[:3, :3], c2w[0, 3] = r, tx
    return torch.linalg.inv(c2w)


def _depth(viewmat: torch.Tensor) -> torch.Tensor:
    """Depth of the plane z = 4 seen by a camera with intrinsics K."""
    c2w = torch.linalg.inv(viewmat)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    uv1 = torch.stack([xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5, torch.ones(H * W)])
    rays = torch.linalg.solve(K.float(), uv1)  # [3, N] camera-frame rays with z = 1
    dirs, origin = c2w[:3, :3] @ rays, c2w[:3, 3:]
    s = (Z - origin[2]) / dirs[2]
    return torch.where(s > 0, s, torch.zeros_like(s)).reshape(H, W)  # ray z = 1: depth = s


def test_covisibility_and_pair_selection():
    Kf = K.float()
    v0, v1, back = _pose(0.0, 0.0), _pose(5.0, 0.2), _pose(180.0, 0.0)
    d0, d1 = _depth(v0), _depth(v1)
    assert covisibility(d0, d0, Kf, Kf, v0, v0) == 1.0
    assert 0.7 < covisibility(d0, d1, Kf, Kf, v0, v1) < 1.0
    empty = torch.zeros(H, W)  # the camera facing away sees no point of the plane
    assert covisibility(d0, empty, Kf, Kf, v0, back) == 0.0
    pairs = select_pairs([d0, d1, empty], [Kf] * 3, [v0, v1, back], num_pairs=5)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert abs(pairs[0][2] - 5.0) < 1e-3


def _set_maps(dtype: torch.dtype) -> tuple[dict, dict]:
    """Two parts per view: `a` (codes with noise, matched SHIFT off) and `b` (noise + part of a)."""
    gen = torch.Generator().manual_seed(1)
    codes = _codes()
    feat0 = codes[:60].permute(2, 1, 0)  # [64, 40, 60]
    feat1 = torch.empty_like(feat0)
    for y in range(40):
        feat1[:, y] = codes[torch.arange(60) + 10 + SHIFT[y // 10], y].T
    noise0, noise1 = (torch.randn(32, 40, 60, generator=gen) for _ in range(2))
    maps0 = {"a": feat0 + 0.3 * torch.randn(64, 40, 60, generator=gen), "b": noise0}
    maps1 = {"a": feat1, "b": noise1 + feat1[:32]}
    cast = lambda m: {k: v.to(dtype) for k, v in m.items()}  # noqa: E731
    return cast(maps0), cast(maps1)


SETS = {"a": ("a",), "ab": ("a", "b"), "aa": ("a", "a"), "b": ("b",)}


def _set_geometry() -> tuple:
    depth0 = torch.zeros(H, W, dtype=torch.float64)
    depth0[:, 40:200] = Z
    depth1 = torch.full((H, W), Z, dtype=torch.float64)
    return depth0, depth1, K, K, _viewmat(0.0), _viewmat(TX)


def test_sets_equal_their_concatenation_in_float64():
    """A set's errors are exactly those of pair_errors on its parts' channel concatenation: in
    float64 the two routes' cosines differ by ~1e-16, far below the ranking resolution TIE."""
    maps0, maps1 = _set_maps(torch.float64)
    geo = _set_geometry()
    got = pair_errors_sets(maps0, maps1, SETS, *geo, top_k=300)
    for s, parts in SETS.items():
        ref = pair_errors(torch.cat([maps0[p] for p in parts]),
                          torch.cat([maps1[p] for p in parts]), *geo, top_k=300)  # fmt: skip
        assert len(got[s]) == 300
        torch.testing.assert_close(got[s], ref, rtol=0, atol=1e-9, msg=s)
    assert not torch.equal(got["ab"], got["a"])


def test_original_twice_scores_exactly_as_original():
    """original ++ original has original's canonical form: one computation, identical results."""
    assert canonical(("a", "a")) == canonical(("a",)) == (("a", 1),)
    assert canonical(("b", "a", "b", "a")) == (("a", 1), ("b", 1))
    assert canonical(("a", "a", "b")) == (("a", 2), ("b", 1))
    maps0, maps1 = _set_maps(torch.float32)
    got = pair_errors_sets(maps0, maps1, SETS, *_set_geometry(), top_k=300)
    assert torch.equal(got["aa"], got["a"])
    assert not torch.equal(got["ab"], got["a"])


def test_ties_go_to_the_lower_index():
    # view-1 rows 1, 3 and 4 are the same vector: rows 0 and 2 of view 0 match all three
    # equally -> the lowest index, 1, with weight 0 (the second-best cosine is a twin's)
    f1 = torch.tensor([[0.0, 1.0], [1.0, 0.2], [0.3, 1.0], [1.0, 0.2], [1.0, 0.2]])
    f0 = torch.tensor([[1.0, 0.2], [0.0, 1.0], [2.0, 0.4]])
    for rows in (slice(None), [2, 1, 0]):  # whatever the order of view 0's rows
        idx, weight = ratio_matches_sets({"f": f0[rows]}, {"f": f1}, {"f": ("f",)})["f"]
        assert sorted(idx.tolist()) == [0, 1, 1]
    idx, weight = ratio_matches_sets({"f": f0}, {"f": f1}, {"f": ("f",)})["f"]
    assert idx.tolist() == [1, 0, 1] and weight[0] == weight[2] == 0
    # equal weights are kept in index order, whatever topk would do
    w = torch.tensor([0.5, 0.7, 0.7, 0.9, 0.7, 0.5], dtype=torch.float64)
    assert top_indices(w, 3).tolist() == [3, 1, 2]
    assert top_indices(w, 6).tolist() == [3, 1, 2, 4, 0, 5]


def test_navi_protocol_recovers_the_3d_and_2d_error_of_a_planted_point_cloud():
    """Probe3D's NAVI errors on a plane z = Z seen by view 0 and by view 1 translated by TX:
    view 1's token map is view 0's moved by TX * F / Z full pixels plus one 1/4 cell to the
    right, so every match lands one cell (4 full pixels) right of the true point. Its 3D error
    is then 4 Z / F metres along x and its 2D error 4 full-resolution pixels (an independent
    formula), whatever the relative pose."""
    from fit3d.eval.correspondence import navi_pair_errors
    from fit3d.eval.metrics import navi_recall

    size, focal, z, tx = 64, 200.0, 0.3, 0.06  # view 1 sees x1 = x0 - 40 full px = 10 cells
    k = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    cells = size // 4
    feat0 = torch.randn(8, cells, cells, generator=gen)  # a token per 1/4 cell: upsampling is 1:1
    shift = round(tx * focal / z / 4) + 1  # 10 cells of parallax + the planted one
    feat1 = torch.randn(8, cells, cells, generator=gen)  # cells nobody in view 0 matches well
    feat1[:, :, : cells - shift] = feat0[:, :, shift:]
    depth = torch.full((size, size), z)
    errs3d, errs2d = navi_pair_errors(
        {"f": feat0}, {"f": feat1}, {"f": ("f",)}, depth, depth, k, k,
        _viewmat(0.0), _viewmat(tx), top_k=cells * (cells - shift),
    )["f"]  # fmt: skip
    assert len(errs3d) == cells * (cells - shift)
    tol = {"rtol": 1e-5, "atol": 1e-8}  # the depth map is fp32
    torch.testing.assert_close(errs3d, torch.full_like(errs3d, 4 * z / focal), **tol)  # 6 mm
    torch.testing.assert_close(errs2d, torch.full_like(errs2d, 4.0), **tol)
    m = navi_recall([errs3d], [errs2d], torch.tensor([0.0]))
    assert (m["recall_1cm"], m["recall2d_5px"], m["recall2d_25px"]) == (1.0, 1.0, 1.0)
    assert m["recall_2cm_rot0-30"] == 1.0


def test_grids_match_the_resampled_points_they_stand_for():
    """Dot products taken on the tokens and resampled (Grid) equal those of the bilinearly
    resampled point features, and every set's neighbours are the nearest by the cosines of the
    resampled points' concatenation, whatever the chunking. Clamped edges make some view-1 points
    identical (true ties, which rounding may order either way): a pick counts as right when its
    cosine is the row's best to 1e-12 (float64) or 1e-5 (float32)."""
    from fit3d.eval.correspondence import Grid, _columns, _resampled_rows, upsampled

    gen = torch.Generator().manual_seed(3)
    maps0 = {p: torch.randn(6, 5, 7, generator=gen, dtype=torch.float64) for p in "ab"}
    maps1 = {p: torch.randn(6, 4, 9, generator=gen, dtype=torch.float64) for p in "ab"}
    valid0 = torch.rand(18, 25, generator=gen) > 0.3  # 18 x 25 grid from 5 x 7 tokens
    valid1 = torch.rand(15, 31, generator=gen) > 0.3
    pts0 = {p: upsampled(m, (18, 25))[valid0.flatten()] for p, m in maps0.items()}
    pts1 = {p: upsampled(m, (15, 31))[valid1.flatten()] for p, m in maps1.items()}
    g0 = {p: Grid(m, valid0) for p, m in maps0.items()}
    g1 = {p: Grid(m, valid1) for p, m in maps1.items()}
    rows = _resampled_rows(g0["a"], _columns(g0["a"], g1["a"]), 0, 18)[g0["a"].flat]
    torch.testing.assert_close(rows, pts0["a"] @ pts1["a"].T, rtol=0, atol=1e-12)
    sets = {"a": ("a",), "b": ("b",), "ab": ("a", "b"), "aab": ("a", "a", "b")}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        g0 = {p: Grid(m.to(dtype), valid0) for p, m in maps0.items()}
        g1 = {p: Grid(m.to(dtype), valid1) for p, m in maps1.items()}
        for max_elems in (1 << 24, 1):  # one chunk; one grid row per chunk
            got = ratio_matches_sets(g0, g1, sets, max_elems)
            for s, parts in sets.items():
                f0 = torch.nn.functional.normalize(torch.cat([pts0[p] for p in parts], 1), dim=1)
                f1 = torch.nn.functional.normalize(torch.cat([pts1[p] for p in parts], 1), dim=1)
                cos = f0 @ f1.T  # [N0, N1]
                best = cos.topk(2, dim=1).values
                picked = cos.gather(1, got[s][0][:, None])[:, 0]
                assert (picked >= best[:, 0] - tol).all(), (s, dtype)
                weight = 1 - (1 - best[:, 0]).clamp_min(1e-9) / (1 - best[:, 1]).clamp_min(1e-9)
                torch.testing.assert_close(got[s][1], weight, rtol=0, atol=100 * tol)
