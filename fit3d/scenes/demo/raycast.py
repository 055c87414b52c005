"""Vectorised ray casting of a demo room (torch, CPU, no mesh): colour, depth, normals, labels.

Rays: origins o [R, 3], unnormalised directions d [R, 3] scaled so that d_cam.z = 1, so the hit
parameter t is the depth along the optical axis. Primitive ids: 0..5 the shell faces (order of
`layout.SHELL_FACES`), then boxes, cylinders, spheres in the order of the room's lists; ties go
to the lowest id. Shading is diffuse, one point light with hard shadows, view-independent (a
radiance field can fit it exactly). Depth, normals, class and instance ids come from the same
rays as the colours, so they are exact up to file quantisation.

Speed: rays run in 16x16-pixel groups of 4 runs of 64, each run tested only against the solids
it may hit (`_cull`: the cone around the group against bounding spheres, then the run's range of
directions against bounding boxes; the shadow rays from the light likewise), and the nearest hit
per ray is one min-scatter of (t, id) keys. Culling only skips misses, so the hits, and every
output bit, do not depend on it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fit3d.scenes.demo.layout import CLASS_ID, SHELL_FACES, Room
from fit3d.scenes.demo.materials import TEX

assert TEX & (TEX - 1) == 0, "texture lookups wrap with & (TEX - 1)"

_EPS = 1e-4
_CHUNK = 1 << 15
"""Rays shaded at once. Part of the output: torch's vectorised exp / atan2 / asin may differ
in the last bit from the scalar code it runs on an array's last few elements, so chunking (and
the shapes given to those functions) must stay as they are for byte-identical sets."""
_TILE = 16
_SUB = 64
"""Rays per culling run (a quarter of a tile's group)."""
_CORNERS = torch.tensor([[(k >> a) & 1 for a in range(3)] for k in range(8)], dtype=torch.bool)
"""[8, 3]: which corners of a box take the upper bound on each axis."""


class RoomTensors:
    """A room's primitives as float32 tensors, one row per primitive."""

    def __init__(self, room: Room):
        f = torch.float32

        def cols(items, idx, dtype=f):
            return torch.tensor(np.array([it[idx] for it in items]), dtype=dtype)

        self.size = torch.tensor(room.size, dtype=f)
        self.nb, self.nc, self.ns = len(room.boxes), len(room.cyls), len(room.spheres)
        b, cy, sp = room.boxes, room.cyls, room.spheres
        self.b_c, self.b_h = cols(b, 0).reshape(-1, 3), cols(b, 1).reshape(-1, 3)  # [Mb, 3]
        yaw = cols(b, 2)
        self.b_cos, self.b_sin = torch.cos(yaw), torch.sin(yaw)  # [Mb]
        self.c_xy, self.c_r, self.c_z0, self.c_z1 = (
            cols(cy, 0),
            cols(cy, 1),
            cols(cy, 2),
            cols(cy, 3),
        )
        self.s_c, self.s_r = cols(sp, 0).reshape(-1, 3), cols(sp, 1)
        if self.nc:  # bounding spheres of the cylinders
            self.c_mid = torch.cat([self.c_xy, ((self.c_z0 + self.c_z1) / 2)[:, None]], 1)
            self.c_rad = torch.sqrt(self.c_r**2 + ((self.c_z1 - self.c_z0) / 2) ** 2)
        else:
            self.c_mid, self.c_rad = torch.zeros(0, 3), torch.zeros(0)
        # attributes for all ids: 0..5 shell faces, then boxes, cylinders, spheres
        shell = [(room.shell_mat[i], CLASS_ID[SHELL_FACES[i]], i + 1) for i in range(6)]
        attrs = shell + [it[3:6] for it in b] + [it[4:7] for it in cy] + [it[2:5] for it in sp]
        a = torch.tensor(attrs, dtype=torch.int64)  # [6 + M, 3]
        self.mat, self.cls, self.inst = a[:, 0], a[:, 1], a[:, 2]
        tex = torch.from_numpy(np.stack(room.textures)).reshape(-1, 3)  # [NM*TEX*TEX, 3]
        self.tex_planes = tex.T.contiguous()  # [3, NM*TEX*TEX] one plane per channel
        self.tex_scale = torch.tensor(room.tex_scale, dtype=f)  # [NM, 2]
        self.light = torch.tensor(room.light, dtype=f)
        # culling bounds of the furniture in id order (boxes, cylinders, spheres), float64:
        # bounding spheres and yawed bounding boxes (cylinders and spheres: axis-aligned)
        zero, one = torch.zeros(self.nc + self.ns), torch.ones(self.nc + self.ns)
        c_half = torch.stack([self.c_r, self.c_r, (self.c_z1 - self.c_z0) / 2], 1)
        self.cull_c = torch.cat([self.b_c, self.c_mid, self.s_c]).double()  # [M, 3]
        self.cull_h = torch.cat([self.b_h, c_half, self.s_r[:, None].expand(-1, 3)]).double()
        self.cull_r = torch.cat([self.b_h.norm(dim=-1), self.c_rad, self.s_r]).double()  # [M]
        self.cull_cos = torch.cat([self.b_cos, one]).double()  # [M]
        self.cull_sin = torch.cat([self.b_sin, zero]).double()


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1e-9, 1e-9, d)


def _box_local(o, d, c, h, cos, sin):
    """Ray origin/direction in box frames: o, d [R, 1, 3]; box params [.., M, ...]."""
    p = o - c
    lo = torch.stack(
        [cos * p[..., 0] + sin * p[..., 1], -sin * p[..., 0] + cos * p[..., 1], p[..., 2]], -1
    )
    ld = torch.stack(
        [
            cos * d[..., 0] + sin * d[..., 1],
            -sin * d[..., 0] + cos * d[..., 1],
            d[..., 2] + 0.0 * cos,
        ],
        -1,
    )
    return lo, ld


def _hit_boxes(p, dx, dy, inv_z, h, cos, sin) -> torch.Tensor:
    """Entry t of rays into oriented boxes [P, S] (inf = miss or ray starts inside).

    Per (group, box) pair: ray origin minus box centre p [P, 3], half sizes h [P, 3], yaw
    cos, sin [P]; per ray: direction components dx, dy [P, S] and 1 / dz inv_z [P, S]. Slabs
    are computed one axis at a time so that only the direction terms are full-size (this is the
    generator's hot loop). A direction component of exactly 0 can give NaN (0 * inf), which
    counts as a miss."""
    cos, sin = cos[:, None], sin[:, None]  # [P, 1]
    p0, p1, p2 = p[:, 0:1], p[:, 1:2], p[:, 2:3]  # [P, 1]
    lo = (cos * p0 + sin * p1, -sin * p0 + cos * p1, p2)  # box-frame origin, each [P, 1]
    ld = (cos * dx + sin * dy, cos * dy - sin * dx)  # box-frame direction x, y [P, S]
    tnear = tfar = None
    for a in range(3):
        inv = 1.0 / ld[a] if a < 2 else inv_z
        ha = h[:, a : a + 1]
        t1, t2 = (-ha - lo[a]) * inv, (ha - lo[a]) * inv
        tn, tf = torch.minimum(t1, t2), torch.maximum(t1, t2)
        tnear = tn if tnear is None else torch.maximum(tnear, tn)
        tfar = tf if tfar is None else torch.minimum(tfar, tf)
    ok = (tfar >= tnear) & (tnear > _EPS)
    return torch.where(ok, tnear, torch.full_like(tnear, math.inf))


def _hit_cyls(o, d, xy, r, z0, z1) -> tuple[torch.Tensor, torch.Tensor]:
    """(side t, cap t) of rays against vertical capped cylinders, each [R, M] (inf = miss)."""
    px, py = o[..., 0] - xy[..., 0], o[..., 1] - xy[..., 1]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    return _hit_cyls_xyz(px, py, o[..., 2], dx, dy, dz, r, z0, z1)


def _hit_cyls_xyz(px, py, oz, dx, dy, dz, r, z0, z1) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hit_cyls` on components: origin minus axis px, py and origin height oz, directions dx,
    dy, dz, radii r, cap heights z0, z1 (broadcasting to the result's shape)."""
    a = (dx * dx + dy * dy).clamp_min(1e-12)
    b = px * dx + py * dy
    cc = px * px + py * py - r * r
    disc = b * b - a * cc
    ts = (-b - disc.clamp_min(0).sqrt()) / a
    zs = oz + ts * dz
    inf = torch.full_like(ts, math.inf)
    ts = torch.where((disc > 0) & (ts > _EPS) & (zs >= z0) & (zs <= z1), ts, inf)
    tc = inf
    sdz = _safe(dz)
    for zc in (z0, z1):
        t = (zc - oz) / sdz
        qx, qy = px + t * dx, py + t * dy
        tc = torch.where((t > _EPS) & (qx * qx + qy * qy <= r * r), torch.minimum(tc, t), tc)
    return ts, tc


def _hit_spheres(o, d, c, r) -> torch.Tensor:
    """Entry t of rays into spheres [R, M] (inf = miss)."""
    p = o - c
    a = (d * d).sum(-1)
    b = (p * d).sum(-1)
    cc = (p * p).sum(-1) - r * r
    disc = b * b - a * cc
    t = (-b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc > 0) & (t > _EPS), t, torch.full_like(t, math.inf))


def _cull(
    T: RoomTensors, apex: torch.Tensor, dmin: torch.Tensor, dmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(run, furniture index) pairs [P] that rays from apex [3] may hit, for runs of rays with
    directions in the boxes dmin..dmax [G, n, 3] (per-axis ranges; G groups of n runs).

    Conservative, in float64: a pair is dropped only if the cone around the direction box of
    the run's group misses the primitive's bounding sphere by over 1e-3 rad, or if the run's
    direction box cannot reach its bounding box inflated by 0.1 mm + 1e-4 (interval arithmetic
    on the slabs). The margins are far above float32 rounding, so a pair that would report a
    hit is never dropped. Runs are numbered g * n + i; pairs come sorted by furniture index."""
    n = dmin.shape[1]
    run_min, run_max = dmin.double().reshape(-1, 3), dmax.double().reshape(-1, 3)  # [G * n, 3]
    dmin, dmax = run_min.reshape(-1, n, 3).amin(1), run_max.reshape(-1, n, 3).amax(1)  # [G, 3]
    # the cone around a direction box: its corners' directions bound it (a cone of half-angle
    # below pi/2 is convex); wider ones are taken as everything
    corners = torch.where(_CORNERS, dmax[:, None], dmin[:, None])  # [G, 8, 3]
    corners = torch.nn.functional.normalize(corners, dim=-1)
    axis = torch.nn.functional.normalize(corners.mean(1), dim=-1)  # [G, 3]
    cos_half = (corners * axis[:, None]).sum(-1).amin(1)  # [G]
    half = torch.where(cos_half > 0.01, torch.acos(cos_half.clamp(max=1.0)), math.pi)
    # cones against bounding spheres: the angle from the axis to a centre is at most half +
    # asin(radius / distance), compared as cosines (both angles lie in [0, pi])
    v = T.cull_c - apex.double()  # [M, 3]
    dist = v.norm(dim=-1).clamp_min(1e-9)  # [M]
    sin_r = (T.cull_r / dist).clamp(max=1.0)  # [M] sine of the sphere's angular radius
    cos_r = (1 - sin_r * sin_r).sqrt()
    lim = half + 1e-3  # [G]
    cos_ang = axis @ (v / dist[:, None]).T  # [G, M]
    cos_lim = torch.cos(lim)[:, None] * cos_r - torch.sin(lim)[:, None] * sin_r  # [G, M]
    wide = lim[:, None] + torch.asin(sin_r) >= math.pi
    ok = (dist <= T.cull_r) | (cos_ang >= cos_lim) | wide
    m, g = ok.T.nonzero(as_tuple=True)  # by furniture index
    g, m = (g[:, None] * n + torch.arange(n)).reshape(-1), m.repeat_interleave(n)  # [P] runs
    # direction boxes of the runs against bounding boxes, in each box's frame
    dmin, dmax = run_min[g], run_max[g]  # [P, 3]
    cos, sin = T.cull_cos[m], T.cull_sin[m]  # [P]
    p = apex.double() - T.cull_c[m]  # [P, 3]
    lo = torch.stack([cos * p[:, 0] + sin * p[:, 1], cos * p[:, 1] - sin * p[:, 0], p[:, 2]], 1)

    def scaled(s: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor]:  # s [P] * range
        x, y = s * dmin[:, a], s * dmax[:, a]
        return torch.minimum(x, y), torch.maximum(x, y)

    (xx0, xx1), (xy0, xy1) = scaled(cos, 0), scaled(sin, 1)
    (yx0, yx1), (yy0, yy1) = scaled(-sin, 0), scaled(cos, 1)
    m0 = torch.stack([xx0 + xy0, yx0 + yy0, dmin[:, 2]], 1)  # [P, 3] local direction ranges
    m1 = torch.stack([xx1 + xy1, yx1 + yy1, dmax[:, 2]], 1)
    h = T.cull_h[m] * (1 + 1e-4) + 1e-4
    up, down = h - lo, -h - lo  # a ray is inside slab a while down <= t * ld <= up
    inf = torch.full_like(up, math.inf)
    t_hi = torch.minimum(torch.where(m0 > 0, up / m0, inf), torch.where(m1 < 0, down / m1, inf))
    t_lo = torch.maximum(torch.where(m0 < 0, up / m0, -inf), torch.where(m1 > 0, down / m1, -inf))
    reach = ((m0 != 0) | (up >= 0)) & ((m1 != 0) | (down <= 0))  # [P, 3]
    keep = reach.all(1) & (t_lo.amax(1).clamp_min(0) <= t_hi.amin(1))
    return g[keep], m[keep]


_ID_BITS = 16
"""`_cast_objects` orders hits by one key: the bits of t (>= 0, so they sort like t) above
`_ID_BITS` bits of primitive id, so the least key is the nearest hit, ties to the lowest id.
Keys are integers below 2 ** 47, held exactly in float64 (whose min-scatter is fast)."""
_NO_HIT = float(0x7F800000 << _ID_BITS)
"""The key of t = inf (float32 bits 0x7F800000), id 0: no hit."""


def _hit_keys(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Keys [P, S] (float64) of hits t [P, S] (positive or inf) of primitives ids [P]."""
    return t.view(torch.int32).double().mul_(1 << _ID_BITS).add_(ids[:, None])


def _cast_objects(
    T: RoomTensors, apex: torch.Tensor, d: torch.Tensor, ids: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest furniture hit of ray groups from one point (apex [3], d [G, S, 3]): t [G, S]
    (inf = none) and primitive id [G, S] (6 + index; ties -> lowest id; None unless `ids`).

    Primitives are culled (`_cull`) per run of `_SUB` rays; hits are computed per (run,
    primitive) pair and the nearest kept per ray."""
    G, S = d.shape[:2]
    assert 6 + T.nb + T.nc + T.ns < 1 << _ID_BITS
    sub = _SUB if S % _SUB == 0 else S
    ds = d.reshape(-1, sub, 3)  # [Gs, sub, 3] runs of rays
    if ids:
        key = torch.full((len(ds), sub), _NO_HIT, dtype=torch.float64)  # [Gs, sub]
    else:
        near = torch.full((len(ds), sub), math.inf)  # [Gs, sub]
    dx, dy, dz = ds.permute(2, 0, 1).contiguous()  # each [Gs, sub]
    planes = (dx, dy, dz)
    lo = torch.stack([c.amin(1) for c in planes], 1).reshape(G, -1, 3)  # [G, S // sub, 3]
    hi = torch.stack([c.amax(1) for c in planes], 1).reshape(G, -1, 3)
    g_all, m_all = _cull(T, apex, lo, hi)  # sorted by furniture index
    nb, nc = T.nb, T.nc
    b_end, c_end = torch.searchsorted(m_all, torch.tensor([nb, nb + nc])).tolist()
    g_b, m_b = g_all[:b_end], m_all[:b_end]  # boxes
    g_c, m_c = g_all[b_end:c_end], m_all[b_end:c_end] - nb  # cylinders
    g_s, m_s = g_all[c_end:], m_all[c_end:] - nb - nc  # spheres

    def rows(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, g)

    def merge(g: torch.Tensor, t: torch.Tensor, pid: torch.Tensor) -> None:  # nearest per ray
        if ids:
            key.scatter_reduce_(0, g[:, None].expand(-1, sub), _hit_keys(t, pid), "amin")
        else:
            near.scatter_reduce_(0, g[:, None].expand(-1, sub), t, "amin")

    if len(g_b):
        g, m = g_b, m_b
        p = apex - T.b_c[m]
        h, cos, sin = T.b_h[m], T.b_cos[m], T.b_sin[m]
        t = _hit_boxes(p, rows(dx, g), rows(dy, g), rows(1.0 / dz, g), h, cos, sin)
        merge(g, t, m + 6)
    if len(g_c):
        g, m = g_c, m_c
        ts, tc = _hit_cyls_xyz(
            (apex[0] - T.c_xy[m, 0])[:, None],
            (apex[1] - T.c_xy[m, 1])[:, None],
            apex[2],
            rows(dx, g),
            rows(dy, g),
            rows(dz, g),
            T.c_r[m, None],
            T.c_z0[m, None],
            T.c_z1[m, None],
        )
        merge(g, torch.minimum(ts, tc), m + 6 + nb)
    if len(g_s):
        g, m = g_s, m_s
        t = _hit_spheres(apex, rows(ds, g), T.s_c[m, None], T.s_r[m, None])
        merge(g, t, m + 6 + nb + nc)
    if not ids:
        return near.reshape(G, S), None
    key = key.reshape(G, S).long()
    return (key >> _ID_BITS).int().view(torch.float32), key & ((1 << _ID_BITS) - 1)


def _surface(T: RoomTensors, origin: torch.Tensor, d_groups: torch.Tensor):
    """Cast camera rays (origin [3], directions d_groups [G, S, 3], compact pixel groups):
    flat depth t [R], world normal [R, 3] facing the ray, texture uv (metres) [R, 2], id [R]."""
    G, S = d_groups.shape[:2]
    t_obj, pid = _cast_objects(T, origin, d_groups)
    t_obj, pid = t_obj.reshape(-1), pid.reshape(-1)
    d = d_groups.reshape(-1, 3)
    half = T.size / 2
    lo = torch.stack([-half[0], -half[1], torch.zeros(())])
    hi = torch.stack([half[0], half[1], T.size[2]])
    inv = 1.0 / _safe(d)
    tmax = torch.maximum((lo - origin) * inv, (hi - origin) * inv)  # [R, 3]
    t_shell, axis = tmax.min(1)
    obj = t_obj < t_shell
    t = torch.where(obj, t_obj, t_shell)
    face = axis * 2 + (d.gather(1, axis[:, None])[:, 0] > 0).long()  # x-, x+, y-, y+, z-, z+
    pid = torch.where(obj, pid, face)
    x = origin + t[:, None] * d
    # shell, on every ray (furniture rows are overwritten below): walls use (along-wall, z),
    # floor/ceiling use (x, y)
    u = torch.where(axis == 0, x[:, 1], x[:, 0])
    v = torch.where(axis == 2, x[:, 1], x[:, 2])
    uv = torch.stack([u, v], 1)  # [R, 2]
    normal = torch.zeros(len(d), 3).scatter_(1, axis[:, None], 1.0)  # [R, 3] one-hot
    # boxes
    ib = (obj & (pid < 6 + T.nb)).nonzero()[:, 0]  # [n] their rays
    if len(ib):
        k = pid.index_select(0, ib) - 6
        c, h, cs, sn = T.b_c[k], T.b_h[k], T.b_cos[k], T.b_sin[k]
        lo_, ld_ = _box_local(origin, d.index_select(0, ib), c, h, cs, sn)
        lp = lo_ + t.index_select(0, ib)[:, None] * ld_
        fa = (lp.abs() / h).argmax(1)
        nl = torch.nn.functional.one_hot(fa, 3).float() * lp.sign()
        n_box = torch.stack(
            [cs * nl[:, 0] - sn * nl[:, 1], sn * nl[:, 0] + cs * nl[:, 1], nl[:, 2]], 1
        )
        normal.index_copy_(0, ib, n_box)
        q = lp + h
        uv_box = torch.stack(
            [torch.where(fa == 0, q[:, 1], q[:, 0]), torch.where(fa == 2, q[:, 1], q[:, 2])], 1
        )
        uv.index_copy_(0, ib, uv_box)
    # cylinders
    mc = obj & (pid >= 6 + T.nb) & (pid < 6 + T.nb + T.nc)
    if mc.any():
        k = pid[mc] - 6 - T.nb
        xy, r, z0, z1 = T.c_xy[k], T.c_r[k], T.c_z0[k], T.c_z1[k]
        ts, tc = _hit_cyls(origin, d[mc], xy, r, z0, z1)
        side = ts <= tc
        xc = x[mc]
        rel = xc[:, :2] - xy
        n_side = torch.cat([rel / r[:, None], torch.zeros(len(k), 1)], 1)
        n_cap = torch.zeros(len(k), 3)
        n_cap[:, 2] = 1.0
        normal[mc] = torch.where(side[:, None], n_side, n_cap)
        ang = torch.atan2(rel[:, 1], rel[:, 0]) * r
        uv[mc] = torch.where(side[:, None], torch.stack([ang, xc[:, 2]], 1), xc[:, :2])
    # spheres
    ms = obj & (pid >= 6 + T.nb + T.nc)
    if ms.any():
        k = pid[ms] - 6 - T.nb - T.nc
        n = (x[ms] - T.s_c[k]) / T.s_r[k, None]
        normal[ms] = n
        uv[ms] = (
            torch.stack([torch.atan2(n[:, 1], n[:, 0]), torch.asin(n[:, 2].clamp(-1, 1))], 1)
            * T.s_r[k, None]
        )
    flip = (normal * d).sum(1) > 0
    normal = torch.where(flip[:, None], -normal, normal)
    return t, normal, uv, pid


def texture(T: RoomTensors, mat: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear, wrapping texture lookup: albedo [R, 3] (computed per channel, [3, R])."""
    st = uv / T.tex_scale.index_select(0, mat) * TEX - 0.5  # texel coordinates [R, 2]
    f = st.floor()
    w = (st - f).T.contiguous()  # [2, R]
    i0 = f.long() & (TEX - 1)  # TEX is a power of two: & wraps like %
    i1 = (i0 + 1) & (TEX - 1)
    base = mat * TEX * TEX
    row0, row1 = base + i0[:, 1] * TEX, base + i1[:, 1] * TEX
    idx = torch.stack([row0 + i0[:, 0], row0 + i1[:, 0], row1 + i0[:, 0], row1 + i1[:, 0]])
    t00, t10, t01, t11 = T.tex_planes.index_select(1, idx.reshape(-1)).reshape(3, 4, -1).unbind(1)
    wu, wv = w[0], w[1]  # [R]
    nu, nv = 1 - wu, 1 - wv
    return (t00 * nu * nv + t10 * wu * nv + t01 * nu * wv + t11 * wu * wv).T.contiguous()


def shade(T: RoomTensors, x: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor, S: int):
    """Diffuse shading by the point light with hard shadows and an ambient term: rgb [R, 3].
    Shadow rays run from the light to the points x [R, 3] (R = G * S compact groups)."""
    to_x = x - T.light  # [R, 3]
    dist = to_x.norm(dim=1, keepdim=True)
    lam = -(normal * to_x / dist).sum(1, keepdim=True).clamp_max(0)
    G = len(x) // S
    t_block, _ = _cast_objects(T, T.light, to_x.reshape(G, S, 3), ids=False)
    lit = (t_block.reshape(-1, 1) >= 0.999).float()  # the point itself is at t = 1
    direct = 2.2 * lam * lit / (1.0 + 0.25 * dist**2)
    return 1.0 - torch.exp(-1.5 * albedo * (0.4 + direct))  # soft tone curve, no clipping


def _trace(T: RoomTensors, origin: torch.Tensor, dirs: torch.Tensor) -> list[torch.Tensor]:
    """Shade rays from `origin` [3] along `dirs` [N, 3] (ordered so that runs of 256 rays are
    spatially compact): rgb [N, 3], depth [N], world normals [N, 3], primitive ids [N]."""
    S = _TILE * _TILE
    N = len(dirs)
    G = (N + S - 1) // S
    dirs = torch.cat([dirs, dirs[-1:].expand(G * S - N, 3)]).reshape(G, S, 3)  # whole groups
    outs = []
    step = max(1, _CHUNK // S)
    for g in range(0, G, step):
        dg = dirs[g : g + step]
        t, n, uv, pid = _surface(T, origin, dg)
        x = origin + t[:, None] * dg.reshape(-1, 3)
        outs.append((shade(T, x, n, texture(T, T.mat.index_select(0, pid), uv), S), t, n, pid))
    return [torch.cat(z)[:N] for z in zip(*outs, strict=True)]


@functools.lru_cache(maxsize=4)
def _pixels(width: int, height: int) -> tuple[torch.Tensor, ...]:
    """Pixel columns and rows u, v [H * W] (float, row-major), the order that groups pixels by
    `_TILE` x `_TILE` tile [H * W] and its inverse (the same for every view: read only)."""
    v, u = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    tile = (v // _TILE) * ((width + _TILE - 1) // _TILE) + u // _TILE
    order = torch.argsort(tile.reshape(-1), stable=True)  # pixels grouped by tile
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))
    return u.reshape(-1).float(), v.reshape(-1).float(), order, inv


def render_view(T: RoomTensors, viewmat: np.ndarray, K: np.ndarray, width: int, height: int):
    """Render one view of world-to-camera `viewmat` [4, 4] and intrinsics K [3, 3]: rgb
    [H, W, 3], depth [H, W], camera-frame normals [H, W, 3], class and instance ids [H, W].
    Ground truth comes from the rays through pixel centres; colour at object borders is the
    mean of 2x2 sub-pixel rays (antialiased, as a camera integrates)."""
    c2w = torch.from_numpy(np.linalg.inv(viewmat)).float()
    uf, vf, order, inv = _pixels(width, height)
    origin = c2w[:3, 3]

    def dirs(pu: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:  # pixel coords -> world dirs
        cam = torch.stack(
            [(pu - K[0, 2]) / K[0, 0], (pv - K[1, 2]) / K[1, 1], torch.ones_like(pu)], -1
        )
        return cam.reshape(-1, 3) @ c2w[:3, :3].T

    rgb, t, n, pid = _trace(T, origin, dirs(uf[order] + 0.5, vf[order] + 0.5))
    rgb, t, n, pid = (x.index_select(0, inv) for x in (rgb, t, n, pid))  # pixel order
    pim = pid.reshape(height, width)
    edge = torch.zeros(height, width, dtype=torch.bool)
    dv, du = pim[1:] != pim[:-1], pim[:, 1:] != pim[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= du
    edge[:, :-1] |= du
    idx = order[edge.reshape(-1)[order]]  # border pixels, in tile order
    if len(idx):
        off = torch.tensor([0.25, 0.75])
        su = (uf[idx, None, None] + off[None, None, :]).expand(-1, 2, 2)
        sv = (vf[idx, None, None] + off[None, :, None]).expand(-1, 2, 2)
        sub = _trace(T, origin, dirs(su.reshape(-1), sv.reshape(-1)))[0]
        rgb[idx] = sub.reshape(-1, 4, 3).mean(1)
    return (
        rgb.reshape(height, width, 3),
        t.reshape(height, width),
        (n @ c2w[:3, :3]).reshape(height, width, 3),  # world -> camera: R_c2w^T n
        T.cls.index_select(0, pid).reshape(height, width),
        T.inst.index_select(0, pid).reshape(height, width),
    )
