"""A demo room as a triangle mesh with per-vertex colours, segments and instances.

The mesh is the room's analytic solids, tessellated: planar faces (the shell, every box face) as
grids of cells at most `MESH_STEP` metres wide, cylinders with `ROUND_SEGMENTS` facets around
and fans on their caps, spheres as latitude-longitude grids. Vertices lie exactly on the solids
(curved surfaces are inscribed: the sagitta is below 0.2 mm for the demo's radii), in the room's
world frame, which is the COLMAP frame of the poses (docs/method.md, "ScanNet++ layout and
poses"). No vertex is shared between primitives, so every triangle belongs to one primitive and
one instance. Triangles wind counter-clockwise seen from outside a solid (from inside the room
for the shell), so their geometric normals point at the side a camera can see.

Vertex colours are the ray caster's shading (texture, light, shadows) at the vertex, as if the
scan had been coloured from the photographs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fit3d.scenes.demo.layout import Room
from fit3d.scenes.demo.raycast import RoomTensors, shade, texture

MESH_STEP = 0.1
"""Largest cell of a planar face's grid (metres)."""
ROUND_SEGMENTS = 96
"""Facets around a cylinder or a sphere (a sphere has half as many rings)."""


@dataclass
class RoomMesh:
    """Triangle mesh of a room: one row per vertex / triangle."""

    vertices: np.ndarray  # [V, 3] float32 world coordinates (metres)
    normals: np.ndarray  # [V, 3] float32 unit normals of the solid at the vertex (visible side)
    colors: np.ndarray  # [V, 3] uint8 RGB
    faces: np.ndarray  # [F, 3] int32 vertex indices
    prim: np.ndarray  # [V] int64 primitive id (numbering of `raycast`)
    cls: np.ndarray  # [V] int64 class id
    inst: np.ndarray  # [V] int64 instance id


@dataclass
class _Part:
    """One primitive's surface: positions [n, 3], normals [n, 3], texture uv [n, 2] (metres,
    the ray caster's parametrisation) and triangles [m, 3] (local indices)."""

    xyz: np.ndarray
    normal: np.ndarray
    uv: np.ndarray
    tri: np.ndarray


@functools.cache
def _grid(nu: int, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """An (nu + 1) x (nv + 1) vertex grid over the unit square, stored row-major in v: the (s, t)
    coordinates [n, 2] and triangles [2 nu nv, 3]; cell (i, j) gives (i, j), (i+1, j), (i+1, j+1)
    and (i, j), (i+1, j+1), (i, j+1), which wind counter-clockwise around +s x +t."""
    t, s = np.meshgrid(np.linspace(0, 1, nv + 1), np.linspace(0, 1, nu + 1), indexing="ij")
    st = np.stack([s.reshape(-1), t.reshape(-1)], 1)
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    a = (j * (nu + 1) + i).reshape(-1)
    b, c, d = a + 1, a + nu + 2, a + nu + 1
    tri = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.int64)
    st.flags.writeable = tri.flags.writeable = False  # shared by every caller
    return st, tri


def _rect(origin, eu, ev) -> tuple[np.ndarray, np.ndarray]:
    """Grid over the rectangle origin + [0, 1] eu + [0, 1] ev, cells at most `MESH_STEP` wide:
    points [n, 3] and triangles winding counter-clockwise around eu x ev."""
    nu = max(1, math.ceil(math.hypot(*eu) / MESH_STEP))
    nv = max(1, math.ceil(math.hypot(*ev) / MESH_STEP))
    st, tri = _grid(nu, nv)
    return np.asarray(origin) + st @ np.stack([eu, ev]), tri


def _shell_parts(size: np.ndarray) -> list[_Part]:
    """Faces x-, x+, y-, y+, floor, ceiling of [-W/2, W/2] x [-D/2, D/2] x [0, H], seen from
    inside; walls are textured by (along-wall coordinate, z), floor and ceiling by (x, y)."""
    w, d, h = size[0] / 2, size[1] / 2, size[2]
    ex, ey, ez = np.array([2 * w, 0, 0]), np.array([0, 2 * d, 0]), np.array([0, 0, h])
    faces = [  # (origin, eu, ev, inward normal, uv axes)
        ((-w, -d, 0), ey, ez, (1, 0, 0), (1, 2)),
        ((w, d, 0), -ey, ez, (-1, 0, 0), (1, 2)),
        ((w, -d, 0), -ex, ez, (0, 1, 0), (0, 2)),
        ((-w, d, 0), ex, ez, (0, -1, 0), (0, 2)),
        ((-w, -d, 0), ex, ey, (0, 0, 1), (0, 1)),
        ((-w, d, h), ex, -ey, (0, 0, -1), (0, 1)),
    ]
    parts = []
    for origin, eu, ev, n, axes in faces:
        xyz, tri = _rect(origin, eu, ev)
        normal = np.broadcast_to(np.asarray(n, float), xyz.shape)
        parts.append(_Part(xyz, normal, xyz[:, list(axes)], tri))
    return parts


def _box_part(centre, half, yaw: float) -> _Part:
    """The 6 faces of a box rotated by `yaw` about z, outward; face uv as in the ray caster:
    (q_y, q_z) on x faces, (q_x, q_z) on y faces, (q_x, q_y) on z faces, q = local + half."""
    half = np.asarray(half, float)
    xyzs, normals, uvs, tris, n = [], [], [], [], 0
    for axis in range(3):
        u_ax, v_ax = [a for a in range(3) if a != axis]
        for sign in (-1.0, 1.0):
            eu, ev = np.zeros(3), np.zeros(3)
            eu[u_ax], ev[v_ax] = 2 * half[u_ax], 2 * half[v_ax]
            origin = -half.copy()
            origin[axis] = sign * half[axis]
            nl = np.zeros(3)
            nl[axis] = sign
            if (sign < 0) != (axis == 1):  # eu x ev is +x, -y, +z: flip it to point outwards
                origin, eu = origin + eu, -eu
            lp, tri = _rect(origin, eu, ev)
            q = lp + half
            xyzs.append(lp)
            normals.append(np.broadcast_to(nl, lp.shape))
            uvs.append(q[:, [1 if axis == 0 else 0, 1 if axis == 2 else 2]])
            tris.append(tri + n)
            n += len(lp)
    c, s = math.cos(yaw), math.sin(yaw)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    lp, nl = np.concatenate(xyzs), np.concatenate(normals)
    return _Part(lp @ R.T + np.asarray(centre), nl @ R.T, np.concatenate(uvs), np.concatenate(tris))


def _cylinder_part(xy, r: float, z0: float, z1: float) -> _Part:
    """Side (`ROUND_SEGMENTS` facets, rows at most `MESH_STEP` high, uv = (angle r, z)) and two
    capping fans (uv = world xy); the side's seam repeats its first column."""
    k = ROUND_SEGMENTS
    rows = max(1, math.ceil((z1 - z0) / MESH_STEP))
    ang = np.linspace(-math.pi, math.pi, k + 1)  # seam at -pi / pi, like atan2
    z, a = np.meshgrid(np.linspace(z0, z1, rows + 1), ang, indexing="ij")
    a, z = a.reshape(-1), z.reshape(-1)
    ring = np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], 1)
    side = _Part(
        np.concatenate([xy + r * ring[:, :2], z[:, None]], 1),
        ring,
        np.stack([a * r, z], 1),
        _grid(k, rows)[1],
    )
    parts = [side]
    for zc, up in ((z0, -1.0), (z1, 1.0)):
        ring = np.stack([np.cos(ang[:-1]), np.sin(ang[:-1])], 1)
        pts = np.concatenate([[np.asarray(xy, float)], xy + r * ring])  # centre, then the rim
        xyz = np.concatenate([pts, np.full((k + 1, 1), zc)], 1)
        i = np.arange(k)
        tri = np.stack([np.zeros(k, np.int64), 1 + i, 1 + (i + 1) % k], 1)
        if up < 0:  # counter-clockwise seen from below
            tri = tri[:, [0, 2, 1]]
        normal = np.broadcast_to(np.array([0.0, 0.0, up]), xyz.shape)
        parts.append(_Part(xyz, normal, pts.copy(), tri))
    return _merge(parts)


def _sphere_part(centre, r: float) -> _Part:
    """Latitude-longitude grid (`ROUND_SEGMENTS` around, half as many rings) closed by a fan
    around each pole; uv as in the ray caster: (azimuth, elevation) times r."""
    k, rings = ROUND_SEGMENTS, ROUND_SEGMENTS // 2
    el, az = np.meshgrid(
        np.linspace(-math.pi / 2, math.pi / 2, rings + 1)[1:-1],
        np.linspace(-math.pi, math.pi, k + 1),
        indexing="ij",
    )
    el = np.concatenate([[-math.pi / 2], el.reshape(-1), [math.pi / 2]])  # south pole first
    az = np.concatenate([[0.0], az.reshape(-1), [0.0]])
    n = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    i = np.arange(k)
    top = 1 + (rings - 2) * (k + 1)  # first vertex of the last ring
    tri = np.concatenate(
        [
            np.stack([np.zeros(k, np.int64), 2 + i, 1 + i], 1),  # south fan
            _grid(k, rings - 2)[1] + 1,
            np.stack([top + i, top + 1 + i, np.full(k, len(n) - 1)], 1),  # north fan
        ]
    )
    return _Part(np.asarray(centre) + r * n, n, np.stack([az, el], 1) * r, tri)


def _merge(parts: list[_Part]) -> _Part:
    offsets = np.cumsum([0] + [len(p.xyz) for p in parts[:-1]])
    return _Part(
        np.concatenate([p.xyz for p in parts]),
        np.concatenate([p.normal for p in parts]),
        np.concatenate([p.uv for p in parts]),
        np.concatenate([p.tri + o for p, o in zip(parts, offsets, strict=True)]),
    )


def room_mesh(room: Room, T: RoomTensors | None = None) -> RoomMesh:
    """Tessellate `room` (primitive ids as in `raycast`) and colour its vertices."""
    T = RoomTensors(room) if T is None else T
    parts = _shell_parts(room.size)
    parts += [_box_part(c, h, yaw) for c, h, yaw, *_ in room.boxes]
    parts += [_cylinder_part(xy, r, z0, z1) for xy, r, z0, z1, *_ in room.cyls]
    parts += [_sphere_part(c, r) for c, r, *_ in room.spheres]
    prim = np.concatenate([np.full(len(p.xyz), i, np.int64) for i, p in enumerate(parts)])
    m = _merge(parts)
    colors = _vertex_colors(T, m, torch.from_numpy(prim))
    return RoomMesh(
        vertices=m.xyz.astype(np.float32),
        normals=m.normal.astype(np.float32),
        colors=colors,
        faces=m.tri.astype(np.int32),
        prim=prim,
        cls=T.cls[prim].numpy(),
        inst=T.inst[prim].numpy(),
    )


def _vertex_colors(T: RoomTensors, m: _Part, prim: torch.Tensor) -> np.ndarray:
    """Shaded colour [V, 3] uint8 of every vertex (rounded like the JPEG images' pixels)."""
    S = 256  # shadow rays run in groups of S vertices, sorted into 25 cm cells to keep them compact
    cell = np.floor(m.xyz / 0.25).astype(np.int64)
    order = torch.from_numpy(np.lexsort(cell.T[::-1]))
    pad = -len(order) % S
    idx = torch.cat([order, order[-1:].expand(pad)])
    x = torch.from_numpy(m.xyz).float()[idx]
    normal = torch.from_numpy(m.normal).float()[idx]
    albedo = texture(T, T.mat[prim[idx]], torch.from_numpy(m.uv).float()[idx])
    rgb = torch.empty(len(order), 3)
    rgb[order] = shade(T, x, normal, albedo, S)[: len(order)]
    return (rgb.numpy() * 255 + 0.5).astype(np.uint8)
