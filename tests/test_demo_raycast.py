"""The ray caster's culling only skips misses: its nearest hits equal casting every ray against
every primitive, bit for bit (t and the lowest id among ties), on random ray groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fit3d.scenes.demo.layout import build_room
from fit3d.scenes.demo.raycast import (
    RoomTensors,
    _cast_objects,
    _hit_boxes,
    _hit_cyls_xyz,
    _hit_spheres,
)


def _brute_force(T: RoomTensors, apex: torch.Tensor, d: torch.Tensor):
    """Nearest furniture hit of rays from apex [3] along d [R, 3], testing every primitive:
    t [R] (inf = none) and id [R] (6 + index, lowest among ties; 0 = none)."""
    dx, dy, dz = d.T  # [R] each
    ts = []
    if T.nb:
        full = [c.expand(T.nb, -1) for c in (dx, dy, 1.0 / dz)]  # [Mb, R]
        ts.append(_hit_boxes(apex - T.b_c, *full, T.b_h, T.b_cos, T.b_sin))
    if T.nc:
        side, cap = _hit_cyls_xyz(
            (apex[0] - T.c_xy[:, 0])[:, None],
            (apex[1] - T.c_xy[:, 1])[:, None],
            apex[2],
            *(c.expand(T.nc, -1) for c in (dx, dy, dz)),
            T.c_r[:, None],
            T.c_z0[:, None],
            T.c_z1[:, None],
        )
        ts.append(torch.minimum(side, cap))
    if T.ns:
        ts.append(_hit_spheres(apex, d[None], T.s_c[:, None], T.s_r[:, None]))
    t = torch.cat(ts)  # [M, R]
    near = t.amin(0)
    first = (t == near).int().argmax(0)  # the lowest index at the minimum
    return near, torch.where(torch.isfinite(near), first + 6, 0)


@pytest.mark.parametrize("seed", [0, 5])
def test_culled_casting_equals_brute_force(seed):
    room = build_room(np.random.default_rng(seed), footprint=0.01)
    T = RoomTensors(room)
    gen = torch.Generator().manual_seed(seed)
    size = T.size * torch.tensor([0.95, 0.95, 0.98])
    box_top = T.b_c[0] + torch.tensor([0.0, 0.0, 1.0]) * (T.b_h[0, 2] + 1e-3)
    apexes = [T.light, box_top] + [
        (torch.rand(3, generator=gen) - torch.tensor([0.5, 0.5, 0.0])) * size for _ in range(3)
    ]
    G, S = 8, 256
    hits = 0
    for k, apex in enumerate(apexes):
        spread = (0.003, 0.03, 0.3, 1.0)[k % 4]  # pixel tiles up to scattered directions
        axis = torch.nn.functional.normalize(torch.randn(G, 1, 3, generator=gen), dim=-1)
        d = axis + spread * torch.randn(G, S, 3, generator=gen)
        d = d * (0.2 + 3 * torch.rand(G, S, 1, generator=gen))  # any lengths, like shadow rays
        if k == 4:
            d[..., 2] = 0.0  # horizontal rays: 1 / dz = inf
        t, pid = _cast_objects(T, apex, d)
        t_ref, pid_ref = _brute_force(T, apex, d.reshape(-1, 3))
        assert torch.equal(t.reshape(-1), t_ref)
        assert torch.equal(pid.reshape(-1), pid_ref)
        assert torch.equal(_cast_objects(T, apex, d, ids=False)[0], t)
        hits += int(torch.isfinite(t_ref).sum())
    assert hits > 1000  # the rays do meet furniture
