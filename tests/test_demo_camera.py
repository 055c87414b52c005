"""Demo capture: the intrinsics' field of view and the hand-held-like camera loop."""

from __future__ import annotations

import math

import numpy as np

from fit3d.scenes.demo.camera import camera_path, demo_K
from fit3d.scenes.demo.layout import build_room


def test_demo_K_has_the_requested_field_of_view():
    K = demo_K(336, 224, hfov_deg=70.0)
    assert math.isclose(math.degrees(2 * math.atan(336 / 2 / K[0, 0])), 70.0, abs_tol=1e-9)
    assert K[0, 0] == K[1, 1] and (K[0, 2], K[1, 2]) == (168, 112)  # square pixels, centred


def test_camera_path_is_hand_held_like():
    rng = np.random.default_rng(0)
    room = build_room(rng)
    vms = np.stack(camera_path(room, 40, rng))
    R = vms[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3)) and np.allclose(np.linalg.det(R), 1)
    centres = -np.einsum("nji,nj->ni", R, vms[:, :3, 3])
    rel = np.einsum("aij,bkj->abik", R, R)
    ang = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=2, axis2=3) - 1) / 2, -1, 1)))
    consecutive = np.array([ang[i, i + 1] for i in range(39)])
    assert consecutive.max() < 35  # neighbours overlap
    assert (ang[np.triu_indices(40, 1)] < 10).any() and (ang > 60).any()
    assert np.ptp(centres[:, 2]) > 0.2  # height varies
    pitch = np.degrees(np.arcsin(R[:, 2, 2]))  # camera z axis, world z component
    assert np.ptp(pitch) > 10
    half = room.size[:2] / 2
    assert (np.abs(centres[:, :2]) < half - 0.9).all()  # inside the room, away from the walls
    assert (-R[:, 1, 2] > 0.8).all()  # image up (-y) within 37 deg of world up: no tumbling
