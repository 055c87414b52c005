"""The demo capture: one pinhole camera (`demo_K`) carried around the room on a hand-held-like
loop (`camera_path`). Poses are OpenCV world-to-camera matrices in the room's world frame, pixel
centres at +0.5 (docs/method.md, "Conventions")."""

from __future__ import annotations

import math

import numpy as np

from fit3d.scenes.demo.layout import Room


def demo_K(width: int, height: int, hfov_deg: float = 70.0) -> np.ndarray:
    """Intrinsics [3, 3] of a `hfov_deg` horizontal field of view, principal point centred."""
    f = width / (2 * math.tan(math.radians(hfov_deg) / 2))
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])


def _smooth(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """Smooth random signal over a closed loop of n samples, roughly in [-amp, amp]."""
    s = np.linspace(0, 2 * np.pi, n, endpoint=False)
    out = np.zeros(n)
    for k in (1, 2, 3):
        out += rng.normal(0, 1 / k) * np.sin(k * s + rng.uniform(0, 2 * np.pi))
    return amp * out / max(np.abs(out).max(), 1e-9)


def camera_path(room: Room, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Hand-held-like loop of n world-to-camera [4, 4] matrices (world z up).

    Cameras stay >= 1.1 m from the walls at 1.15-1.75 m height, so they are never inside
    furniture (wall items deeper than 1 m are below 1 m, the centre group is below 1.15 m).
    """
    w, dpt = room.size[0] / 2, room.size[1] / 2
    ax, ay = w - 1.15, dpt - 1.15
    phase = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, n, endpoint=False)
    phase += _smooth(rng, n, 0.15)
    pos = np.stack([ax * np.cos(phase), ay * np.sin(phase), 1.45 + _smooth(rng, n, 0.3)], 1)
    pos[:, :2] += np.stack([_smooth(rng, n, 0.1), _smooth(rng, n, 0.1)], 1)
    # look across the room at a point on the far walls, sweeping left/right of the centre
    look = phase + np.pi + _smooth(rng, n, 1.4) + rng.normal(0, 0.08, n)
    target = np.stack(
        [
            0.9 * w * np.cos(look),
            0.9 * dpt * np.sin(look),
            0.9 + _smooth(rng, n, 0.55) + rng.normal(0, 0.05, n),
        ],
        1,
    )
    roll = _smooth(rng, n, 0.05) + rng.normal(0, 0.01, n)
    views = []
    for p, q, r in zip(pos, target, roll, strict=True):
        fwd = (q - p) / np.linalg.norm(q - p)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        right, down = np.cos(r) * right + np.sin(r) * down, -np.sin(r) * right + np.cos(r) * down
        c2w = np.eye(4)
        c2w[:3, :3] = np.stack([right, down, fwd], 1)
        c2w[:3, 3] = p
        views.append(np.linalg.inv(c2w))
    return views
