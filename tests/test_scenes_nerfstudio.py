"""`scenes.name=nerfstudio`: transforms.json folders written by the test (nerfstudio: shared and
per-frame intrinsics, OPENCV distortion, masks, depth, a PLY; instant-ngp / NeRF-synthetic: field
of view, split files, RGBA images without extensions) read back through the prepared ScanNet++
layout against references computed here, and the OpenGL <-> OpenCV helper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _scene_fixtures import pattern_image, undistortion_error
from scipy.spatial.transform import Rotation

from fit3d.config import load_config
from fit3d.geometry import opengl_to_opencv
from fit3d.scenes import open_scene
from fit3d.scenes.own import prepare
from fit3d.scenes.own.__main__ import main as own_main

W, H = 96, 72
SHARED = {"fl_x": 80.0, "fl_y": 82.0, "cx": 47.0, "cy": 37.0, "w": W, "h": H}
DISTORTION = {"camera_model": "OPENCV", "k1": -0.15, "k2": 0.04, "p1": 0.001, "p2": 0.002}
OWN_K = {"fl_x": 70.0, "fl_y": 71.0, "cx": 50.0, "cy": 34.0, "k1": 0.0, "k2": 0.0}
OWN_K |= {"p1": 0.0, "p2": 0.0}


def planted_viewmats(n: int, seed: int = 2) -> list[np.ndarray]:
    """OpenCV world-to-camera [4, 4] poses."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        vm = np.eye(4)
        vm[:3, :3] = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix()
        vm[:3, 3] = rng.normal(0, 2, 3)
        out.append(vm)
    return out


def reference_gl_c2w(viewmat: np.ndarray) -> np.ndarray:
    """The camera-to-world matrix a nerfstudio file holds for an OpenCV viewmat, built from the
    camera's axes: x = right, y = up (-down), z = back (-forward), then the centre."""
    rot, t = viewmat[:3, :3], viewmat[:3, 3]
    right, down, forward = rot[0], rot[1], rot[2]  # camera axes in world coordinates
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2] = right, -down, -forward
    c2w[:3, 3] = -rot.T @ t
    return c2w


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    head = f"ply\nformat ascii 1.0\nelement vertex {len(xyz)}\n"
    head += "".join(f"property float {a}\n" for a in "xyz")
    head += "".join(f"property uchar {c}\n" for c in ("red", "green", "blue"))
    rows = "".join(
        f"{p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]}\n" for p, c in zip(xyz, rgb, strict=True)
    )
    path.write_text(head + "end_header\n" + rows)


def write_nerfstudio(scene: Path, n: int = 6) -> dict:
    """Frames 0..n-1: shared distorted intrinsics, except frame 1 (its own pinhole intrinsics,
    a mask and a depth map); a PLY of sparse points. Returns what was planted."""
    (scene / "images").mkdir(parents=True)
    (scene / "masks").mkdir()
    (scene / "depths").mkdir()
    frames = []
    for k, vm in enumerate(planted_viewmats(n)):
        name = f"images/frame_{k:05d}.png"
        cv2.imwrite(str(scene / name), pattern_image(W, H)[..., ::-1])
        frame = {"file_path": name, "transform_matrix": reference_gl_c2w(vm).tolist()}
        if k == 1:
            frame |= OWN_K
            mask = np.ones((H, W), np.uint8)  # nerfstudio masks: non-zero = use
            mask[5:20, 10:40] = 0
            cv2.imwrite(str(scene / "masks" / "frame_00001.png"), mask)
            depth = (1000 + np.arange(H * W).reshape(H, W) % 5000).astype(np.uint16)
            cv2.imwrite(str(scene / "depths" / "frame_00001.png"), depth)
            frame |= {"mask_path": "masks/frame_00001.png"}
            frame |= {"depth_file_path": "depths/frame_00001.png"}
        frames.append(frame)
    rng = np.random.default_rng(3)
    xyz, rgb = rng.normal(0, 1, (40, 3)).astype(np.float32), rng.integers(0, 256, (40, 3))
    write_ply(scene / "sparse_pc.ply", xyz, rgb)
    meta = {**SHARED, **DISTORTION, "ply_file_path": "sparse_pc.ply", "frames": frames[::-1]}
    (scene / "transforms.json").write_text(json.dumps(meta))
    return {"xyz": xyz, "rgb": rgb, "mask": mask, "depth": depth}


def _prepare(root: Path, out: Path, *extra: str):
    cfg = load_config(["nerfstudio"], [f"scenes.root={root}", f"run.out={out}", *extra])
    return prepare(cfg, verbose=False)


def test_opengl_to_opencv_negates_the_camera_y_and_z_axes_and_is_its_own_inverse():
    vm = planted_viewmats(1)[0]
    gl = reference_gl_c2w(vm)
    cv = opengl_to_opencv(gl)
    np.testing.assert_allclose(cv, np.linalg.inv(vm), atol=1e-12)
    np.testing.assert_allclose(opengl_to_opencv(cv), gl, atol=1e-12)
    t = opengl_to_opencv(torch.from_numpy(gl).float()[None])  # batched tensors too
    assert t.dtype == torch.float32 and t.shape == (1, 4, 4)
    np.testing.assert_allclose(t[0].numpy(), np.linalg.inv(vm), atol=1e-5)
    assert gl[0, 1] == reference_gl_c2w(vm)[0, 1]  # the input is not modified


def test_transforms_json_reads_back_to_the_planted_cameras(tmp_path):
    planted = write_nerfstudio(tmp_path / "desk")
    root = _prepare(tmp_path / "desk", tmp_path / "out", "scenes.image_size=0")
    scene = open_scene(root, "desk")
    names = [scene.image_name(i) for i in range(len(scene))]
    assert names == [f"images__frame_{k:05d}.png" for k in range(6)]  # sorted by name
    assert scene.test_views == [5]  # fewer than test_every=8 views: the last one
    for i, vm in enumerate(planted_viewmats(6)):
        np.testing.assert_allclose(scene.viewmat(i).double(), vm, atol=1e-6)
    # frame 1: its own pinhole intrinsics, pixels copied, mask and depth as planted
    k = OWN_K
    want_K = [[k["fl_x"], 0, k["cx"]], [0, k["fl_y"], k["cy"]], [0, 0, 1]]
    np.testing.assert_allclose(scene.K(1).double(), want_K, atol=1e-9)
    got = np.round(scene.load_image(1).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, pattern_image(W, H))
    np.testing.assert_array_equal(scene.load_mask(1).numpy(), planted["mask"] > 0)
    np.testing.assert_allclose(scene.load_depth(1).numpy(), planted["depth"] / 1000.0, atol=1e-6)
    # the others: undistorted from the shared OPENCV camera
    params = [SHARED[q] for q in ("fl_x", "fl_y", "cx", "cy")]
    params += [DISTORTION[q] for q in ("k1", "k2", "p1", "p2")]
    for i in (0, 2, 3, 4, 5):
        assert scene.load_depth(i) is None
        image = scene.load_image(i).double().numpy() * 255
        err, checked = undistortion_error(image, scene.K(i).double().numpy(), (W, H), params)
        assert checked > 0.9 and err < 3.0, (err, checked)
    xyz, rgb = scene.points()
    order = np.lexsort(xyz.numpy().T[::-1])
    want = np.lexsort(planted["xyz"].T[::-1])
    np.testing.assert_allclose(xyz.numpy()[order], planted["xyz"][want], atol=1e-6)
    np.testing.assert_allclose(rgb.numpy()[order] * 255, planted["rgb"][want], atol=1e-3)


def test_instant_ngp_split_files_field_of_view_and_rgba(tmp_path):
    scene_dir = tmp_path / "lego"
    angle = 0.9
    for split, ks in (("train", range(4)), ("test", range(4, 6))):
        (scene_dir / split).mkdir(parents=True)
        frames = []
        for k in ks:
            rgba = np.zeros((40, 50, 4), np.uint8)
            rgba[..., :3] = pattern_image(50, 40)[..., ::-1]
            rgba[..., 3] = 255
            rgba[:10, :, 3] = 0  # transparent band: composited onto white
            rgba[10:20, :, 3] = 128
            cv2.imwrite(str(scene_dir / split / f"r_{k}.png"), rgba)
            c2w = reference_gl_c2w(planted_viewmats(6, seed=4)[k])
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": c2w.tolist()})
        meta = {"camera_angle_x": angle, "frames": frames}
        (scene_dir / f"transforms_{split}.json").write_text(json.dumps(meta))
    root = _prepare(tmp_path, tmp_path / "out")
    scene = open_scene(root, "lego")
    names = [scene.image_name(i) for i in range(len(scene))]
    assert [names[i] for i in scene.test_views] == ["test__r_4.png", "test__r_5.png"]
    f = 50 / (2 * math.tan(angle / 2))
    np.testing.assert_allclose(scene.K(0).double(), [[f, 0, 25], [0, f, 20], [0, 0, 1]])
    i = names.index("train__r_2.png")
    np.testing.assert_allclose(scene.viewmat(i).double(), planted_viewmats(6, seed=4)[2], atol=1e-6)
    img = np.round(scene.load_image(i).numpy() * 255)
    np.testing.assert_array_equal(img[:10], 255)
    src = pattern_image(50, 40).astype(np.float64)
    np.testing.assert_allclose(img[10:20], np.round(src[10:20] * 128 / 255 + 127 * 1.0), atol=1)
    np.testing.assert_array_equal(img[20:], src[20:])


def test_missing_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    write_nerfstudio(tmp_path / "desk")
    (tmp_path / "desk" / "images" / "frame_00003.png").unlink()
    out = tmp_path / "out"
    argv = ["--preset", "nerfstudio", f"scenes.root={tmp_path / 'desk'}", f"run.out={out}"]
    assert own_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing image" in err and "frame_00003.png" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"camera_model": "EQUIRECTANGULAR"}, "not supported"),
        ({"k4": 0.1}, "k4"),
        ({"fl_x": None, "fl_y": None}, "fl_x"),
    ],
)
def test_unsupported_cameras_are_one_line(tmp_path, capsys, edit, message):
    write_nerfstudio(tmp_path / "desk")
    path = tmp_path / "desk" / "transforms.json"
    meta = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
    argv = ["--preset", "nerfstudio", f"scenes.root={tmp_path / 'desk'}", f"run.out={tmp_path}/o"]
    assert own_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
