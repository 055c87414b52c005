"""Room layout: a furnished room as analytic solids, each with a material, class and instance.

World frame: metres, z up; the room spans [-W/2, W/2] x [-D/2, D/2] x [0, H] for `size` (W, D, H).
This is also the COLMAP world frame the generated poses and the scan mesh use (docs/method.md,
"ScanNet++ layout and poses"). The shell (4 walls, floor, ceiling) is instances 1..6; furniture
is yaw-rotated boxes, vertical capped cylinders and spheres, grouped into object instances.

Furniture is data: `WALL_KINDS` lists what can stand against a wall (width range, whether it may
appear once per room, whether it is tall enough to keep pictures off the wall above it, and the
small function that adds its parts), `DECOR` the pictures and windows hung on free wall. Every
random draw happens in a fixed order, so a seed always gives the same room.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fit3d.scenes.demo.materials import Materials

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
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
SHELL_FACES = ("wall", "wall", "wall", "wall", "floor", "ceiling")
"""Classes of the shell faces x-, x+, y-, y+, floor, ceiling; face i is instance i + 1."""


@dataclass
class Room:
    """Analytic solids of one room; every primitive has a material, class and instance id."""

    size: np.ndarray  # [3] extent (W, D, H)
    shell_mat: list[int]  # [6] materials of the shell faces (order of SHELL_FACES)
    light: np.ndarray  # [3] point light position
    textures: list[np.ndarray] = field(default_factory=list)  # each [TEX, TEX, 3] float32
    tex_scale: list[tuple[float, float]] = field(default_factory=list)  # metres per tile (u, v)
    boxes: list[tuple] = field(default_factory=list)  # (centre[3], half[3], yaw, mat, cls, inst)
    cyls: list[tuple] = field(default_factory=list)  # (centre xy[2], r, z0, z1, mat, cls, inst)
    spheres: list[tuple] = field(default_factory=list)  # (centre[3], r, mat, cls, inst)
    n_inst: int = 7  # next free instance id (1..6 are the shell faces)

    def new_inst(self) -> int:
        """A fresh instance id."""
        self.n_inst += 1
        return self.n_inst - 1

    def add_box(self, centre, half, yaw: float, mat: int, cls: int, inst: int) -> None:
        """A box with half extents `half` along its local axes, rotated by `yaw` about z."""
        self.boxes.append((np.asarray(centre, float), np.asarray(half, float), yaw, mat, cls, inst))


def place(room: Room, wall: int, s: float, off: float, z: float) -> tuple[np.ndarray, float]:
    """World position [3] and yaw of a point `s` metres along wall `wall`, `off` metres into the
    room, at height z. Local frame of wall items: +x points into the room, y along the wall."""
    w, d = room.size[0] / 2, room.size[1] / 2
    if wall == 0:  # x = -w, runs along +y
        return np.array([-w + off, -d + s, z]), 0.0
    if wall == 1:  # x = +w
        return np.array([w - off, d - s, z]), math.pi
    if wall == 2:  # y = -d
        return np.array([w - s, -d + off, z]), math.pi / 2
    return np.array([-w + s, d - off, z]), -math.pi / 2


def _rotated(xy, c: float, s: float, lx: float, ly: float) -> tuple[float, float]:
    """xy + R(yaw) (lx, ly) with c, s = cos(yaw), sin(yaw)."""
    return xy[0] + c * lx - s * ly, xy[1] + s * lx + c * ly


# --------------------------------------------------------------------------------------------
# Furniture against a wall
# --------------------------------------------------------------------------------------------
@dataclass
class WallItem:
    """One piece of furniture being built against a wall, centred `s` metres along it."""

    room: Room
    mats: Materials
    rng: np.random.Generator
    wall: int
    s: float
    width: float  # metres along the wall
    cls: int  # class of its parts
    inst: int  # instance of its parts

    def box(self, off, z, depth, wid, hgt, mat: int, cls: int | None = None, lateral=0.0) -> None:
        """A box centred `off` metres into the room and `lateral` metres along the wall, at
        height z, `depth` x `wid` x `hgt` metres; a part given its own `cls` is its own instance."""
        p, yaw = place(self.room, self.wall, self.s, off, z)
        p = p + lateral * np.array([-math.sin(yaw), math.cos(yaw), 0.0])
        self.room.add_box(
            p,
            (depth / 2, wid / 2, hgt / 2),
            yaw,
            mat,
            self.cls if cls is None else cls,
            self.inst if cls is None else self.room.new_inst(),
        )

    def cyl(self, off: float, r: float, z0: float, z1: float, mat: int) -> None:
        """A vertical cylinder of radius r from z0 to z1, `off` metres into the room."""
        p, _ = place(self.room, self.wall, self.s, off, 0)
        self.room.cyls.append((p[:2], r, z0, z1, mat, self.cls, self.inst))

    def sphere(self, off: float, z: float, r: float, mat: int) -> None:
        """A sphere of radius r centred at height z, `off` metres into the room."""
        p, _ = place(self.room, self.wall, self.s, off, 0)
        self.room.spheres.append((np.array([p[0], p[1], z]), r, mat, self.cls, self.inst))


def _cabinet(it: WallItem) -> None:
    h, dep = it.rng.uniform(0.7, 1.9), it.rng.uniform(0.4, 0.6)
    it.box(dep / 2, h / 2, dep, it.width, h, it.mats.painted("paint", 0.12, 0.8))
    it.box(dep + 0.01, h * 0.55, 0.02, it.width * 0.9, h * 0.8, it.mats.wood())  # door panel


def _shelf(it: WallItem) -> None:
    """Two sides, a back, 3-5 boards, and rows of books (each book its own instance)."""
    h, dep, width, rng = it.rng.uniform(1.4, 2.1), 0.35, it.width, it.rng
    mat = it.mats.wood()
    for side in (-1, 1):
        it.box(dep / 2, h / 2, dep, 0.03, h, mat, lateral=side * (width / 2 - 0.015))
    it.box(0.01, h / 2, 0.02, width, h, mat)
    n_boards = int(rng.integers(3, 6))
    books = [it.mats.painted("paint", 0.3, 0.3) for _ in range(4)]
    for b in range(n_boards + 1):
        zb = 0.05 + b * (h - 0.1) / n_boards
        it.box(dep / 2, zb, dep, width - 0.06, 0.03, mat)
        if b == n_boards:
            break
        x = -width / 2 + 0.05
        gap = (h - 0.1) / n_boards
        while x < width / 2 - 0.1 and rng.random() < 0.93:
            bw, bh = rng.uniform(0.02, 0.06), rng.uniform(0.5, 0.85) * gap
            book = books[int(rng.integers(len(books)))]
            depth = rng.uniform(0.15, 0.25)
            it.box(0.17, zb + 0.015 + bh / 2, depth, bw, bh, book, CLASS_ID["book"], x + bw / 2)
            x += bw + 0.003


def _bed(it: WallItem) -> None:
    length, mat = it.rng.uniform(1.9, 2.1), it.mats.wood()
    it.box(length / 2, 0.18, length, it.width, 0.36, mat)  # frame
    it.box(length / 2 + 0.02, 0.45, length - 0.06, it.width - 0.06, 0.2, it.mats.fabric())
    it.box(0.04, 0.55, 0.08, it.width, 1.1, mat)  # headboard
    pillow = it.mats.tinted((0.9, 0.9, 0.88), 0.1, 0.5)
    it.box(0.3, 0.6, 0.35, it.width * 0.7, 0.1, pillow)


def _sofa(it: WallItem) -> None:
    mat, dep = it.mats.fabric(), it.rng.uniform(0.8, 0.95)
    it.box(dep / 2, 0.22, dep, it.width, 0.44, mat)  # seat
    it.box(0.1, 0.5, 0.2, it.width, 0.8, mat)  # back
    for side in (-1, 1):  # arms
        it.box(dep / 2, 0.33, dep, 0.18, 0.66, mat, lateral=side * (it.width / 2 - 0.09))


def _desk(it: WallItem) -> None:
    xy = place(it.room, it.wall, it.s, 0.4, 0)[0][:2]
    yaw = place(it.room, it.wall, it.s, 0, 0)[1]
    table(it.room, it.mats, it.rng, xy, yaw, (0.7, it.width), it.inst)


def _boxes(it: WallItem) -> None:
    """A stack of 1-3 cardboard boxes (one instance)."""
    z = 0.0
    for _ in range(int(it.rng.integers(1, 4))):
        bh = it.rng.uniform(0.2, 0.45)
        cw = it.width * it.rng.uniform(0.6, 0.95)
        card = it.mats.painted("card", 0.15, 0.6)
        it.box(0.3, z + bh / 2, cw * 0.8, cw, bh, card)
        z += bh


def _lamp(it: WallItem) -> None:
    h = it.rng.uniform(1.4, 1.75)
    metal = it.mats.painted("metal", 0.05, 0.5)
    it.cyl(0.3, 0.15, 0.0, 0.03, metal)  # foot
    it.cyl(0.3, 0.015, 0.03, h, metal)  # pole
    shade = it.mats.tinted((0.92, 0.88, 0.75), 0.08, 0.4)
    it.cyl(0.3, it.rng.uniform(0.15, 0.22), h - 0.05, h + 0.2, shade)


def _plant(it: WallItem) -> None:
    pot = it.mats.tinted((0.6, 0.3, 0.2), 0.15, 0.4)
    ph = it.rng.uniform(0.3, 0.5)
    it.cyl(0.35, 0.18, 0.0, ph, pot)
    leaves = it.mats.painted("green", 0.5, 0.3)
    r = it.rng.uniform(0.25, 0.35)
    it.sphere(0.35, ph + r * 0.9, r, leaves)


def _door(it: WallItem) -> None:
    it.box(0.02, 1.025, 0.04, it.width, 2.05, it.mats.painted("paint", 0.08, 1.0))
    handle = it.mats.painted("metal", 0.05, 0.3)
    it.box(0.045, 1.0, 0.02, 0.12, 0.03, handle, lateral=it.width / 2 - 0.12)


@dataclass(frozen=True)
class WallKind:
    """A kind of furniture that stands against a wall."""

    build: Callable[[WallItem], None]  # adds the parts
    width: tuple[float, float]  # range of its width along the wall (m)
    label: str  # class of its parts
    once: bool = False  # at most one per room
    tall: bool = False  # no picture or window on the wall above it


WALL_KINDS: dict[str, WallKind] = {
    "cabinet": WallKind(_cabinet, (0.6, 1.2), "cabinet", tall=True),
    "shelf": WallKind(_shelf, (0.7, 1.2), "shelf", tall=True),
    "bed": WallKind(_bed, (1.4, 1.8), "bed", once=True),
    "sofa": WallKind(_sofa, (1.6, 2.2), "sofa", once=True),
    "desk": WallKind(_desk, (1.0, 1.4), "table", once=True),
    "boxes": WallKind(_boxes, (0.4, 0.7), "box"),
    "lamp": WallKind(_lamp, (0.4, 0.4), "lamp", tall=True),
    "plant": WallKind(_plant, (0.5, 0.5), "plant", tall=True),
    "door": WallKind(_door, (0.85, 0.95), "door", once=True, tall=True),
}
"""Furniture along the walls. Rooms draw kinds by their index here, so the order is part of
the generator's output."""


@dataclass(frozen=True)
class Decor:
    """Something flat hung on a free stretch of wall (a box 2 cm deep showing a photograph)."""

    count: tuple[int, int]  # how many per room: integers in [low, high)
    width: tuple[float, float]  # metres
    height: tuple[float, float]  # metres, or times the width if `aspect`
    aspect: bool
    lift: float  # added to the centre height drawn in [1.25, 1.6] m


DECOR: dict[str, Decor] = {
    "window": Decor((0, 2), (0.9, 1.4), (1.0, 1.3), aspect=False, lift=0.1),
    "picture": Decor((2, 5), (0.35, 0.9), (0.6, 1.3), aspect=True, lift=0.0),
}
"""Pictures and windows, placed in this order after the furniture."""


# --------------------------------------------------------------------------------------------
# Free-standing furniture
# --------------------------------------------------------------------------------------------
def table(room: Room, mats: Materials, rng, xy, yaw: float, size, inst: int) -> float:
    """A four-legged table (top height returned) with a few objects on it."""
    h = rng.uniform(0.72, 0.78)
    wood = mats.wood()
    c, s_ = math.cos(yaw), math.sin(yaw)
    top = (xy[0], xy[1], h - 0.02)
    room.add_box(top, (size[0] / 2, size[1] / 2, 0.02), yaw, wood, CLASS_ID["table"], inst)
    for sx in (-1, 1):
        for sy in (-1, 1):
            lx, ly = sx * (size[0] / 2 - 0.05), sy * (size[1] / 2 - 0.05)
            leg = (*_rotated(xy, c, s_, lx, ly), (h - 0.04) / 2)
            room.add_box(leg, (0.025, 0.025, (h - 0.04) / 2), yaw, wood, CLASS_ID["table"], inst)
    for _ in range(int(rng.integers(0, 3))):  # objects on the table, each its own instance
        lx = rng.uniform(-0.3, 0.3) * size[0]
        ly = rng.uniform(-0.3, 0.3) * size[1]
        p = _rotated(xy, c, s_, lx, ly)
        if rng.random() < 0.5:  # a box
            bh = rng.uniform(0.05, 0.25)
            half = (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15), bh / 2)
            yaw_b = rng.uniform(0, math.pi)
            mat = mats.painted("card", 0.2, 0.4)
            room.add_box(
                (p[0], p[1], h + bh / 2), half, yaw_b, mat, CLASS_ID["box"], room.new_inst()
            )
        else:  # a cylinder (a vase, a tin)
            r = rng.uniform(0.04, 0.1)
            z1 = h + rng.uniform(0.1, 0.3)
            mat = mats.painted("paint", 0.2, 0.3)
            room.cyls.append((np.array(p), r, h, z1, mat, CLASS_ID["box"], room.new_inst()))
    return h


def chair(room: Room, mats: Materials, rng, xy, yaw: float, mat: int) -> None:
    """A chair facing `yaw` (its back on the opposite side): seat, four legs, back."""
    inst = room.new_inst()
    c, s_ = math.cos(yaw), math.sin(yaw)

    def part(lx, ly, z, half):
        room.add_box((*_rotated(xy, c, s_, lx, ly), z), half, yaw, mat, CLASS_ID["chair"], inst)

    seat = rng.uniform(0.43, 0.48)
    part(0, 0, seat, (0.22, 0.22, 0.025))
    for sx in (-1, 1):
        for sy in (-1, 1):
            part(sx * 0.19, sy * 0.19, seat / 2, (0.02, 0.02, seat / 2))
    part(-0.2, 0, seat + 0.22, (0.02, 0.22, 0.2))


# --------------------------------------------------------------------------------------------
# The room
# --------------------------------------------------------------------------------------------
def build_room(rng: np.random.Generator, footprint: float = 0.0075) -> Room:
    """A random furnished room; textures are prefiltered for pixels `footprint` metres wide."""
    size = np.array([rng.uniform(4.4, 6.0), rng.uniform(3.8, 5.0), rng.uniform(2.5, 2.9)])
    mats = Materials(rng, footprint)
    room = Room(size, [], np.zeros(3), textures=mats.textures, tex_scale=mats.scales)
    _shell(room, mats, rng)
    tall = _wall_furniture(room, mats, rng)
    _decor(room, mats, rng, tall)
    _centre(room, mats, rng)
    return room


def _shell(room: Room, mats: Materials, rng: np.random.Generator) -> None:
    """Wall materials (one wall may get an accent), floor, ceiling and the light."""
    wall_mat = mats.painted("wall", 0.06, 2.0)
    accent = int(rng.integers(4))
    for face in range(4):
        if face == accent and rng.random() < 0.6:
            room.shell_mat.append(mats.painted("wall", 0.35, 1.5))
        else:
            room.shell_mat.append(wall_mat)
    if rng.random() < 0.5:
        floor = mats.tinted(mats.palette("wood"), 0.3, 1.5, grain=True)
    else:
        floor = mats.painted("wall", 0.3, 1.2)
    room.shell_mat += [floor, mats.tinted((0.92, 0.92, 0.9), 0.04, 2.0)]
    size = room.size
    room.light = np.array(
        [rng.uniform(-0.25, 0.25) * size[0], rng.uniform(-0.25, 0.25) * size[1], size[2] - 0.15]
    )


def _wall_furniture(room: Room, mats: Materials, rng) -> list[tuple[int, float, float]]:
    """Each wall gets a run of `WALL_KINDS` items with gaps; returns the (wall, start, end)
    stretches that pictures must avoid."""
    kinds = list(WALL_KINDS)
    used_once: set[str] = set()
    tall: list[tuple[int, float, float]] = []
    for wall in rng.permutation(4):
        length = room.size[1] if wall < 2 else room.size[0]
        s = rng.uniform(0.4, 0.8)
        while True:
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind in used_once:
                continue
            spec = WALL_KINDS[kind]
            width = rng.uniform(*spec.width)
            if s + width > length - 0.4:
                break
            inst = room.new_inst()
            item = WallItem(
                room, mats, rng, int(wall), s + width / 2, width, CLASS_ID[spec.label], inst
            )
            spec.build(item)
            if spec.once:
                used_once.add(kind)
            if spec.tall:
                tall.append((int(wall), s, s + width))
            s += width + rng.uniform(0.1, 0.6)
    return tall


def _decor(room: Room, mats: Materials, rng, tall: list[tuple[int, float, float]]) -> None:
    """`DECOR` items on free wall stretches (up to 20 tries each); `tall` grows as they land."""
    size = room.size
    todo = [kind for kind, d in DECOR.items() for _ in range(int(rng.integers(*d.count)))]
    for kind in todo:
        d = DECOR[kind]
        for _ in range(20):
            wall = int(rng.integers(4))
            length = size[1] if wall < 2 else size[0]
            w = rng.uniform(*d.width)
            h = w * rng.uniform(*d.height) if d.aspect else rng.uniform(*d.height)
            s = rng.uniform(0.2 + w / 2, length - 0.2 - w / 2)
            if any(tw == wall and a - 0.1 < s + w / 2 and s - w / 2 < b + 0.1 for tw, a, b in tall):
                continue
            z = rng.uniform(1.25, 1.6) + d.lift
            z = min(z, size[2] - 0.15 - h / 2)
            p, yaw = place(room, wall, s, 0.01, z)
            mat = mats.photo((w, h), whole=True)
            room.add_box(p, (0.01, w / 2, h / 2), yaw, mat, CLASS_ID[kind], room.new_inst())
            tall.append((wall, s - w / 2, s + w / 2))
            break


def _centre(room: Room, mats: Materials, rng) -> None:
    """A table on a rug in the middle of the room, with up to four chairs."""
    inst = room.new_inst()
    yaw = rng.uniform(-0.3, 0.3)
    tsize = (rng.uniform(1.0, 1.6), rng.uniform(0.7, 0.95))
    xy = rng.uniform(-0.2, 0.2, 2)
    rug = mats.photo((rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)))
    rug_half = (tsize[0] / 2 + 0.6, tsize[1] / 2 + 0.6, 0.005)
    room.add_box((xy[0], xy[1], 0.005), rug_half, yaw, rug, CLASS_ID["rug"], room.new_inst())
    table(room, mats, rng, xy, yaw, tsize, inst)
    chair_mat = mats.painted(["wood", "paint", "fabric"][int(rng.integers(3))], 0.15, 0.5)
    c, s_ = math.cos(yaw), math.sin(yaw)
    for lx, ly, face in (
        (tsize[0] / 2 + 0.25, 0, math.pi),
        (-tsize[0] / 2 - 0.25, 0, 0.0),
        (0, tsize[1] / 2 + 0.25, -math.pi / 2),
        (0, -tsize[1] / 2 - 0.25, math.pi / 2),
    ):
        if rng.random() < 0.75:
            chair(room, mats, rng, _rotated(xy, c, s_, lx, ly), yaw + face, chair_mat)
