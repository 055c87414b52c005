"""Vectorised ray casting of a demo room (torch, CPU, no mesh): colour, depth, normals, labels.

Rays: origins o [R, 3], unnormalised directions d [R, 3] scaled so that d_cam.z = 1, so the hit
parameter t is the depth along the optical axis. Primitive ids: 0..5 the shell faces (order of
`layout.SHELL_FACES`), then boxes, cylinders, spheres in the order of the room's lists; ties go
to the lowest id. Shading is diffuse, one point light with hard shadows, view-independent (a
radiance field can fit it exactly). Depth, normals, class and instance ids come from the same
rays as the colours, so they are exact up to file quantisation.

Speed: rays run in 16x16-pixel groups, each tested only against the solids whose bounding
spheres meet the group's cone (the shadow rays from the light likewise).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fit3d.scenes.demo.layout import CLASS_ID, SHELL_FACES, Room
from fit3d.scenes.demo.materials import TEX

_EPS = 1e-4
_CHUNK = 1 << 15
_TILE = 16


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
        self.tex = torch.from_numpy(np.stack(room.textures)).reshape(-1, 3)  # [NM*TEX*TEX, 3]
        self.tex_scale = torch.tensor(room.tex_scale, dtype=f)  # [NM, 2]
        self.light = torch.tensor(room.light, dtype=f)


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)


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


def _hit_boxes(o, d, c, h, cos, sin) -> torch.Tensor:
    """Entry t of rays into oriented boxes [P, S] (inf = miss or ray starts inside).

    o [P, 1, 3] and box params [P, 1, ...] per group, d [P, S, 3]; slabs are computed one axis
    at a time so that only the direction terms are full-size (this is the generator's hot loop).
    A direction component of exactly 0 can give NaN (0 * inf), which counts as a miss."""
    p = o - c  # [P, 1, 3]
    lo = (cos * p[..., 0] + sin * p[..., 1], -sin * p[..., 0] + cos * p[..., 1], p[..., 2])
    dx, dy = d[..., 0], d[..., 1]
    ld = (cos * dx + sin * dy, cos * dy - sin * dx, d[..., 2])
    tnear = tfar = None
    for a in range(3):
        inv = 1.0 / ld[a]
        t1, t2 = (-h[..., a] - lo[a]) * inv, (h[..., a] - lo[a]) * inv
        tn, tf = torch.minimum(t1, t2), torch.maximum(t1, t2)
        tnear = tn if tnear is None else torch.maximum(tnear, tn)
        tfar = tf if tfar is None else torch.minimum(tfar, tf)
    ok = (tfar >= tnear) & (tnear > _EPS)
    return torch.where(ok, tnear, torch.full_like(tnear, math.inf))


def _hit_cyls(o, d, xy, r, z0, z1) -> tuple[torch.Tensor, torch.Tensor]:
    """(side t, cap t) of rays against vertical capped cylinders, each [R, M] (inf = miss)."""
    px, py = o[..., 0] - xy[..., 0], o[..., 1] - xy[..., 1]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = (dx * dx + dy * dy).clamp_min(1e-12)
    b = px * dx + py * dy
    cc = px * px + py * py - r * r
    disc = b * b - a * cc
    ts = (-b - disc.clamp_min(0).sqrt()) / a
    zs = o[..., 2] + ts * dz
    inf = torch.full_like(ts, math.inf)
    ts = torch.where((disc > 0) & (ts > _EPS) & (zs >= z0) & (zs <= z1), ts, inf)
    tc = inf
    for zc in (z0, z1):
        t = (zc - o[..., 2]) / _safe(dz)
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


def _cone_pairs(apex, d, centres, radii) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, primitive) index pairs whose bounding sphere (centres [M, 3], radii [M]) meets
    the cone around a group's rays (apex [G, 3], directions [G, S, 3]): conservative culling."""
    dn = torch.nn.functional.normalize(d, dim=-1)
    axis = torch.nn.functional.normalize(dn.mean(1), dim=-1)  # [G, 3]
    half = torch.acos((dn * axis[:, None]).sum(-1).amin(1).clamp(-1, 1))  # [G]
    v = centres[None] - apex[:, None]  # [G, M, 3]
    dist = v.norm(dim=-1).clamp_min(1e-9)
    ang = torch.acos(((v * axis[:, None]).sum(-1) / dist).clamp(-1, 1))
    reach = torch.asin((radii / dist).clamp(max=1.0))
    ok = (dist <= radii) | (ang <= half[:, None] + reach + 1e-3)
    return ok.nonzero(as_tuple=True)


def _cast_objects(T: RoomTensors, apex: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Nearest furniture hit of ray groups sharing an origin (apex [G, 3], d [G, S, 3]):
    t [G, S] (inf = none) and primitive id [G, S] (6 + index; ties -> lowest id)."""
    G, S = d.shape[:2]
    best = torch.full((G, S), math.inf)
    pid = torch.zeros((G, S), dtype=torch.int64)
    kinds = [
        (
            T.b_c,
            T.b_h.norm(dim=-1),
            6,
            lambda o, dd, m: _hit_boxes(
                o, dd, T.b_c[m, None], T.b_h[m, None], T.b_cos[m, None], T.b_sin[m, None]
            ),
        ),
        (
            T.c_mid,
            T.c_rad,
            6 + T.nb,
            lambda o, dd, m: torch.minimum(
                *_hit_cyls(o, dd, T.c_xy[m, None], T.c_r[m, None], T.c_z0[m, None], T.c_z1[m, None])
            ),
        ),
        (
            T.s_c,
            T.s_r,
            6 + T.nb + T.nc,
            lambda o, dd, m: _hit_spheres(o, dd, T.s_c[m, None], T.s_r[m, None]),
        ),
    ]
    for centres, radii, offset, hit in kinds:
        if len(centres) == 0:
            continue
        g, m = _cone_pairs(apex, d, centres, radii)
        if len(g) == 0:
            continue
        t = hit(apex[g][:, None, :], d[g], m)  # [P, S]
        flat = (g[:, None] * S + torch.arange(S)).reshape(-1)
        tmin = torch.full((G * S,), math.inf).scatter_reduce_(0, flat, t.reshape(-1), "amin")
        tmin = tmin.reshape(G, S)
        big = torch.iinfo(torch.int64).max
        cand = torch.where(t == tmin[g], m[:, None] + offset, big).reshape(-1)
        first = torch.full((G * S,), big).scatter_reduce_(0, flat, cand, "amin").reshape(G, S)
        closer = tmin < best
        best = torch.where(closer, tmin, best)
        pid = torch.where(closer, first, pid)
    return best, pid


def _surface(T: RoomTensors, origin: torch.Tensor, d_groups: torch.Tensor):
    """Cast camera rays (origin [3], directions d_groups [G, S, 3], compact pixel groups):
    flat depth t [R], world normal [R, 3] facing the ray, texture uv (metres) [R, 2], id [R]."""
    G, S = d_groups.shape[:2]
    t_obj, pid = _cast_objects(T, origin.expand(G, 3), d_groups)
    t_obj, pid = t_obj.reshape(-1), pid.reshape(-1)
    d = d_groups.reshape(-1, 3)
    R = len(d)
    o = origin.expand(R, 3)
    half = T.size / 2
    lo = torch.stack([-half[0], -half[1], torch.zeros(())])
    hi = torch.stack([half[0], half[1], T.size[2]])
    inv = 1.0 / _safe(d)
    tmax = torch.maximum((lo - o) * inv, (hi - o) * inv)  # [R, 3]
    t_shell, axis = tmax.min(1)
    obj = t_obj < t_shell
    t = torch.where(obj, t_obj, t_shell)
    face = axis * 2 + (d.gather(1, axis[:, None])[:, 0] > 0).long()  # x-, x+, y-, y+, z-, z+
    pid = torch.where(obj, pid, face)
    x = o + t[:, None] * d
    normal = torch.zeros(R, 3)
    uv = torch.zeros(R, 2)
    # shell: walls use (along-wall, z), floor/ceiling use (x, y)
    sh = ~obj
    ax = axis[sh]
    xs = x[sh]
    u = torch.where(ax == 0, xs[:, 1], xs[:, 0])
    v = torch.where(ax == 2, xs[:, 1], xs[:, 2])
    uv[sh] = torch.stack([u, v], 1)
    normal[sh] = torch.nn.functional.one_hot(ax, 3).float()
    # boxes
    mb = obj & (pid < 6 + T.nb)
    if mb.any():
        k = pid[mb] - 6
        c, h, cs, sn = T.b_c[k], T.b_h[k], T.b_cos[k], T.b_sin[k]
        lo_, ld_ = _box_local(o[mb], d[mb], c, h, cs, sn)
        lp = lo_ + t[mb, None] * ld_
        fa = (lp.abs() / h).argmax(1)
        nl = torch.nn.functional.one_hot(fa, 3).float() * lp.sign()
        normal[mb] = torch.stack(
            [cs * nl[:, 0] - sn * nl[:, 1], sn * nl[:, 0] + cs * nl[:, 1], nl[:, 2]], 1
        )
        q = lp + h
        uv[mb] = torch.stack(
            [torch.where(fa == 0, q[:, 1], q[:, 0]), torch.where(fa == 2, q[:, 1], q[:, 2])], 1
        )
    # cylinders
    mc = obj & (pid >= 6 + T.nb) & (pid < 6 + T.nb + T.nc)
    if mc.any():
        k = pid[mc] - 6 - T.nb
        xy, r, z0, z1 = T.c_xy[k], T.c_r[k], T.c_z0[k], T.c_z1[k]
        ts, tc = _hit_cyls(o[mc], d[mc], xy, r, z0, z1)
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
    """Bilinear, wrapping texture lookup: albedo [R, 3]."""
    st = uv / T.tex_scale[mat] * TEX - 0.5  # texel coordinates
    f = st.floor()
    w = st - f
    i0 = f.long() % TEX
    i1 = (i0 + 1) % TEX
    base = mat * TEX * TEX

    def at(iu, iv):
        return T.tex[base + iv * TEX + iu]

    wu, wv = w[:, :1], w[:, 1:]
    return (
        at(i0[:, 0], i0[:, 1]) * (1 - wu) * (1 - wv)
        + at(i1[:, 0], i0[:, 1]) * wu * (1 - wv)
        + at(i0[:, 0], i1[:, 1]) * (1 - wu) * wv
        + at(i1[:, 0], i1[:, 1]) * wu * wv
    )


def shade(T: RoomTensors, x: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor, S: int):
    """Diffuse shading by the point light with hard shadows and an ambient term: rgb [R, 3].
    Shadow rays run from the light to the points x [R, 3] (R = G * S compact groups)."""
    to_x = x - T.light  # [R, 3]
    dist = to_x.norm(dim=1, keepdim=True)
    lam = -(normal * to_x / dist).sum(1, keepdim=True).clamp_max(0)
    G = len(x) // S
    t_block, _ = _cast_objects(T, T.light.expand(G, 3), to_x.reshape(G, S, 3))
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
        outs.append((shade(T, x, n, texture(T, T.mat[pid], uv), S), t, n, pid))
    return [torch.cat(z)[:N] for z in zip(*outs, strict=True)]


def render_view(T: RoomTensors, viewmat: np.ndarray, K: np.ndarray, width: int, height: int):
    """Render one view of world-to-camera `viewmat` [4, 4] and intrinsics K [3, 3]: rgb
    [H, W, 3], depth [H, W], camera-frame normals [H, W, 3], class and instance ids [H, W].
    Ground truth comes from the rays through pixel centres; colour at object borders is the
    mean of 2x2 sub-pixel rays (antialiased, as a camera integrates)."""
    c2w = torch.from_numpy(np.linalg.inv(viewmat)).float()
    v, u = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    tile = (v // _TILE) * ((width + _TILE - 1) // _TILE) + u // _TILE
    order = torch.argsort(tile.reshape(-1), stable=True)  # pixels grouped by tile
    origin = c2w[:3, 3]

    def dirs(pu: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:  # pixel coords -> world dirs
        cam = torch.stack(
            [(pu - K[0, 2]) / K[0, 0], (pv - K[1, 2]) / K[1, 1], torch.ones_like(pu)], -1
        )
        return cam.reshape(-1, 3) @ c2w[:3, :3].T

    uf, vf = u.reshape(-1).float(), v.reshape(-1).float()
    rgb, t, n, pid = _trace(T, origin, dirs(uf[order] + 0.5, vf[order] + 0.5))
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))
    rgb, t, n, pid = rgb[inv], t[inv], n[inv], pid[inv]
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
        T.cls[pim],
        T.inst[pim],
    )
