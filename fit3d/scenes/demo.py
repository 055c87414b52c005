"""Demo scenes: procedural furnished rooms with exact ground truth, in the ScanNet++ DSLR layout.

Each room is an axis-aligned shell (4 walls, floor, ceiling) furnished with analytic solids
(yaw-rotated boxes, vertical cylinders, spheres) grouped into object instances of 17 classes.
Surfaces carry textures cut from scikit-image's real photographs and texture images (random
source, crop, tint, contrast and scale per material, so no two rooms look alike) and are shaded
diffusely by one point light with hard shadows: view-independent colour, so a radiance field can
fit it exactly. A hand-held-like camera path loops around the room. Depth, normals, semantic and
instance ids come from the same vectorised ray casting (torch, no mesh, no GPU) that makes the
colours, so they are exact up to file quantisation.

Written per room under `<out>/data/<scene_id>/dslr/` exactly as the ScanNet++ toolkit lays it
out (see `fit3d.scenes.scannetpp`), plus `gt_*` folders and `<out>/classes.json`. The nerfstudio
json stores camera-to-world in OpenGL axes and ScanNet++'s permuted world frame, so the reader's
conversion applies unchanged. A marker `<out>/demo.json` holding the parameters is written last;
a second call with the same parameters does nothing.

Run: `python -m fit3d.scenes.demo [--preset demo] [scenes.demo_views=40 ...]`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from scipy.spatial.transform import Rotation

from fit3d.errors import UserError, cli_entry
from fit3d.io import write_json
from fit3d.scenes.scannetpp import (
    COLMAP_DIR,
    DEPTH_SCALE,
    GT_DIRS,
    IMAGE_DIR,
    MASK_DIR,
    NORMAL_SCALE,
    SPLIT_LISTS,
    TRANSFORMS,
    viewmat_to_nerfstudio,
)

CLASSES = [
    "wall",
    "floor",
    "ceiling",
    "door",
    "window",
    "table",
    "chair",
    "cabinet",
    "shelf",
    "bed",
    "sofa",
    "lamp",
    "box",
    "picture",
    "rug",
    "plant",
    "book",
]
"""Semantic class names; the id of a class is its index."""
GENERATOR_VERSION = 3
"""Bump when the generator's output changes, so cached sets are regenerated."""
TEX = 256
"""Texture tile size (texels)."""
_EPS = 1e-4
_CHUNK = 1 << 15
_TILE = 16

CLASS_ID = {name: i for i, name in enumerate(CLASSES)}


# --------------------------------------------------------------------------------------------
# Room description
# --------------------------------------------------------------------------------------------
@dataclass
class Room:
    """Analytic solids of one room; every primitive has a material, class and instance id."""

    size: np.ndarray  # [3] extent; the room spans [-W/2, W/2] x [-D/2, D/2] x [0, H]
    shell_mat: list[int]  # [6] materials of faces x-, x+, y-, y+, floor, ceiling
    light: np.ndarray  # [3] point light position
    textures: list[np.ndarray] = field(default_factory=list)  # each [TEX, TEX, 3] float32
    tex_scale: list[tuple[float, float]] = field(default_factory=list)  # metres per tile (u, v)
    boxes: list[tuple] = field(default_factory=list)  # (centre[3], half[3], yaw, mat, cls, inst)
    cyls: list[tuple] = field(default_factory=list)  # (centre xy[2], r, z0, z1, mat, cls, inst)
    spheres: list[tuple] = field(default_factory=list)  # (centre[3], r, mat, cls, inst)
    n_inst: int = 7  # instance ids 1..6 are the shell faces


@functools.cache
def _sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-image's bundled images: (grey textures, colour photos), float32 in [0, 1]."""
    grey = [
        skimage.data.brick(),
        skimage.data.grass(),
        skimage.data.gravel(),
        skimage.data.moon(),
        skimage.data.camera(),
        skimage.data.coins(),
        skimage.data.page(),
        skimage.data.text(),
        skimage.data.clock(),
        skimage.data.cell(),
    ]
    colour = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.hubble_deep_field(),
        skimage.data.immunohistochemistry(),
        skimage.data.retina(),
        skimage.data.cat(),
        skimage.data.colorwheel(),
        skimage.data.logo()[..., :3],
    ]
    return [g.astype(np.float32) / 255 for g in grey], [c.astype(np.float32) / 255 for c in colour]


class _Materials:
    """Builds randomised texture tiles for a room from scikit-image's real images."""

    def __init__(self, room: Room, rng: np.random.Generator, footprint: float):
        self.room, self.rng, self.footprint = room, rng, footprint
        self.grey, self.colour = _sources()

    def _crop(self, img: np.ndarray, aspect: float = 1.0) -> np.ndarray:
        h, w = img.shape[:2]
        ch = int(self.rng.integers(min(h, 64), min(h, 320) + 1))
        cw = min(w, max(8, int(ch * aspect)))
        y, x = self.rng.integers(0, h - ch + 1), self.rng.integers(0, w - cw + 1)
        return cv2.resize(img[y : y + ch, x : x + cw], (TEX, TEX), interpolation=cv2.INTER_AREA)

    def _add(self, tex: np.ndarray, scale: tuple[float, float]) -> int:
        # prefilter (a fixed mip level): blur to about half the pixel footprint, in texels
        sx, sy = (min(4.0, max(0.7, 0.5 * self.footprint * TEX / s)) for s in scale)
        tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=sx, sigmaY=sy)
        self.room.textures.append(np.ascontiguousarray(np.clip(tex, 0, 1)[::-1], np.float32))
        self.room.tex_scale.append(scale)
        return len(self.room.textures) - 1

    def tinted(
        self, base: tuple[float, float, float], contrast: float, scale: float, grain: bool = False
    ) -> int:
        """A grey texture as detail on a base colour (`grain`: stretched into wood streaks)."""
        src = self.grey[int(self.rng.integers(len(self.grey)))]
        g = self._crop(src, aspect=8.0 if grain else 1.0)
        g = (g - g.mean()) / (g.std() + 1e-6)
        jitter = self.rng.uniform(0.85, 1.15, 3)
        col = np.clip(np.asarray(base) * jitter, 0.03, 1.0)
        tex = col[None, None, :] * (1.0 + contrast * g[..., None])
        s = scale * self.rng.uniform(0.7, 1.4)
        return self._add(tex, (s, s))

    def photo(self, scale: tuple[float, float], whole: bool = False) -> int:
        """A colour photograph (whole image for pictures, random crop otherwise)."""
        src = self.colour[int(self.rng.integers(len(self.colour)))]
        if whole:
            tex = cv2.resize(src, (TEX, TEX), interpolation=cv2.INTER_AREA)
        else:
            tex = self._crop(src)
        tex = tex * self.rng.uniform(0.8, 1.1, 3)[None, None, :]
        return self._add(tex, scale)

    def palette(self, kind: str) -> tuple[float, float, float]:
        """A random base colour for a kind of surface."""
        palettes = {
            "wall": [
                (0.85, 0.83, 0.78),
                (0.75, 0.8, 0.85),
                (0.8, 0.85, 0.75),
                (0.88, 0.8, 0.72),
                (0.7, 0.7, 0.72),
            ],
            "wood": [(0.55, 0.36, 0.2), (0.7, 0.52, 0.32), (0.4, 0.26, 0.15), (0.8, 0.65, 0.45)],
            "fabric": [
                (0.3, 0.35, 0.55),
                (0.55, 0.25, 0.22),
                (0.35, 0.5, 0.35),
                (0.5, 0.5, 0.52),
                (0.75, 0.65, 0.45),
                (0.25, 0.25, 0.28),
            ],
            "paint": [
                (0.9, 0.9, 0.88),
                (0.3, 0.3, 0.32),
                (0.6, 0.2, 0.2),
                (0.2, 0.35, 0.5),
                (0.85, 0.75, 0.3),
            ],
            "metal": [(0.2, 0.2, 0.22), (0.7, 0.7, 0.72), (0.6, 0.5, 0.3)],
            "card": [(0.62, 0.48, 0.3), (0.7, 0.58, 0.4)],
            "green": [(0.2, 0.45, 0.18), (0.3, 0.55, 0.2), (0.15, 0.35, 0.2)],
        }
        options = palettes[kind]
        return options[int(self.rng.integers(len(options)))]

    def wood(self) -> int:
        return self.tinted(self.palette("wood"), 0.25, 1.2, grain=True)

    def fabric(self) -> int:
        return self.tinted(self.palette("fabric"), 0.2, 0.8)


def _add_box(room: Room, centre, half, yaw: float, mat: int, cls: int, inst: int) -> None:
    room.boxes.append((np.asarray(centre, float), np.asarray(half, float), yaw, mat, cls, inst))


def _new_inst(room: Room) -> int:
    room.n_inst += 1
    return room.n_inst - 1


def _place(room: Room, wall: int, s: float, off: float, z: float) -> tuple[np.ndarray, float]:
    """World position and yaw of a point `s` metres along wall `wall`, `off` metres into the
    room, at height z. Local frame of wall items: +x points into the room, y along the wall."""
    w, d = room.size[0] / 2, room.size[1] / 2
    if wall == 0:  # x = -w, runs along +y
        return np.array([-w + off, -d + s, z]), 0.0
    if wall == 1:  # x = +w
        return np.array([w - off, d - s, z]), math.pi
    if wall == 2:  # y = -d
        return np.array([w - s, -d + off, z]), math.pi / 2
    return np.array([-w + s, d - off, z]), -math.pi / 2


def _wall_item(room: Room, mats: _Materials, rng, kind: str, wall: int, s: float, width: float):
    """Furniture standing against a wall, centred `s` along it, `width` wide."""
    inst = _new_inst(room)

    def box(off, z, depth, wid, hgt, mat, cls=None, lateral=0.0):
        p, yaw = _place(room, wall, s, off, z)
        p = p + lateral * np.array([-math.sin(yaw), math.cos(yaw), 0.0])
        _add_box(
            room,
            p,
            (depth / 2, wid / 2, hgt / 2),
            yaw,
            mat,
            CLASS_ID[{"boxes": "box"}.get(kind, kind)] if cls is None else cls,
            inst if cls is None else _new_inst(room),
        )

    if kind == "cabinet":
        h, dep = rng.uniform(0.7, 1.9), rng.uniform(0.4, 0.6)
        box(dep / 2, h / 2, dep, width, h, mats.tinted(mats.palette("paint"), 0.12, 0.8))
        box(dep + 0.01, h * 0.55, 0.02, width * 0.9, h * 0.8, mats.wood())
    elif kind == "shelf":
        h, dep = rng.uniform(1.4, 2.1), 0.35
        mat = mats.wood()
        for side in (-1, 1):
            box(dep / 2, h / 2, dep, 0.03, h, mat, lateral=side * (width / 2 - 0.015))
        box(0.01, h / 2, 0.02, width, h, mat)
        n_boards = int(rng.integers(3, 6))
        books = [mats.tinted(mats.palette("paint"), 0.3, 0.3) for _ in range(4)]
        for b in range(n_boards + 1):
            zb = 0.05 + b * (h - 0.1) / n_boards
            box(dep / 2, zb, dep, width - 0.06, 0.03, mat)
            if b < n_boards:  # a row of books
                x = -width / 2 + 0.05
                gap = (h - 0.1) / n_boards
                while x < width / 2 - 0.1 and rng.random() < 0.93:
                    bw, bh = rng.uniform(0.02, 0.06), rng.uniform(0.5, 0.85) * gap
                    book = books[int(rng.integers(len(books)))]
                    box(
                        0.17,
                        zb + 0.015 + bh / 2,
                        rng.uniform(0.15, 0.25),
                        bw,
                        bh,
                        book,
                        cls=CLASS_ID["book"],
                        lateral=x + bw / 2,
                    )
                    x += bw + 0.003
    elif kind == "bed":
        length, mat = rng.uniform(1.9, 2.1), mats.wood()
        box(length / 2, 0.18, length, width, 0.36, mat)
        box(length / 2 + 0.02, 0.45, length - 0.06, width - 0.06, 0.2, mats.fabric())
        box(0.04, 0.55, 0.08, width, 1.1, mat)
        pillow = mats.tinted((0.9, 0.9, 0.88), 0.1, 0.5)
        box(0.3, 0.6, 0.35, width * 0.7, 0.1, pillow)
    elif kind == "sofa":
        mat, dep = mats.fabric(), rng.uniform(0.8, 0.95)
        box(dep / 2, 0.22, dep, width, 0.44, mat)
        box(0.1, 0.5, 0.2, width, 0.8, mat)
        for side in (-1, 1):
            box(dep / 2, 0.33, dep, 0.18, 0.66, mat, lateral=side * (width / 2 - 0.09))
    elif kind == "desk":
        _table(
            room,
            mats,
            rng,
            _place(room, wall, s, 0.4, 0)[0][:2],
            _place(room, wall, s, 0, 0)[1],
            (0.7, width),
            inst,
        )
    elif kind == "boxes":
        z = 0.0
        for _ in range(int(rng.integers(1, 4))):
            bh = rng.uniform(0.2, 0.45)
            cw = width * rng.uniform(0.6, 0.95)
            card = mats.tinted(mats.palette("card"), 0.15, 0.6)
            box(0.3, z + bh / 2, cw * 0.8, cw, bh, card)
            z += bh
    elif kind == "lamp":
        p, _ = _place(room, wall, s, 0.3, 0)
        h = rng.uniform(1.4, 1.75)
        metal = mats.tinted(mats.palette("metal"), 0.05, 0.5)
        room.cyls.append((p[:2], 0.15, 0.0, 0.03, metal, CLASS_ID["lamp"], inst))
        room.cyls.append((p[:2], 0.015, 0.03, h, metal, CLASS_ID["lamp"], inst))
        shade = mats.tinted((0.92, 0.88, 0.75), 0.08, 0.4)
        room.cyls.append(
            (p[:2], rng.uniform(0.15, 0.22), h - 0.05, h + 0.2, shade, CLASS_ID["lamp"], inst)
        )
    elif kind == "plant":
        p, _ = _place(room, wall, s, 0.35, 0)
        pot = mats.tinted((0.6, 0.3, 0.2), 0.15, 0.4)
        ph = rng.uniform(0.3, 0.5)
        room.cyls.append((p[:2], 0.18, 0.0, ph, pot, CLASS_ID["plant"], inst))
        leaves = mats.tinted(mats.palette("green"), 0.5, 0.3)
        r = rng.uniform(0.25, 0.35)
        room.spheres.append(
            (np.array([p[0], p[1], ph + r * 0.9]), r, leaves, CLASS_ID["plant"], inst)
        )
    elif kind == "door":
        box(0.02, 1.025, 0.04, width, 2.05, mats.tinted(mats.palette("paint"), 0.08, 1.0))
        box(
            0.045,
            1.0,
            0.02,
            0.12,
            0.03,
            mats.tinted(mats.palette("metal"), 0.05, 0.3),
            lateral=width / 2 - 0.12,
        )
    else:
        raise ValueError(kind)


def _table(room: Room, mats: _Materials, rng, xy, yaw: float, size, inst: int) -> float:
    """A four-legged table (top height returned), with a few objects on it."""
    h = rng.uniform(0.72, 0.78)
    wood = mats.wood()
    c, s_ = math.cos(yaw), math.sin(yaw)
    _add_box(
        room,
        (xy[0], xy[1], h - 0.02),
        (size[0] / 2, size[1] / 2, 0.02),
        yaw,
        wood,
        CLASS_ID["table"],
        inst,
    )
    for sx in (-1, 1):
        for sy in (-1, 1):
            lx, ly = sx * (size[0] / 2 - 0.05), sy * (size[1] / 2 - 0.05)
            _add_box(
                room,
                (xy[0] + c * lx - s_ * ly, xy[1] + s_ * lx + c * ly, (h - 0.04) / 2),
                (0.025, 0.025, (h - 0.04) / 2),
                yaw,
                wood,
                CLASS_ID["table"],
                inst,
            )
    for _ in range(int(rng.integers(0, 3))):  # objects on the table
        lx = rng.uniform(-0.3, 0.3) * size[0]
        ly = rng.uniform(-0.3, 0.3) * size[1]
        p = (xy[0] + c * lx - s_ * ly, xy[1] + s_ * lx + c * ly)
        if rng.random() < 0.5:
            bh = rng.uniform(0.05, 0.25)
            _add_box(
                room,
                (p[0], p[1], h + bh / 2),
                (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15), bh / 2),
                rng.uniform(0, math.pi),
                mats.tinted(mats.palette("card"), 0.2, 0.4),
                CLASS_ID["box"],
                _new_inst(room),
            )
        else:
            r = rng.uniform(0.04, 0.1)
            room.cyls.append(
                (
                    np.array(p),
                    r,
                    h,
                    h + rng.uniform(0.1, 0.3),
                    mats.tinted(mats.palette("paint"), 0.2, 0.3),
                    CLASS_ID["box"],
                    _new_inst(room),
                )
            )
    return h


def _chair(room: Room, mats: _Materials, rng, xy, yaw: float, mat: int) -> None:
    """A chair whose back is on the side opposite to its facing direction `yaw`."""
    inst = _new_inst(room)
    c, s_ = math.cos(yaw), math.sin(yaw)

    def part(lx, ly, z, half):
        _add_box(
            room,
            (xy[0] + c * lx - s_ * ly, xy[1] + s_ * lx + c * ly, z),
            half,
            yaw,
            mat,
            CLASS_ID["chair"],
            inst,
        )

    seat = rng.uniform(0.43, 0.48)
    part(0, 0, seat, (0.22, 0.22, 0.025))
    for sx in (-1, 1):
        for sy in (-1, 1):
            part(sx * 0.19, sy * 0.19, seat / 2, (0.02, 0.02, seat / 2))
    part(-0.2, 0, seat + 0.22, (0.02, 0.22, 0.2))


def build_room(rng: np.random.Generator, footprint: float = 0.0075) -> Room:
    """A random furnished room; textures are prefiltered for pixels `footprint` metres wide."""
    size = np.array([rng.uniform(4.4, 6.0), rng.uniform(3.8, 5.0), rng.uniform(2.5, 2.9)])
    room = Room(size=size, shell_mat=[], light=np.zeros(3))
    mats = _Materials(room, rng, footprint)
    wall_mat = mats.tinted(mats.palette("wall"), 0.06, 2.0)
    accent = int(rng.integers(4))
    for face in range(4):
        if face == accent and rng.random() < 0.6:
            room.shell_mat.append(mats.tinted(mats.palette("wall"), 0.35, 1.5))
        else:
            room.shell_mat.append(wall_mat)
    if rng.random() < 0.5:
        floor = mats.tinted(mats.palette("wood"), 0.3, 1.5, grain=True)
    else:
        floor = mats.tinted(mats.palette("wall"), 0.3, 1.2)
    room.shell_mat += [floor, mats.tinted((0.92, 0.92, 0.9), 0.04, 2.0)]
    room.light = np.array(
        [rng.uniform(-0.25, 0.25) * size[0], rng.uniform(-0.25, 0.25) * size[1], size[2] - 0.15]
    )

    # Furniture along the walls; each wall gets a run of items with gaps.
    widths = {
        "cabinet": (0.6, 1.2),
        "shelf": (0.7, 1.2),
        "bed": (1.4, 1.8),
        "sofa": (1.6, 2.2),
        "desk": (1.0, 1.4),
        "boxes": (0.4, 0.7),
        "lamp": (0.4, 0.4),
        "plant": (0.5, 0.5),
        "door": (0.85, 0.95),
    }
    kinds = list(widths)
    used_once: set[str] = set()
    tall: list[tuple[int, float, float]] = []  # (wall, start, end) of items taller than 1.2 m
    for wall in rng.permutation(4):
        length = size[1] if wall < 2 else size[0]
        s = rng.uniform(0.4, 0.8)
        while True:
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind in used_once:
                continue
            width = rng.uniform(*widths[kind])
            if s + width > length - 0.4:
                break
            _wall_item(room, mats, rng, kind, int(wall), s + width / 2, width)
            if kind in ("bed", "sofa", "door", "desk"):
                used_once.add(kind)
            if kind in ("cabinet", "shelf", "lamp", "door", "plant"):
                tall.append((int(wall), s, s + width))
            s += width + rng.uniform(0.1, 0.6)

    # Pictures and a window on free wall stretches above furniture.
    for kind in ["window"] * int(rng.integers(0, 2)) + ["picture"] * int(rng.integers(2, 5)):
        for _ in range(20):
            wall = int(rng.integers(4))
            length = size[1] if wall < 2 else size[0]
            w = rng.uniform(0.9, 1.4) if kind == "window" else rng.uniform(0.35, 0.9)
            h = rng.uniform(1.0, 1.3) if kind == "window" else w * rng.uniform(0.6, 1.3)
            s = rng.uniform(0.2 + w / 2, length - 0.2 - w / 2)
            if any(tw == wall and a - 0.1 < s + w / 2 and s - w / 2 < b + 0.1 for tw, a, b in tall):
                continue
            z = rng.uniform(1.25, 1.6) + (0.1 if kind == "window" else 0.0)
            z = min(z, size[2] - 0.15 - h / 2)
            p, yaw = _place(room, wall, s, 0.01, z)
            mat = mats.photo((w, h), whole=True)
            _add_box(room, p, (0.01, w / 2, h / 2), yaw, mat, CLASS_ID[kind], _new_inst(room))
            tall.append((wall, s - w / 2, s + w / 2))
            break

    # Centre: table with chairs on a rug.
    inst = _new_inst(room)
    yaw = rng.uniform(-0.3, 0.3)
    tsize = (rng.uniform(1.0, 1.6), rng.uniform(0.7, 0.95))
    xy = rng.uniform(-0.2, 0.2, 2)
    rug = mats.photo((rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)))
    _add_box(
        room,
        (xy[0], xy[1], 0.005),
        (tsize[0] / 2 + 0.6, tsize[1] / 2 + 0.6, 0.005),
        yaw,
        rug,
        CLASS_ID["rug"],
        _new_inst(room),
    )
    _table(room, mats, rng, xy, yaw, tsize, inst)
    chair_mat = mats.tinted(
        mats.palette(["wood", "paint", "fabric"][int(rng.integers(3))]), 0.15, 0.5
    )
    c, s_ = math.cos(yaw), math.sin(yaw)
    for lx, ly, face in (
        (tsize[0] / 2 + 0.25, 0, math.pi),
        (-tsize[0] / 2 - 0.25, 0, 0.0),
        (0, tsize[1] / 2 + 0.25, -math.pi / 2),
        (0, -tsize[1] / 2 - 0.25, math.pi / 2),
    ):
        if rng.random() < 0.75:
            p = (xy[0] + c * lx - s_ * ly, xy[1] + s_ * lx + c * ly)
            _chair(room, mats, rng, p, yaw + face, chair_mat)
    return room


# --------------------------------------------------------------------------------------------
# Ray casting (rays: origins o [R, 3], unnormalised directions d [R, 3] with d_cam.z = 1, so the
# hit parameter t is the depth along the optical axis)
# --------------------------------------------------------------------------------------------
class _Tensors:
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
        shell = [
            (
                room.shell_mat[i],
                CLASS_ID["wall"]
                if i < 4
                else (CLASS_ID["floor"] if i == 4 else CLASS_ID["ceiling"]),
                i + 1,
            )
            for i in range(6)
        ]
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


def _cast_objects(T: _Tensors, apex: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
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


def _surface(T: _Tensors, origin: torch.Tensor, d_groups: torch.Tensor):
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


def _texture(T: _Tensors, mat: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
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


def _shade(T: _Tensors, x: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor, S: int):
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


def _trace(T: _Tensors, origin: torch.Tensor, dirs: torch.Tensor) -> list[torch.Tensor]:
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
        outs.append((_shade(T, x, n, _texture(T, T.mat[pid], uv), S), t, n, pid))
    return [torch.cat(z)[:N] for z in zip(*outs, strict=True)]


def render_view(T: _Tensors, viewmat: np.ndarray, K: np.ndarray, width: int, height: int):
    """Render one view: rgb [H,W,3], depth [H,W], camera-frame normals [H,W,3], class and
    instance ids [H,W]. Ground truth comes from the rays through pixel centres (+0.5); colour
    at object borders is the mean of 2x2 sub-pixel rays (antialiased, as a camera integrates).

    Rays are processed in 16x16-pixel groups, each tested only against the solids whose
    bounding spheres meet its cone (the same for the shadow rays from the light)."""
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


# --------------------------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """Smooth random signal over a closed loop of n samples, roughly in [-amp, amp]."""
    s = np.linspace(0, 2 * np.pi, n, endpoint=False)
    out = np.zeros(n)
    for k in (1, 2, 3):
        out += rng.normal(0, 1 / k) * np.sin(k * s + rng.uniform(0, 2 * np.pi))
    return amp * out / max(np.abs(out).max(), 1e-9)


def camera_path(room: Room, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Hand-held-like loop: world-to-camera [4,4] OpenCV matrices (world z up).

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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _write_colmap(dst: Path, names, viewmats, K, width, height, xyz, rgb) -> None:
    """A complete COLMAP text model: one PINHOLE camera, posed images, coloured points."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "cameras.txt").write_text(
        f"# Camera list\n1 PINHOLE {width} {height} {K[0, 0]:.10g} {K[1, 1]:.10g} "
        f"{K[0, 2]:.10g} {K[1, 2]:.10g}\n"
    )
    lines = ["# Image list: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then POINTS2D"]
    for i, (name, vm) in enumerate(zip(names, viewmats, strict=True), 1):
        qx, qy, qz, qw = Rotation.from_matrix(vm[:3, :3]).as_quat()
        tx, ty, tz = vm[:3, 3]
        lines += [
            f"{i} {qw:.12g} {qx:.12g} {qy:.12g} {qz:.12g} {tx:.12g} {ty:.12g} {tz:.12g} 1 {name}",
            "",
        ]
    (dst / "images.txt").write_text("\n".join(lines) + "\n")
    col = np.round(rgb * 255).astype(int)
    rows = [
        f"{i} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {c[0]} {c[1]} {c[2]} 0.5"
        for i, (p, c) in enumerate(zip(xyz, col, strict=True), 1)
    ]
    (dst / "points3D.txt").write_text("# 3D point list\n" + "\n".join(rows) + "\n")


def _demo_K(width: int, height: int, hfov_deg: float = 70.0) -> np.ndarray:
    f = width / (2 * math.tan(math.radians(hfov_deg) / 2))
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])


def generate_room(
    dslr: Path,
    seed: int,
    n_views: int,
    width: int,
    height: int,
    test_every: int = 8,
    points_per_view: int = 600,
) -> None:
    """Generate one room under `dslr` (the scene's `dslr/` folder)."""
    rng = np.random.default_rng(seed)
    K = _demo_K(width, height)
    room = build_room(rng, footprint=1.8 / K[0, 0])  # pixel size at 1.8 m
    T = _Tensors(room)
    viewmats = camera_path(room, n_views, rng)
    names = [f"DSC{i:05d}.JPG" for i in range(n_views)]
    for sub in (IMAGE_DIR, MASK_DIR, *GT_DIRS.values(), "nerfstudio"):
        (dslr / sub).mkdir(parents=True, exist_ok=True)
    mask = np.full((height, width), 255, np.uint8)
    test = set(range(test_every - 1, n_views, test_every))
    pts, cols = [], []
    for i, (name, vm) in enumerate(zip(names, viewmats, strict=True)):
        rgb, depth, normal, cls, inst = render_view(T, vm, K, width, height)
        stem = Path(name).stem
        rgb8 = (rgb.numpy() * 255 + 0.5).astype(np.uint8)
        cv2.imwrite(str(dslr / IMAGE_DIR / name), rgb8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(dslr / MASK_DIR / f"{stem}.png"), mask)
        mm = np.clip(np.round(depth.numpy() * DEPTH_SCALE), 0, 65535).astype(np.uint16)
        cv2.imwrite(str(dslr / GT_DIRS["depth"] / f"{stem}.png"), mm)
        n16 = np.round((normal.numpy() + 1) * NORMAL_SCALE).astype(np.uint16)
        cv2.imwrite(str(dslr / GT_DIRS["normals"] / f"{stem}.png"), n16[..., ::-1])
        cv2.imwrite(str(dslr / GT_DIRS["semantics"] / f"{stem}.png"), cls.numpy().astype(np.uint8))
        cv2.imwrite(
            str(dslr / GT_DIRS["instances"] / f"{stem}.png"), inst.numpy().astype(np.uint16)
        )
        if i not in test:  # sparse points from train views only, like SfM
            flat = rng.choice(width * height, min(points_per_view, width * height), replace=False)
            v, u = flat // width + 0.5, flat % width + 0.5
            z = depth.reshape(-1)[flat].numpy()
            cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], 1)
            c2w = np.linalg.inv(vm)
            pts.append(cam @ c2w[:3, :3].T + c2w[:3, 3])
            cols.append(rgb8.reshape(-1, 3)[flat] / 255.0)
    xyz, rgb_pts = np.concatenate(pts), np.concatenate(cols)
    _, keep = np.unique(np.floor(xyz / 0.01).astype(np.int64), axis=0, return_index=True)
    keep = np.sort(keep)
    _write_colmap(dslr / COLMAP_DIR, names, viewmats, K, width, height, xyz[keep], rgb_pts[keep])

    def frame(i):
        return {
            "file_path": names[i],
            "mask_path": f"{Path(names[i]).stem}.png",
            "transform_matrix": viewmat_to_nerfstudio(viewmats[i]).tolist(),
            "is_bad": False,
        }

    transforms = {
        "camera_model": "PINHOLE",
        "fl_x": K[0, 0],
        "fl_y": K[1, 1],
        "cx": K[0, 2],
        "cy": K[1, 2],
        "w": width,
        "h": height,
        "k1": 0.0,
        "k2": 0.0,
        "k3": 0.0,
        "k4": 0.0,
        "frames": [frame(i) for i in range(n_views) if i not in test],
        "test_frames": [frame(i) for i in sorted(test)],
    }
    write_json(dslr / TRANSFORMS, transforms)
    write_json(
        dslr / SPLIT_LISTS,
        {
            "train": [names[i] for i in range(n_views) if i not in test],
            "test": [names[i] for i in sorted(test)],
        },
    )


def _room_job(job: tuple) -> float:
    """Generate one room with single-threaded torch; returns seconds taken."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        generate_room(*job)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def generate_demo(
    out: str | Path,
    seed: int = 0,
    n_train: int = 6,
    n_val: int = 3,
    n_views: int = 40,
    width: int = 336,
    height: int = 224,
    workers: int = 0,
    verbose: bool = False,
) -> Path:
    """Generate the demo set under `out` (cached: a matching `demo.json` marker -> no work).

    Train rooms are listed in `splits/nvs_sem_train.txt`, held-out rooms in `nvs_sem_val.txt`.
    Rooms are generated in `workers` processes (0 = one per CPU core), each single-threaded:
    torch's thread pool spends most of its time waiting on these small per-tile operations.
    Returns `out`.
    """
    out = Path(out)
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_views": n_views,
        "width": width,
        "height": height,
    }
    if n_views < 2 or n_train + n_val < 1 or width < 8 or height < 8:
        raise UserError(f"demo needs >= 2 views, >= 1 room and >= 8x8 pixels, got {params}")
    marker = out / "demo.json"
    if _cached(marker, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".demo.lock", "w") as lock:  # concurrent callers (e.g. DDP ranks) wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cached(marker, params):
            _generate(out, params, workers, verbose)
    return out


def _cached(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()).get("params") == params
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _generate(out: Path, params: dict, workers: int, verbose: bool) -> None:
    seed, n_train, n_val = params["seed"], params["n_train"], params["n_val"]
    n_views, width, height = params["n_views"], params["width"], params["height"]
    marker = out / "demo.json"
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    ids = [f"demo_{i:03d}" for i in range(n_train + n_val)]
    for sid in ids:  # only our own folders: `out` may hold other data
        shutil.rmtree(out / "data" / sid, ignore_errors=True)
    jobs = [
        (out / "data" / sid / "dslr", seed * 1000 + i, n_views, width, height)
        for i, sid in enumerate(ids)
    ]
    if not workers:  # processes pay off only for real work (spawn costs seconds)
        big = len(jobs) * n_views * width * height > 4_000_000
        workers = (os.cpu_count() or 1) if big else 1
    workers = min(len(jobs), workers)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for sid, secs in zip(ids, pool.map(_room_job, jobs), strict=True):
                if verbose:
                    print(f"{sid}: {n_views} views {width}x{height} in {secs:.1f} s", flush=True)
    else:
        for sid, job in zip(ids, jobs, strict=True):
            secs = _room_job(job)
            if verbose:
                print(f"{sid}: {n_views} views {width}x{height} in {secs:.1f} s", flush=True)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    (out / "splits" / "nvs_sem_train.txt").write_text("".join(s + "\n" for s in ids[:n_train]))
    (out / "splits" / "nvs_sem_val.txt").write_text("".join(s + "\n" for s in ids[n_train:]))
    write_json(out / "classes.json", {"classes": CLASSES})
    seconds = time.perf_counter() - start
    write_json(marker, {"params": params, "scenes": ids, "seconds": round(seconds, 2)})


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Generate the demo scenes of a config (default preset: demo)."""
    from fit3d.cli import parse_cli
    from fit3d.scenes import generate_demo_set

    cfg = parse_cli(argv, "python -m fit3d.scenes.demo", "Generate the embedded demo scenes.")
    t0 = time.perf_counter()
    root = generate_demo_set(cfg, verbose=True)
    print(f"demo scenes ready in {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
