"""What the viewer shows, computed without a browser: splat geometry, colours, picking, cameras.

Decoded feature of one Gaussian: the scene's decoder is `Conv2d(D, C, 3, padding=1)` applied to a
rendered feature map (docs/method.md, "Stage 1: lifting"). A Gaussian seen alone covers many pixels
with one D-vector f, and a 3x3 convolution of a constant map is, away from the border, the kernel
summed over its nine taps applied to f. So the decoded feature of a Gaussian is
`W_sum @ f` with `W_sum = weight.sum((2, 3))` [C, D]. The centre tap alone would describe a
Gaussian one pixel wide surrounded by zero features, which no rendered view contains.

Cosine similarity to a query Gaussian q never needs the [N, C] decoded matrix:
`cos(W f_i, W f_q) = f_i . (W^T W f_q) / (|W f_i| |W f_q|)`, so the viewer keeps the D-vectors
and one norm per Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fit3d.gaussians import LiftedScene
from fit3d.lift.model import SH_C0
from fit3d.render._project import quat_to_rotmat
from fit3d.viz import pca_rgb, to_uint8

CHUNK = 65536
"""Gaussians per chunk when decoding, so no [N, C] temporary is larger than [CHUNK, C]."""


def summed_kernel(decoder_weight: Tensor) -> Tensor:
    """Decoder weight [C, D, 3, 3] -> [C, D]: the decoder applied to a constant feature map."""
    return decoder_weight.detach().float().sum((2, 3))


def decode(features: Tensor, decoder_weight: Tensor) -> Tensor:
    """Per-Gaussian decoded features: features [N, D] -> [N, C] (see the module docstring)."""
    return features.float() @ summed_kernel(decoder_weight).T


def display_subset(opacities: Tensor, scales: Tensor, max_count: int) -> Tensor:
    """Indices [M] (sorted) of the Gaussians to display, M = min(N, max_count).

    When the scene is larger than the cap, keep the most visible ones: largest
    opacity x (product of the two largest scales), a Gaussian's footprint times its alpha; among
    equal scores the lower index (a stable sort: `topk` leaves ties in no stated order).
    """
    n = len(opacities)
    if max_count <= 0 or n <= max_count:
        return torch.arange(n)
    top2 = scales.float().topk(2, dim=1).values  # [N, 2]
    score = opacities.float() * top2[:, 0] * top2[:, 1]  # [N]
    return torch.argsort(score, descending=True, stable=True)[:max_count].sort().values


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances [N, 3, 3] = R S S R^T of wxyz quats [N, 4] and scales [N, 3]."""
    out = torch.empty(len(quats), 3, 3)
    for s in range(0, len(quats), CHUNK):
        m = quat_to_rotmat(quats[s : s + CHUNK].float()) * scales[s : s + CHUNK, None, :].float()
        out[s : s + CHUNK] = m @ m.transpose(1, 2)
    return out


def rgb_colours(sh: Tensor) -> np.ndarray:
    """View-independent colour of each Gaussian: the SH degree-0 term, sh [N, K, 3] -> uint8
    [N, 3] (colour = SH_C0 * dc + 0.5, clamped)."""
    rgb = (SH_C0 * sh[:, 0, :].float() + 0.5).clamp(0, 1)  # [N, 3]
    return (rgb.numpy() * 255).round().astype(np.uint8)


def pca_colours(features: Tensor, decoder_weight: Tensor) -> np.ndarray:
    """PCA colours of the decoded features, one basis for the whole scene: uint8 [N, 3].

    The decoded features go to `pca_rgb` as one-pixel-wide maps of CHUNK Gaussians each, so
    its projection step never holds more than one chunk's [CHUNK, C] temporary.
    """
    w = summed_kernel(decoder_weight)  # [C, D]
    maps = [
        (features[s : s + CHUNK].float() @ w.T).T[:, :, None]  # [C, n, 1]
        for s in range(0, len(features), CHUNK)
    ]
    pictures = pca_rgb(maps)  # each [n, 1, 3] in [0, 1]
    return np.concatenate([to_uint8(p[:, 0]) for p in pictures])


@dataclass
class FeatureIndex:
    """Cosine similarity between decoded features without storing them (module docstring)."""

    features: Tensor  # [N, D] float32
    kernel: Tensor  # [C, D] summed decoder kernel
    norms: Tensor  # [N] |W_sum f_i|

    @classmethod
    def build(cls, features: Tensor, decoder_weight: Tensor) -> FeatureIndex:
        """Precompute the decoded norms chunk by chunk."""
        feats = features.float()
        w = summed_kernel(decoder_weight)
        norms = torch.cat(
            [(feats[s : s + CHUNK] @ w.T).norm(dim=1) for s in range(0, len(feats), CHUNK)]
        )
        return cls(feats, w, norms)

    def similarity(self, query: int) -> Tensor:
        """Cosine similarity [N] of every decoded feature to that of Gaussian `query`."""
        q = self.kernel @ self.features[query]  # [C]
        num = self.features @ (self.kernel.T @ q)  # [N]
        return num / (self.norms * q.norm()).clamp_min(1e-12)


def similarity_colours(sim: Tensor) -> np.ndarray:
    """Cosine similarities [N] -> uint8 [N, 3] with matplotlib's `turbo` map, stretched from
    the 1st percentile (blue) to the maximum (red)."""
    from matplotlib import colormaps

    lo = float(torch.quantile(sim[torch.randperm(len(sim))[:100000]], 0.01)) if len(sim) else 0
    hi = float(sim.max()) if len(sim) else 1
    t = ((sim - lo) / max(hi - lo, 1e-6)).clamp(0, 1).numpy()
    return (colormaps["turbo"](t)[:, :3] * 255).round().astype(np.uint8)


def pick_along_ray(
    means: Tensor, scales: Tensor, opacities: Tensor, origin: np.ndarray, direction: np.ndarray
) -> int | None:
    """The Gaussian a ray hits first: among Gaussians in front of `origin` whose centre lies
    within 2 of their largest scales of the ray (opacity >= 0.1), the nearest along the ray;
    if none qualifies, the one whose centre is closest to the ray. None for an empty scene.

    means [N, 3], scales [N, 3], opacities [N]; origin, direction: [3] world coordinates.
    """
    if len(means) == 0:
        return None
    o = torch.as_tensor(np.asarray(origin, dtype=np.float32))
    d = torch.as_tensor(np.asarray(direction, dtype=np.float32))
    d = d / d.norm().clamp_min(1e-12)
    rel = means.float() - o  # [N, 3]
    along = rel @ d  # [N]
    perp = (rel - along[:, None] * d).norm(dim=1)  # [N]
    radius = 2.0 * scales.float().max(dim=1).values
    hit = (along > 0) & (perp <= radius) & (opacities.float() >= 0.1)
    if hit.any():
        cand = hit.nonzero()[:, 0]
        return int(cand[along[cand].argmin()])
    front = along > 0
    dist = torch.where(front, perp, torch.full_like(perp, math.inf))
    if not front.any():
        dist = perp
    return int(dist.argmin())


def up_direction(viewmats: Tensor) -> np.ndarray:
    """World up [3] (unit) guessed from cameras held upright: the mean of their -y axes.

    viewmats [V, 4, 4] world-to-camera, OpenCV axes (y points down in the image).
    """
    up = -viewmats[:, 1, :3].double().mean(0)  # row 1 of R_cw = camera y axis in world
    n = float(up.norm())
    return (up / n).numpy() if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def camera_pose(viewmat: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera [4, 4] -> (wxyz [4], position [3]) of the camera in the world (OpenCV
    axes, the convention of viser's frustums and client cameras)."""
    from viser import transforms as vtf

    c2w = torch.linalg.inv(viewmat.double()).numpy()
    return vtf.SO3.from_matrix(c2w[:3, :3]).wxyz, c2w[:3, 3]


def vertical_fov(K: Tensor, height: int) -> float:
    """Vertical field of view (radians) of intrinsics [3, 3] at image height `height`."""
    return 2.0 * math.atan(0.5 * height / float(K[1, 1]))


def scene_summary(scene: LiftedScene, shown: int) -> str:
    """One line for the GUI and the terminal: how many Gaussians are shown, and why."""
    n = len(scene.gaussians["means"])
    meta = scene.meta
    head = f"{meta.get('scene_id', '?')}: {meta.get('backbone', '?')}, "
    m = meta.get("metrics") or {}
    held = ""  # stage 1's label-free check on the scene's held-out views
    if m.get("psnr") is not None and m.get("feat_cos") is not None:
        held = (
            f"; held-out views ({m.get('views', '?')}): PSNR {m['psnr']:.2f} dB, "
            f"feature cosine {m['feat_cos']:.3f}"
        )
    if shown < n:
        return (
            head + f"showing {shown:,} of {n:,} Gaussians (the most opaque x largest; "
            "raise --max-gaussians to show more)" + held
        )
    return head + f"{n:,} Gaussians" + held
