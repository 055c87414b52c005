"""Generated lifted scenes for the viewer's tests and benchmark (no lifting run needed).

`write_wall_scene` writes a tiny scene dataset in the ScanNet++ layout (a textured wall at z = 3
seen by a row of pinhole cameras, images computed by ray-plane intersection);
`write_synthetic_lift` writes a lifted scene in `fit3d.gaussians`' format whose Gaussians lie on
that wall, coloured by the same texture, with features that vary differently from the colours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from fit3d.gaussians import save_lifted_scene
from fit3d.lift.model import SH_C0
from fit3d.scenes.scannetpp import viewmat_to_nerfstudio

WALL_Z = 3.0


def wall_texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Colour [..., 3] in [0, 1] of the wall point (x, y, WALL_Z)."""
    return np.stack(
        [0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2 * y), 0.5 + 0.3 * np.sin(2 * x + y)], -1
    )


def _viewmat(k: int, n: int) -> np.ndarray:
    """World-to-camera [4, 4] of camera k of n: on the x axis, looking along +z, small yaw."""
    yaw = 0.1 * (k - (n - 1) / 2)
    c, s = math.cos(yaw), math.sin(yaw)
    c2w = np.eye(4)
    c2w[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    c2w[:3, 3] = [0.4 * (k - (n - 1) / 2), 0.0, 0.0]
    return np.linalg.inv(c2w)


def write_wall_scene(
    root: Path, scene_id: str = "wall", n_views: int = 4, width: int = 96, height: int = 64
) -> Path:
    """Scene dataset root with one scene (all views train views); returns `root`."""
    dslr = root / "data" / scene_id / "dslr"
    (dslr / "undistorted_images").mkdir(parents=True, exist_ok=True)
    (dslr / "nerfstudio").mkdir(exist_ok=True)
    focal = 0.9 * width
    K = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
    frames = []
    for k in range(n_views):
        viewmat = _viewmat(k, n_views)
        c2w = np.linalg.inv(viewmat)
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T @ c2w[:3, :3].T
        hit = c2w[:3, 3] + rays * ((WALL_Z - c2w[2, 3]) / rays[..., 2])[..., None]
        img = (wall_texture(hit[..., 0], hit[..., 1]) * 255).round().astype(np.uint8)
        name = f"DSC{k:04d}.JPG"
        cv2.imwrite(str(dslr / "undistorted_images" / name), img[..., ::-1])
        pose = viewmat_to_nerfstudio(viewmat).tolist()
        frames.append({"file_path": name, "transform_matrix": pose})
    meta = {"fl_x": focal, "fl_y": focal, "cx": width / 2, "cy": height / 2}
    meta |= {"w": width, "h": height, "frames": frames, "test_frames": []}
    (dslr / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "nvs_sem_train.txt").write_text(scene_id + "\n")
    return root


def write_synthetic_lift(
    path: Path,
    n: int,
    scenes_root: Path | None = None,
    scene_id: str = "wall",
    feature_dim: int = 8,
    embed_dim: int = 48,
    sh_degree: int = 0,
    backbone: str = "test_tiny",
    seed: int = 0,
) -> Path:
    """A lifted scene of n Gaussians on the wall (|x| <= 2, |y| <= 1.3), written at `path`.

    Colours follow `wall_texture`; features [n, D] are smooth in (x, y) with other frequencies,
    so PCA and RGB colourings differ. Decoder weight [C, D, 3, 3] is random (seeded).
    """
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([4.0, 2.6]) - torch.tensor([2.0, 1.3])
    means = torch.cat([xy, torch.full((n, 1), WALL_Z)], 1)  # [n, 3]
    spacing = math.sqrt(4.0 * 2.6 / n)
    scales = torch.tensor([1.2 * spacing, 1.2 * spacing, 0.1 * spacing]).expand(n, 3).clone()
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    rgb = torch.from_numpy(wall_texture(xy[:, 0].numpy(), xy[:, 1].numpy())).float()  # [n, 3]
    sh = torch.zeros(n, (sh_degree + 1) ** 2, 3)
    sh[:, 0] = (rgb - 0.5) / SH_C0
    freqs = torch.randn(2, feature_dim, generator=gen) * 2.0
    phase = torch.rand(feature_dim, generator=gen) * 2 * math.pi
    features = torch.sin(xy @ freqs + phase)  # [n, D]
    weight = torch.randn(embed_dim, feature_dim, 3, 3, generator=gen) / math.sqrt(9 * feature_dim)
    meta = {
        "scene_id": scene_id,
        "scenes_root": str(scenes_root) if scenes_root else "",
        "resolution": 1.0,
        "backbone": backbone,
        "embed_dim": embed_dim,
        "feature_dim": feature_dim,
        "sh_degree": sh_degree,
        "weights": {"source": "random", "path": "", "sha256": ""},
        "num_gaussians": n,
    }
    gaussians = {
        "means": means,
        "quats": quats,
        "scales": scales,
        "opacities": torch.full((n,), 0.9),
        "sh": sh,
        "features": features,
    }
    save_lifted_scene(path, gaussians, weight, meta)
    return path
