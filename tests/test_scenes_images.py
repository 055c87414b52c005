"""`scenes.name=images`: a generated demo room posed from its images alone (poses, intrinsics and
points withheld) against its true cameras after a similarity alignment computed here (Umeyama),
a video of it, the cache and resume, and bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from fit3d.config import load_config
from fit3d.errors import UserError
from fit3d.lift.model import scene_extent
from fit3d.scenes import open_scene, scenes_root
from fit3d.scenes.demo import generate_demo
from fit3d.scenes.own import prepare
from fit3d.scenes.own.__main__ import main as own_main
from fit3d.scenes.own.images import _extract_frames, _pairs
from fit3d.scenes.scannetpp import IMAGE_DIR


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> tuple[Path, Path]:
    """(demo root, a folder holding only the room's 40 JPEGs) of the demo preset's first room."""
    base = tmp_path_factory.mktemp("room")
    demo = generate_demo(base / "demo", seed=0, n_train=1, n_val=0, workers=1)
    photos = base / "photos" / "room"
    photos.mkdir(parents=True)
    for f in sorted((demo / "data" / "demo_000" / "dslr" / IMAGE_DIR).iterdir()):
        shutil.copy2(f, photos / f.name)
    return demo, photos


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (s, R [3, 3], t [3]) with dst ~ s R src + t (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = np.trace(np.diag(sig) @ d) / (a**2).sum(1).mean()
    return scale, rot, mu_d - scale * rot @ mu_s


def centres(viewmats: np.ndarray) -> np.ndarray:
    return np.stack([-vm[:3, :3].T @ vm[:3, 3] for vm in viewmats])


def _cfg(photos: Path, out: Path, *extra: str):
    return load_config(["images"], [f"scenes.root={photos}", f"run.out={out}", *extra])


@pytest.mark.slow
def test_demo_room_poses_recovered_from_its_images_alone(room, tmp_path, capsys):
    demo, photos = room
    cfg = _cfg(photos, tmp_path / "out")
    with pytest.raises(UserError, match="not prepared"):
        scenes_root(cfg)
    root = prepare(cfg, verbose=False)
    assert scenes_root(cfg) == root
    est, true = open_scene(root, "room"), open_scene(demo, "demo_000")
    names = [est.image_name(i) for i in range(len(est))]
    assert names == [true.image_name(i) for i in range(len(true))]  # every view registered
    assert est.test_views == true.test_views  # every 8th, as the demo holds out
    vm_est, vm_true = est.cameras()[0].double().numpy(), true.cameras()[0].double().numpy()
    s, rot, t = umeyama(centres(vm_est), centres(vm_true))
    err = np.linalg.norm(s * centres(vm_est) @ rot.T + t - centres(vm_true), axis=1)
    extent = scene_extent(true.cameras()[0])
    assert np.median(err) < 0.02 * extent, (np.median(err), extent)
    rel = vm_est[:, :3, :3] @ rot.T @ vm_true[:, :3, :3].transpose(0, 2, 1)
    deg = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.median(deg) < 1.0, np.median(deg)
    # the sparse points lie on the room's surfaces: through the alignment they project into the
    # true views at the true depth (median relative depth error of the visible points)
    xyz = est.points()[0].double().numpy() @ rot.T * s + t
    rel_err = []
    for i in (0, 13, 26):
        depth = true.load_depth(i).double().numpy()
        cam = xyz @ vm_true[i][:3, :3].T + vm_true[i][:3, 3]
        uv = cam @ true.K(i).double().numpy().T
        z = cam[:, 2]
        px = np.floor(uv[:, :2] / uv[:, 2:]).astype(int)
        ok = (z > 0.1) & (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < 336) & (px[:, 1] < 224)
        d = depth[px[ok, 1], px[ok, 0]]
        rel_err.append(np.abs(d - z[ok])[d > 0] / z[ok][d > 0])
    assert np.median(np.concatenate(rel_err)) < 0.02
    # cached: a second run finds the scene prepared and does no work
    capsys.readouterr()
    assert own_main(["--preset", "images", f"scenes.root={photos}", f"run.out={tmp_path}/out"]) == 0
    assert "prepared already" in capsys.readouterr().out


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()


def test_video_frames_every_nth_resumable(tmp_path):
    levels = [20 * k for k in range(10)]
    _write_video(tmp_path / "v.avi", [np.full((48, 64, 3), v, np.uint8) for v in levels], 5.0)
    out = tmp_path / "frames"
    names = _extract_frames(tmp_path / "v.avi", out, 3, verbose=False)
    assert names == ["frame_000000.jpg", "frame_000003.jpg", "frame_000006.jpg", "frame_000009.jpg"]
    for name, k in zip(names, (0, 3, 6, 9), strict=True):
        assert abs(cv2.imread(str(out / name)).mean() - levels[k]) < 3
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[1]).unlink()  # an interrupted extraction: only the missing frame is written
    assert _extract_frames(tmp_path / "v.avi", out, 3, verbose=False) == names
    assert all((out / n).stat().st_mtime_ns == before[n] for n in names if n != names[1])
    assert sorted(p.name for p in out.iterdir()) == names


@pytest.mark.slow
def test_video_of_the_room_is_posed_with_sequential_matching(room, tmp_path):
    _, photos = room
    frames = [cv2.imread(str(f)) for f in sorted(photos.iterdir())]
    _write_video(tmp_path / "walk" / "walk.avi", frames, 2.0)  # 2 fps: every frame kept
    root = prepare(_cfg(tmp_path / "walk", tmp_path / "out"), verbose=False)
    scene = open_scene(root, "walk")
    rec = json.loads((root / "data" / "walk" / "prepared.json").read_text())
    assert rec["input"] == "video" and rec["frame_step"] == 1 and rec["registered"] == 40
    assert len(scene) == 40 and len(scene.test_views) == 5


def test_sequential_pairs_are_neighbours_and_doubling_strides():
    names = [f"{k:03d}" for k in range(40)]
    pairs = _pairs(names, "sequential")
    want = {(a, b) for a in range(40) for b in range(a + 1, min(a + 11, 40))}
    want |= {(a, a + s) for a in range(40) for s in (16, 32) if a + s < 40}
    assert {(int(a), int(b)) for a, b in pairs} == want
    assert len(_pairs(names, "exhaustive")) == 40 * 39 // 2


def _bad(argv_root: Path, out: Path, capsys) -> str:
    argv = ["--preset", "images", f"scenes.root={argv_root}", f"run.out={out}"]
    assert own_main(argv) == 2
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    said = [ln for ln in lines if ln.strip() and "%|" not in ln]  # progress bars aside
    assert len(said) == 1 and said[0].startswith("error: "), said
    return said[0]


def _nothing_prepared(out: Path) -> None:
    """No prepared scene, no marker, no temporary file anywhere under `out`."""
    assert not list(out.rglob("own.json")) and not list(out.rglob("prepared.json"))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not list(out.rglob("undistorted_images"))


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _bad(tmp_path / "empty", tmp_path / "out", capsys)
    assert "too few images" in err and "20 or more" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "shots"
    folder.mkdir()
    for k in range(3):
        cv2.imwrite(str(folder / f"ok_{k}.jpg"), np.full((40, 60, 3), 40 * k, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    err = _bad(folder, tmp_path / "out", capsys)
    assert "unreadable image" in err and "broken.jpg" in err
    assert not (tmp_path / "out").exists()


def test_two_unrelated_photos(room, tmp_path, capsys):
    _, photos = room
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy2(photos / "DSC00000.JPG", folder / "a.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (224, 336, 3)).astype(np.uint8)
    cv2.imwrite(str(folder / "b.jpg"), cv2.GaussianBlur(noise, (5, 5), 2))
    err = _bad(folder, tmp_path / "out", capsys)
    assert "no overlap" in err and "nearby viewpoints" in err
    _nothing_prepared(tmp_path / "out")
