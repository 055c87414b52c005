"""Independent references for the own-scene tests: a smooth planted image pattern, COLMAP's OPENCV
distortion written from its formula, and the check that an undistorted view shows the pattern
where that formula sends each of its pixels' rays."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth RGB [..., 3] (0-255) at continuous image coordinates (pixel centres at +0.5)."""
    return np.stack(
        [
            128 + 90 * np.sin(x / 9.0),
            128 + 90 * np.cos(y / 8.0),
            128 + 60 * np.sin((x + y) / 13.0),
        ],
        -1,
    )


def pattern_image(width: int, height: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] of `pattern` sampled at the pixel centres."""
    x, y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    return np.round(pattern(x, y)).astype(np.uint8)


def opencv_distort(xn: np.ndarray, yn: np.ndarray, k1, k2, p1, p2) -> tuple:
    """COLMAP's OPENCV model on normalised coordinates (radial k1 k2, tangential p1 p2)."""
    r2 = xn**2 + yn**2
    radial = 1 + k1 * r2 + k2 * r2**2
    xd = xn * radial + 2 * p1 * xn * yn + p2 * (r2 + 2 * xn**2)
    yd = yn * radial + p1 * (r2 + 2 * yn**2) + 2 * p2 * xn * yn
    return xd, yd


def undistortion_error(
    image: np.ndarray, K: np.ndarray, source: tuple[int, int], params: list[float]
) -> tuple[float, float]:
    """(max abs error in 0-255 levels, fraction of pixels checked) of an undistorted RGB image
    [H, W, 3] (0-255) with pinhole K [3, 3] against `pattern` seen through an OPENCV camera
    (fx, fy, cx, cy, k1, k2, p1, p2) of size `source` (w, h); pixels whose ray lands within
    1.5 px of the source border are not checked."""
    fx, fy, cx, cy, k1, k2, p1, p2 = params
    h, w = image.shape[:2]
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xd, yd = opencv_distort((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], k1, k2, p1, p2)
    xs, ys = fx * xd + cx, fy * yd + cy
    inner = (xs > 1.5) & (ys > 1.5) & (xs < source[0] - 1.5) & (ys < source[1] - 1.5)
    return float(np.abs(image - pattern(xs, ys))[inner].max()), float(inner.mean())


def wall_texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth colour [..., 3] in [0, 1] on the wall plane z = 3."""
    return np.stack(
        [0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2 * y), 0.5 + 0.3 * np.sin(2 * x + y)], -1
    )


def write_wall_scene(folder: Path, n_views: int = 10, width: int = 48, height: int = 32) -> None:
    """A nerfstudio folder: a textured wall (z = 3) seen by n_views pinhole cameras sliding along
    x (images by ray-plane intersection, independent of any renderer), and a PLY of 300 points on
    the wall; OpenGL camera-to-world poses, as nerfstudio stores them."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True)
    focal = 40.0
    K = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
    frames = []
    for k in range(n_views):
        yaw = 0.04 * (k - n_views / 2)
        c2w = np.eye(4)  # OpenCV axes first
        c2w[:3, :3] = [[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]
        c2w[:3, 3] = [0.15 * k - 0.7, 0.05 * k, 0.0]
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T @ c2w[:3, :3].T
        hit = c2w[:3, 3] + rays * ((3.0 - c2w[2, 3]) / rays[..., 2])[..., None]
        img = (wall_texture(hit[..., 0], hit[..., 1]) * 255).round().astype(np.uint8)
        name = f"images/{k:04d}.png"
        cv2.imwrite(str(folder / name), img[..., ::-1])
        gl = c2w.copy()
        gl[:3, 1:3] *= -1  # OpenCV -> OpenGL camera axes
        frames.append({"file_path": name, "transform_matrix": gl.tolist()})
    rng = np.random.default_rng(0)
    xy = rng.uniform([-2.6, -1.6], [2.6, 2.0], size=(300, 2))
    rgb = (wall_texture(xy[:, 0], xy[:, 1]) * 255).round().astype(int)
    head = "ply\nformat ascii 1.0\nelement vertex 300\n"
    head += "property float x\nproperty float y\nproperty float z\n"
    head += "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    rows = "".join(f"{x} {y} 3.0 {r} {g} {b}\n" for (x, y), (r, g, b) in zip(xy, rgb, strict=True))
    (folder / "points.ply").write_text(head + rows)
    meta = {"fl_x": focal, "fl_y": focal, "cx": width / 2, "cy": height / 2, "w": width}
    meta |= {"h": height, "ply_file_path": "points.ply", "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta))
