"""fit3d.scenes.scannetpp, the ScanNet++ DSLR reader: pose conversion, round trip against the
generator's cameras, sparse point colours, laziness, resolution and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fit3d.errors import UserError
from fit3d.scenes import list_scenes, open_scene
from fit3d.scenes import scannetpp as spp
from fit3d.scenes.demo import build_room, camera_path, generate_demo

pycolmap = pytest.importorskip("pycolmap")  # optional: a machine without it skips this file

W, H, N_VIEWS, SEED = 96, 64, 9, 5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_demo(
        tmp_path_factory.mktemp("spp"),
        seed=SEED,
        n_train=1,
        n_val=1,
        n_views=N_VIEWS,
        width=W,
        height=H,
        workers=1,
    )


@pytest.fixture
def scene_copy(root, tmp_path) -> Path:
    """A writable copy of the dataset (for corrupting files)."""
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _fit3d_recipe(c2w: np.ndarray) -> np.ndarray:
    """docs/method.md, "ScanNet++ layout and poses", step by step as FiT3D writes it."""
    c2w = c2w.copy()
    c2w[2, :] *= -1
    c2w = c2w[[1, 0, 2, 3]]
    c2w[:3, 1:3] *= -1
    return np.linalg.inv(c2w)


def test_conversion_matches_fit3d_recipe_and_inverts():
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.normal(size=4)
        c2w = np.eye(4)
        c2w[:3, :3] = pycolmap.Rotation3d(q / np.linalg.norm(q)).matrix()
        c2w[:3, 3] = rng.normal(size=3)
        np.testing.assert_allclose(spp.nerfstudio_to_viewmat(c2w), _fit3d_recipe(c2w), atol=1e-12)
        vm = spp.nerfstudio_to_viewmat(c2w)
        np.testing.assert_allclose(spp.viewmat_to_nerfstudio(vm), c2w, atol=1e-12)


def test_round_trip_cameras(root):
    """Reader cameras == the generator's cameras (recomputed from the seed) and == the COLMAP
    images.txt/cameras.txt written beside them, to 1e-6."""
    scene = open_scene(root, "demo_000")
    rng = np.random.default_rng(SEED * 1000)
    room = build_room(rng)
    expected = camera_path(room, N_VIEWS, rng)
    assert len(scene) == N_VIEWS
    rec = pycolmap.Reconstruction()
    rec.read_text(str(root / "data/demo_000/dslr/colmap"))
    by_name = {im.name: im for im in rec.images.values()}
    cam = next(iter(rec.cameras.values()))
    for i in range(len(scene)):
        vm = scene.viewmat(i).double().numpy()
        np.testing.assert_allclose(vm, expected[i], atol=1e-6)
        colmap_vm = np.eye(4)
        colmap_vm[:3] = by_name[scene.image_name(i)].cam_from_world().matrix()
        np.testing.assert_allclose(vm, colmap_vm, atol=1e-6)
        K = scene.K(i).double().numpy()
        np.testing.assert_allclose(K, cam.calibration_matrix(), atol=1e-5)
        assert (scene.width(i), scene.height(i)) == (cam.width, cam.height)
    assert scene.test_views == [7] and len(scene.train_views) == N_VIEWS - 1


def test_points_land_on_matching_colours(root):
    """points3D projected with the reader's cameras hit pixels of their colour; a control with
    the poses shuffled among views does not."""
    scene = open_scene(root, "demo_001")
    xyz, rgb = scene.points()
    assert xyz.shape[1] == 3 and len(xyz) > 500 and rgb.min() >= 0 and rgb.max() <= 1
    images = [scene.load_image(i) for i in range(len(scene))]

    def median_error(perm: list[int]) -> float:
        errs = []
        for i, img in enumerate(images):
            vm, K = scene.viewmat(perm[i]), scene.K(i)
            pc = xyz @ vm[:3, :3].T + vm[:3, 3]
            front = pc[:, 2] > 0.1
            uv = (pc[front, :2] / pc[front, 2:]) * K.diagonal()[:2] + K[:2, 2]
            u, v = uv[:, 0].floor().long(), uv[:, 1].floor().long()
            inside = (u >= 0) & (v >= 0) & (u < W) & (v < H)
            errs.append((img[v[inside], u[inside]] - rgb[front][inside]).abs().mean(1))
        return torch.cat(errs).median().item()

    true = median_error(list(range(len(scene))))
    control = median_error(list(np.random.default_rng(0).permutation(len(scene))))
    assert true < 0.03
    assert control > 3 * true


def test_lone_points3d_file(root, tmp_path):
    colmap = tmp_path / "colmap"
    colmap.mkdir()
    shutil.copy(root / "data/demo_000/dslr/colmap/points3D.txt", colmap)
    xyz, rgb = spp.read_points3d(colmap)
    lines = [ln.split() for ln in (colmap / "points3D.txt").read_text().splitlines()[1:]]
    assert len(xyz) == len(lines)
    first = {int(ln[0]): ln for ln in lines}[1]
    ref = torch.tensor([float(x) for x in first[1:4]])
    assert ((xyz - ref).norm(dim=1) < 1e-6).any()
    assert spp.read_points3d(tmp_path / "none")[0].shape == (0, 3)


def test_opening_reads_no_images(root, monkeypatch):
    calls = []
    real = spp.cv2.imread
    monkeypatch.setattr(spp.cv2, "imread", lambda *a, **k: calls.append(a) or real(*a, **k))
    scene = open_scene(root, "demo_000")
    assert len(scene) == N_VIEWS and calls == []
    scene.load_image(0)
    assert len(calls) == 1


def test_resolution_scales_images_and_intrinsics(root):
    full, half = open_scene(root, "demo_000"), open_scene(root, "demo_000", resolution=0.5)
    assert (half.width(0), half.height(0)) == (W // 2, H // 2)
    np.testing.assert_allclose(
        half.K(0).numpy(), (full.K(0) * torch.tensor([[0.5], [0.5], [1]])).numpy()
    )
    img, depth = half.load_image(0), half.load_depth(0)
    assert img.shape == (H // 2, W // 2, 3) and img.dtype == torch.float32
    assert depth.shape == (H // 2, W // 2)
    assert half.load_semantics(0).shape == (H // 2, W // 2) and half.load_mask(0).all()
    # nearest-neighbour labels keep values that exist at full resolution
    assert set(half.load_instances(0).unique().tolist()) <= set(
        full.load_instances(0).unique().tolist()
    )
    # area-averaged image ~ 2x2 block mean of the full image
    block = full.load_image(0).reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3))
    assert (block - img).abs().mean() < 0.01
    n = half.load_normals(0)
    assert torch.allclose(n.norm(dim=-1), torch.ones(()), atol=1e-4)


def _one_line(excinfo, needle: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and needle in msg, msg


DSLR = "data/demo_000/dslr"


def test_bad_missing_root(tmp_path):
    with pytest.raises(UserError) as e:
        open_scene(tmp_path / "nope", "demo_000")
    _one_line(e, "nope")
    with pytest.raises(UserError) as e:
        list_scenes(tmp_path, "nvs_sem_train")
    _one_line(e, "nvs_sem_train.txt")


def test_bad_missing_image(scene_copy):
    (scene_copy / DSLR / "undistorted_images/DSC00003.JPG").unlink()
    with pytest.raises(UserError) as e:
        open_scene(scene_copy, "demo_000")
    _one_line(e, "DSC00003.JPG")


def test_bad_unreadable_image(scene_copy):
    (scene_copy / DSLR / "undistorted_images/DSC00002.JPG").write_bytes(b"not a jpeg")
    scene = open_scene(scene_copy, "demo_000")
    with pytest.raises(UserError) as e:
        scene.load_image(scene.index("DSC00002.JPG"))
    _one_line(e, "DSC00002.JPG")


def test_bad_malformed_json(scene_copy):
    path = scene_copy / DSLR / "nerfstudio/transforms_undistorted.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(UserError) as e:
        open_scene(scene_copy, "demo_000")
    _one_line(e, "transforms_undistorted.json")
    lists = scene_copy / "data/demo_001/dslr/train_test_lists.json"
    lists.write_text("{")
    with pytest.raises(UserError) as e:
        open_scene(scene_copy, "demo_001")
    _one_line(e, "train_test_lists.json")


def test_bad_size_disagrees_with_intrinsics(scene_copy):
    path = scene_copy / DSLR / "nerfstudio/transforms_undistorted.json"
    meta = json.loads(path.read_text())
    meta["w"] = W + 2
    path.write_text(json.dumps(meta))
    scene = open_scene(scene_copy, "demo_000")
    with pytest.raises(UserError) as e:
        scene.load_image(0)
    _one_line(e, "DSC00000.JPG")
    assert f"{W + 2}x{H}" in str(e.value)


def test_bad_too_few_views(scene_copy):
    path = scene_copy / DSLR / "nerfstudio/transforms_undistorted.json"
    meta = json.loads(path.read_text())
    meta["frames"], meta["test_frames"] = meta["frames"][:1], []
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        open_scene(scene_copy, "demo_000")
    _one_line(e, "need >= 2")
