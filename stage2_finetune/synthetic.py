"""Synthetic stage-1 runs for tests and benchmarks: tiny ScanNet++-layout scenes with random
images, and lifted scenes of random Gaussians in front of their cameras (the stage-1 contract of
`fit3d.gaussians`, nothing learnt). Camera k sits at x = 0.1 k looking down +z (OpenCV axes)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fit3d.gaussians import save_lifted_scene
from fit3d.scenes.scannetpp import viewmat_to_nerfstudio

WIDTH, HEIGHT, FOCAL = 70, 56, 60.0
"""Default image size (pixels) and focal length of the synthetic scenes."""


def viewmat(k: int) -> np.ndarray:
    """World-to-camera [4, 4] of view k: identity rotation, camera moving along x."""
    vm = np.eye(4)
    vm[0, 3] = -0.1 * k
    return vm


def write_scenes(
    root: Path,
    ids: list[str],
    n_views: int = 6,
    test_every: int = 3,
    width: int = WIDTH,
    height: int = HEIGHT,
    seed: int = 0,
) -> Path:
    """ScanNet++ DSLR scenes under `root`: random images, anonymisation masks whose invalid left
    strip is 5 + k pixels wide in view k, poses `viewmat(k)`; every `test_every`-th view (the
    last of each group) is a test view. All of `ids` go in the train split, the last one also in
    the val split."""
    rng = np.random.default_rng(seed)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "nvs_sem_train.txt").write_text("\n".join(ids) + "\n")
    (root / "splits" / "nvs_sem_val.txt").write_text(ids[-1] + "\n")
    for sid in ids:
        dslr = root / "data" / sid / "dslr"
        for d in ("undistorted_images", "undistorted_anon_masks", "nerfstudio"):
            (dslr / d).mkdir(parents=True, exist_ok=True)
        frames, train, test = [], [], []
        for k in range(n_views):
            name = f"DSC{k:04d}.JPG"
            img = (rng.random((height, width, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(dslr / "undistorted_images" / name), img)
            mask = np.full((height, width), 255, np.uint8)
            mask[:, : 5 + k] = 0
            cv2.imwrite(str(dslr / "undistorted_anon_masks" / f"DSC{k:04d}.png"), mask)
            c2w = viewmat_to_nerfstudio(viewmat(k))
            frames.append(
                {
                    "file_path": name,
                    "transform_matrix": c2w.tolist(),
                    "mask_path": f"DSC{k:04d}.png",
                }
            )
            (test if k % test_every == test_every - 1 else train).append(name)
        meta = {"fl_x": FOCAL, "fl_y": FOCAL, "cx": width / 2, "cy": height / 2}
        meta |= {"w": width, "h": height, "frames": frames}
        (dslr / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
        (dslr / "train_test_lists.json").write_text(json.dumps({"train": train, "test": test}))
    return root


def write_lift_run(
    run_dir: Path,
    scenes_root: Path,
    ids: list[str],
    C: int = 48,
    D: int = 8,
    N: int = 300,
    seed: int = 1,
) -> Path:
    """A stage-1 run folder: per scene, N random Gaussians (D-dim features) in a box 2-3 m in
    front of the cameras and a random decoder to width C; meta says backbone `test_tiny`."""
    g = torch.Generator().manual_seed(seed)
    for i, sid in enumerate(ids):
        means = torch.rand(N, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
        means += torch.tensor([-1.2, -1.0, 2.0])
        gaussians = {
            "means": means,
            "quats": F.normalize(torch.randn(N, 4, generator=g), dim=1),
            "scales": torch.rand(N, 3, generator=g) * 0.08 + 0.02,
            "opacities": torch.rand(N, generator=g) * 0.5 + 0.4,
            "sh": torch.randn(N, 16, 3, generator=g) * 0.1,
            "features": torch.randn(N, D, generator=g),
        }
        decoder = torch.randn(C, D, 3, 3, generator=g) * 0.1
        meta = {
            "scene_id": sid,
            "scenes_root": str(scenes_root),
            "resolution": 1.0,
            "backbone": "test_tiny",
            "timm_name": "vit_small_patch14_dinov2",
            "embed_dim": C,
            "feature_dim": D,
            "sh_degree": 3,
            "weights": {"source": "random", "path": "", "sha256": ""},
            "steps": 1,
            "num_gaussians": N,
            "seconds": 0.0,
            "git_commit": "test",
            "metrics": {"psnr": 0.0, "feat_l1": 0.0, "feat_cos": 0.0},
            "index": i,
        }
        save_lifted_scene(run_dir / sid, gaussians, decoder, meta)
    return run_dir
