"""Demo scene sets: the ray caster's ground truth checked against geometry (not against itself),
textured images, determinism, caching, concurrent callers and the command line."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from fit3d.scenes import open_scene
from fit3d.scenes.demo import (
    CLASSES,
    TEST_LOOP,
    TEST_POSES,
    TEST_SEED,
    generate_demo,
    generate_room,
)
from fit3d.scenes.demo.__main__ import main as demo_main

W, H, N_VIEWS = 128, 96, 10


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return generate_demo(
        tmp_path_factory.mktemp("demo"),
        seed=3,
        n_train=1,
        n_val=1,
        n_views=N_VIEWS,
        width=W,
        height=H,
        workers=1,
    )


@pytest.fixture(scope="module")
def scene(demo_root):
    return open_scene(demo_root, "demo_000")


def _backproject(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame points [H, W, 3] through pixel centres."""
    h, w = depth.shape
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    return torch.stack([x, y, depth], -1).double()


def _to_view(scene, i: int, j: int, pts_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-i points [..., 3] -> (pixel coordinates in j with integer pixel centres, depth)."""
    rel = scene.viewmat(j).double() @ torch.linalg.inv(scene.viewmat(i).double())
    pj = pts_i @ rel[:3, :3].T + rel[:3, 3]
    K = scene.K(j).double()
    uv = (
        torch.stack(
            [
                pj[..., 0] / pj[..., 2] * K[0, 0] + K[0, 2],
                pj[..., 1] / pj[..., 2] * K[1, 1] + K[1, 2],
            ],
            -1,
        )
        - 0.5
    )
    return uv, pj[..., 2]


def _pairs(scene):
    return [(i, j) for i, j in itertools.permutations(range(len(scene)), 2) if abs(i - j) <= 3]


def test_depth_reprojects_between_views(scene):
    """Back-project depth of view i, project into view j: bilinear inverse depth of j (exact on
    planes) reproduces the projected depth wherever the point is visible."""
    errs = []
    for i, j in _pairs(scene):
        di, dj = scene.load_depth(i), scene.load_depth(j).double()
        uv, z = _to_view(scene, i, j, _backproject(di, scene.K(i))[di > 0])
        u0, v0 = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        ok = (z > 0.05) & (u0 >= 0) & (v0 >= 0) & (u0 < W - 1) & (v0 < H - 1)
        u0, v0, z, fu, fv = u0[ok], v0[ok], z[ok], (uv[ok, 0] - u0[ok]), (uv[ok, 1] - v0[ok])
        quad = torch.stack([dj[v0, u0], dj[v0, u0 + 1], dj[v0 + 1, u0], dj[v0 + 1, u0 + 1]], 1)
        same = (quad.min(1).values > 0) & (quad.max(1).values < quad.min(1).values * 1.02)
        inv = 1 / quad.clamp_min(1e-6)
        inv_j = (
            inv[:, 0] * (1 - fu) * (1 - fv)
            + inv[:, 1] * fu * (1 - fv)
            + inv[:, 2] * (1 - fu) * fv
            + inv[:, 3] * fu * fv
        )
        dj_at = 1 / inv_j
        visible = same & (z < dj_at * 1.01)
        errs.append(((z - dj_at).abs() / dj_at)[visible])
    errs = torch.cat(errs)
    assert len(errs) > 5 * W * H  # many pixels are seen in several views
    assert errs.median() < 1e-3


def test_normals_match_depth_on_planes(scene):
    """GT normals agree with normals from depth differences where the surface is planar."""
    k = 3
    angles = []
    for i in range(len(scene)):
        d, n, inst = scene.load_depth(i), scene.load_normals(i).double(), scene.load_instances(i)
        p = _backproject(d, scene.K(i))
        c = (slice(k, -k), slice(k, -k))
        a = p[k:-k, 2 * k :] - p[k:-k, : -2 * k]
        b = p[2 * k :, k:-k] - p[: -2 * k, k:-k]
        nd = torch.nn.functional.normalize(torch.cross(a, b, dim=-1), dim=-1)
        nd = torch.where((nd * p[c]).sum(-1, keepdim=True) > 0, -nd, nd)
        shifted = [
            (slice(k, -k), slice(2 * k, None)),
            (slice(k, -k), slice(None, -2 * k)),
            (slice(2 * k, None), slice(k, -k)),
            (slice(None, -2 * k), slice(k, -k)),
        ]
        planar = (d[c] > 0) & torch.stack(
            [((n[s] * n[c]).sum(-1) > 0.99999) & (inst[s] == inst[c]) & (d[s] > 0) for s in shifted]
        ).all(0)
        cos = (nd * n[c]).sum(-1)[planar].clamp(-1, 1)
        angles.append(torch.rad2deg(torch.acos(cos)))
    angles = torch.cat(angles)
    assert len(angles) > 0.3 * len(scene) * W * H
    assert angles.median() < 2.0


def test_same_point_same_label_across_views(scene):
    """A 3D point seen in two views carries the same class and instance id in both."""
    agree_s, agree_i = [], []
    for i, j in _pairs(scene):
        di, dj = scene.load_depth(i), scene.load_depth(j).double()
        si, sj = scene.load_semantics(i), scene.load_semantics(j)
        ii, ij = scene.load_instances(i), scene.load_instances(j)
        valid = di > 0
        uv, z = _to_view(scene, i, j, _backproject(di, scene.K(i))[valid])
        u, v = uv[:, 0].round().long(), uv[:, 1].round().long()
        ok = (z > 0.05) & (u >= 1) & (v >= 1) & (u < W - 1) & (v < H - 1)
        u, v, z = u[ok], v[ok], z[ok]
        # away from label borders in j, and visible (not occluded) in j
        win = torch.stack([ij[v + dv, u + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)])
        interior = (win == win[0]).all(0)
        visible = (z - dj[v, u]).abs() < 0.01 * z
        keep = interior & visible
        agree_s.append(si[valid][ok][keep] == sj[v, u][keep])
        agree_i.append(ii[valid][ok][keep] == ij[v, u][keep])
    agree_s, agree_i = torch.cat(agree_s), torch.cat(agree_i)
    assert len(agree_s) > 10 * W * H
    assert agree_s.float().mean() > 0.999
    assert agree_i.float().mean() > 0.999


def test_room_shell_is_planar_across_views(scene):
    """All pixels of each wall/floor/ceiling instance, from every view, lie on one plane whose
    normal is the GT normal (checks depth, normals and poses together)."""
    pts: dict[int, list] = {}
    nrm: dict[int, list] = {}
    shell = {CLASSES.index(c) for c in ("wall", "floor", "ceiling")}
    for i in range(len(scene)):
        d, sem, inst = scene.load_depth(i), scene.load_semantics(i), scene.load_instances(i)
        c2w = torch.linalg.inv(scene.viewmat(i).double())
        m = (d > 0) & torch.isin(sem, torch.tensor(sorted(shell)))
        pw = _backproject(d, scene.K(i))[m] @ c2w[:3, :3].T + c2w[:3, 3]
        nw = scene.load_normals(i).double()[m] @ c2w[:3, :3].T
        for k in inst[m].unique().tolist():
            sel = inst[m] == k
            pts.setdefault(k, []).append(pw[sel])
            nrm.setdefault(k, []).append(nw[sel])
    assert len(pts) >= 4
    for k in pts:
        p, n = torch.cat(pts[k]), torch.cat(nrm[k])
        centred = p - p.mean(0)
        normal = torch.linalg.svd(centred, full_matrices=False).Vh[-1]
        assert (centred @ normal).abs().median() < 1e-3  # metres
        assert (n @ normal).abs().min() > 0.9999


def test_images_look_textured_and_rooms_differ(demo_root):
    a, b = open_scene(demo_root, "demo_000"), open_scene(demo_root, "demo_001")
    img_a, img_b = a.load_image(0), b.load_image(0)
    assert img_a.std() > 0.08 and img_a.shape == (H, W, 3)
    assert (img_a - img_b).abs().mean() > 0.05
    grad = (img_a[1:] - img_a[:-1]).abs().mean()
    assert grad > 0.01  # texture, not flat colour
    assert json.loads((demo_root / "classes.json").read_text())["classes"] == CLASSES
    assert a.classes == CLASSES


def test_deterministic_and_cached(tmp_path):
    kw = dict(seed=1, n_train=1, n_val=0, n_views=3, width=32, height=24, workers=1)
    a = generate_demo(tmp_path / "a", **kw)
    b = generate_demo(tmp_path / "b", **kw)
    rel = "data/demo_000/dslr"
    for f in (
        "nerfstudio/transforms_undistorted.json",
        "gt_depth/DSC00001.png",
        "gt_semantics/DSC00002.png",
        "colmap/points3D.txt",
    ):
        assert (a / rel / f).read_bytes() == (b / rel / f).read_bytes()
    marker = a / "demo.json"
    stamp = marker.stat().st_mtime_ns
    (a / rel / "gt_depth/DSC00001.png").unlink()
    generate_demo(a, **kw)  # cached: does nothing
    assert marker.stat().st_mtime_ns == stamp
    assert not (a / rel / "gt_depth/DSC00001.png").exists()
    c = generate_demo(tmp_path / "c", **{**kw, "seed": 2})
    depth = "gt_depth/DSC00001.png"
    assert (a / rel / "colmap/points3D.txt").read_bytes() != (
        c / rel / "colmap/points3D.txt"
    ).read_bytes()
    generate_demo(a, **{**kw, "n_views": 4})  # new parameters -> regenerated
    assert (a / rel / depth).exists() and (a / rel / "gt_depth/DSC00003.png").exists()
    assert (a / "splits/nvs_sem_train.txt").read_text().split() == ["demo_000"]
    assert (a / "splits/nvs_sem_val.txt").read_text().split() == []


def test_probe_and_test_rooms_are_split_and_cached_per_room(tmp_path):
    """Probe and test rooms render poses of the same kind of loop (same rooms, fewer views); a
    new test seed adds its own test rooms and leaves every other room's files as they were."""
    kw = dict(seed=1, n_train=1, n_val=1, n_views=8, width=32, height=24, workers=1)
    kw |= dict(n_probe=1, probe_views=4, n_test=2, test_views=3)
    root = generate_demo(tmp_path / "d", **kw)
    splits = {f.stem: f.read_text().split() for f in (root / "splits").glob("*.txt")}
    assert splits == {
        "nvs_sem_train": ["demo_000"],
        "nvs_sem_val": ["demo_001"],
        "probe_train": ["demo_000", "demo_p00"],
        "test": ["demo_t0_00", "demo_t0_01"],
    }
    test_room = open_scene(root, "demo_t0_00")
    assert [test_room.image_name(i) for i in range(len(test_room))] == [
        f"DSC{i:05d}.JPG" for i in TEST_POSES[:3]
    ]
    assert len(open_scene(root, "demo_p00")) == 4 and len(open_scene(root, "demo_000")) == 8
    # a test room's view k is pose TEST_POSES[k] of the whole loop its room films
    generate_room(tmp_path / "data" / "whole", TEST_SEED, TEST_LOOP, 32, 24)
    whole = open_scene(tmp_path, "whole")
    for k, i in enumerate(TEST_POSES[:3]):
        torch.testing.assert_close(test_room.viewmat(k), whole.viewmat(i))
    stamps = {f: f.stat().st_mtime_ns for f in root.glob("data/*/room.json")}
    generate_demo(root, **{**kw, "test_seed": 1})
    assert (root / "splits/test.txt").read_text().split() == ["demo_t1_00", "demo_t1_01"]
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # nothing regenerated
    assert (root / "data/demo_t1_00/room.json").is_file()
    a = open_scene(root, "demo_t1_00").viewmat(0)
    assert not torch.allclose(a, test_room.viewmat(0))  # another draw of rooms


def test_show_writes_mosaic(demo_root, tmp_path):
    from fit3d.scenes.show import main

    out = tmp_path / "m.png"
    assert main(["demo_001", "--root", str(demo_root), "--views", "2", "--out", str(out)]) == 0
    import cv2

    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 200 and img.std() > 10
    assert main(["nope", "--root", str(demo_root)]) == 2


def test_concurrent_callers_generate_once(tmp_path):
    """Two callers at once (e.g. DDP ranks): one generates, the other waits and reuses it."""
    from concurrent.futures import ThreadPoolExecutor

    kw = dict(seed=4, n_train=1, n_val=1, n_views=2, width=16, height=16, workers=1)
    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: generate_demo(tmp_path, **kw), range(2)))
    assert roots == [tmp_path, tmp_path]
    assert json.loads((tmp_path / "demo.json").read_text())["scenes"] == ["demo_000", "demo_001"]
    assert len(open_scene(tmp_path, "demo_001")) == 2


def test_command_line_rejects_bad_settings_in_one_line(tmp_path, capsys):
    assert demo_main([f"run.out={tmp_path}", "scenes.demo_views=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: scenes.demo_views must be >= 2, got 1") and "\n" not in err
    assert not (tmp_path / "scenes" / "demo").exists()  # nothing half-written
