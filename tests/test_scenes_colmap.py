"""`scenes.name=colmap`: COLMAP workspaces written by the test (text, and binary through pycolmap)
read back through the prepared ScanNet++ layout, against references computed here: poses from the
planted quaternions, the undistorted images against the planted pattern sent through the test's
own OpenCV distortion formula, copies and downscales of pinhole views, masks, points, splits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
from _scene_fixtures import pattern_image, undistortion_error
from PIL import Image
from scipy.spatial.transform import Rotation

from fit3d.config import load_config
from fit3d.scenes import open_scene, resolve_scenes
from fit3d.scenes.own import prepare

CAMS = {  # id: (model, width, height, params) in COLMAP's parameter order
    1: ("OPENCV", 160, 120, [130.0, 128.0, 81.0, 59.0, -0.12, 0.03, 0.002, -0.001]),
    2: ("PINHOLE", 120, 90, [100.0, 101.0, 60.0, 45.0]),
}
NAMES = ["img_00.png", "img_01.png", "img_02.png", "img_03.png", "img_04.png", "sub/img_05.png"]
CAM_OF = [1, 1, 1, 1, 2, 2]


def planted_poses() -> list[tuple[np.ndarray, np.ndarray]]:
    """(wxyz quaternion [4], translation [3]) per image, world-to-camera."""
    rng = np.random.default_rng(5)
    out = []
    for _ in NAMES:
        q = Rotation.from_rotvec(rng.normal(0, 0.4, 3)).as_quat()  # xyzw
        out.append((np.array([q[3], q[0], q[1], q[2]]), rng.normal(0, 1.5, 3)))
    return out


def reference_viewmat(qwxyz: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World-to-camera [4, 4] from a wxyz quaternion by the textbook formula."""
    w, x, y, z = qwxyz / np.linalg.norm(qwxyz)
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    vm = np.eye(4)
    vm[:3, :3], vm[:3, 3] = rot, t
    return vm


def write_workspace(ws: Path, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """images/, masks/ and sparse/0 (text, or converted to binary by pycolmap); returns the
    planted points (xyz [P, 3], rgb uint8 [P, 3])."""
    sparse = ws / "sparse" / "0"
    sparse.mkdir(parents=True)
    (ws / "images" / "sub").mkdir(parents=True)
    (ws / "masks" / "sub").mkdir(parents=True)
    for name, cid in zip(NAMES, CAM_OF, strict=True):
        _, w, h = CAMS[cid][:3]
        cv2.imwrite(str(ws / "images" / name), pattern_image(w, h)[..., ::-1])
    mask = np.full((90, 120), 255, np.uint8)
    mask[10:30, 20:70] = 0
    cv2.imwrite(str(ws / "masks" / "img_04.png.png"), mask)  # COLMAP: <image name>.png
    (sparse / "cameras.txt").write_text(
        "# CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]\n"
        + "".join(
            f"{cid} {m} {w} {h} {' '.join(map(str, p))}\n" for cid, (m, w, h, p) in CAMS.items()
        )
    )
    lines = ["# IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then POINTS2D"]
    for i, (name, cid, (q, t)) in enumerate(zip(NAMES, CAM_OF, planted_poses(), strict=True)):
        lines += [f"{i + 1} {' '.join(f'{v:.15g}' for v in (*q, *t))} {cid} {name}", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(1)
    xyz = rng.normal(0, 2, (50, 3))
    rgb = rng.integers(0, 256, (50, 3))
    (sparse / "points3D.txt").write_text(
        "".join(
            f"{i + 1} {p[0]:.12g} {p[1]:.12g} {p[2]:.12g} {c[0]} {c[1]} {c[2]} 0.5\n"
            for i, (p, c) in enumerate(zip(xyz, rgb, strict=True))
        )
    )
    if binary:
        rec = pycolmap.Reconstruction()
        rec.read_text(str(sparse))
        for f in ("cameras", "images", "points3D"):
            (sparse / f"{f}.txt").unlink()
        rec.write_binary(str(sparse))
        assert (sparse / "images.bin").is_file()
    return xyz, rgb


def _prepare(ws: Path, out: Path, *extra: str):
    cfg = load_config(["colmap"], [f"scenes.root={ws}", f"run.out={out}", *extra])
    return cfg, prepare(cfg, verbose=False)


@pytest.mark.parametrize("binary", [False, True])
def test_workspace_reads_back_to_the_planted_cameras(tmp_path, binary):
    xyz, rgb = write_workspace(tmp_path / "garden", binary)
    cfg, root = _prepare(
        tmp_path / "garden", tmp_path / "out", "scenes.image_size=0", "scenes.test_every=3"
    )
    assert resolve_scenes(cfg, "train") == (root, ["garden"], 1.0)
    scene = open_scene(root, "garden")
    flat = [n.replace("/", "__") for n in NAMES]
    assert [scene.image_name(i) for i in range(len(scene))] == flat
    assert [flat[i] for i in scene.test_views] == ["img_02.png", "sub__img_05.png"]  # every 3rd
    for i, (q, t) in enumerate(planted_poses()):
        np.testing.assert_allclose(scene.viewmat(i).double(), reference_viewmat(q, t), atol=1e-6)
    p_xyz, p_rgb = scene.points()  # in the reader's order: compare sorted rows
    got = np.concatenate([p_xyz.double().numpy(), p_rgb.double().numpy() * 255], 1)
    want = np.concatenate([xyz, rgb], 1)
    got, want = got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])]
    np.testing.assert_allclose(got, want, atol=1e-4)

    # pinhole views: intrinsics as planted, pixels copied byte for byte, the mask kept
    fx, fy, cx, cy = CAMS[2][3]
    for i in (4, 5):
        np.testing.assert_allclose(scene.K(i).double(), [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    src = tmp_path / "garden" / "images" / "img_04.png"
    assert (scene.dslr_dir / "undistorted_images" / "img_04.png").read_bytes() == src.read_bytes()
    mask = scene.load_mask(4).numpy()
    assert not mask[10:30, 20:70].any() and mask.sum() == 90 * 120 - 20 * 50

    # distorted views: each prepared pixel shows the planted pattern where the test's own OpenCV
    # formula sends its ray in the source image
    _, w, h, params = CAMS[1]
    for i in range(4):
        K = scene.K(i).double().numpy()
        assert not np.allclose(K, [[130, 0, 81], [0, 128, 59], [0, 0, 1]])  # a new camera
        image = scene.load_image(i).double().numpy() * 255
        err, checked = undistortion_error(image, K, (w, h), params)
        assert checked > 0.9 and err < 3.0, (err, checked)


def test_downscaled_pinhole_views_scale_their_intrinsics(tmp_path):
    write_workspace(tmp_path / "garden", binary=False)
    _, root = _prepare(tmp_path / "garden", tmp_path / "out", "scenes.image_size=60")
    scene = open_scene(root, "garden")
    fx, fy, cx, cy = CAMS[2][3]
    assert (scene.width(4), scene.height(4)) == (60, 45)
    np.testing.assert_allclose(
        scene.K(4).double(), [[fx / 2, 0, cx / 2], [0, fy / 2, cy / 2], [0, 0, 1]], atol=1e-6
    )
    src = cv2.imread(str(tmp_path / "garden" / "images" / "img_04.png"))
    want = cv2.resize(src, (60, 45), interpolation=cv2.INTER_AREA)[..., ::-1]
    got = np.round(scene.load_image(4).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    assert all(max(scene.width(i), scene.height(i)) <= 60 for i in range(len(scene)))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photos_held_sideways_are_turned_upright_with_their_camera(tmp_path, orientation):
    """COLMAP poses a JPEG's stored pixels; a file whose EXIF orientation says the camera was
    held sideways is written upright, and its camera must see every point where the turned
    image shows it: raw pixel (x, y) -> (h - y, x) clockwise, (y, w - x) anticlockwise,
    (w - x, h - y) upside down."""
    ws, w, h = tmp_path / "ws", 120, 90
    (ws / "images").mkdir(parents=True)
    (ws / "sparse" / "0").mkdir(parents=True)
    raw = pattern_image(w, h)
    names = ["a.jpg", "b.jpg"]
    for name, tag in zip(names, (1, orientation), strict=True):
        im = Image.fromarray(raw)
        exif = im.getexif()
        exif[0x0112] = tag
        im.save(ws / "images" / name, quality=98, exif=exif)
    fx, fy, cx, cy = 100.0, 104.0, 57.0, 47.0
    (ws / "sparse" / "0" / "cameras.txt").write_text(f"1 PINHOLE {w} {h} {fx} {fy} {cx} {cy}\n")
    poses = planted_poses()[:2]
    (ws / "sparse" / "0" / "images.txt").write_text(
        "".join(
            f"{i + 1} {' '.join(f'{v:.15g}' for v in (*q, *t))} 1 {n}\n\n"
            for i, (n, (q, t)) in enumerate(zip(names, poses, strict=True))
        )
    )
    (ws / "sparse" / "0" / "points3D.txt").write_text("")
    _, root = _prepare(ws, tmp_path / "out", "scenes.image_size=0")
    scene = open_scene(root, "ws")
    vm_raw = reference_viewmat(*poses[1])
    K_raw = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    rng = np.random.default_rng(0)
    cam = np.concatenate([rng.uniform(-1, 1, (20, 2)), rng.uniform(2, 4, (20, 1))], 1)
    world = (cam - vm_raw[:3, 3]) @ vm_raw[:3, :3]  # points in front of camera b
    uv = (world @ vm_raw[:3, :3].T + vm_raw[:3, 3]) @ K_raw.T
    x, y = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
    want = {3: (w - x, h - y), 6: (h - y, x), 8: (y, w - x)}[orientation]
    vm, K = scene.viewmat(1).double().numpy(), scene.K(1).double().numpy()
    uv2 = (world @ vm[:3, :3].T + vm[:3, 3]) @ K.T
    np.testing.assert_allclose(uv2[:, 0] / uv2[:, 2], want[0], atol=1e-4)
    np.testing.assert_allclose(uv2[:, 1] / uv2[:, 2], want[1], atol=1e-4)
    turn = {3: cv2.ROTATE_180, 6: cv2.ROTATE_90_CLOCKWISE, 8: cv2.ROTATE_90_COUNTERCLOCKWISE}
    upright = cv2.rotate(raw, turn[orientation]).astype(np.float64)
    got = scene.load_image(1).double().numpy() * 255  # read as every stage reads it
    assert got.shape == upright.shape and np.abs(got - upright).mean() < 3
    assert (scene.width(0), scene.height(0)) == (w, h)  # the plain photo is as stored
    np.testing.assert_allclose(scene.viewmat(0).double(), reference_viewmat(*poses[0]), atol=1e-6)
