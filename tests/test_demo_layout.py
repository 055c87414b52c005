"""Demo room layout: the furniture tables are honoured (once-per-room kinds, nothing hung above
tall furniture), everything stays inside the room, rooms differ and use many classes."""

from __future__ import annotations

import numpy as np
import pytest

from fit3d.scenes.demo.layout import (
    CLASS_ID,
    CLASSES,
    DECOR,
    WALL_KINDS,
    Room,
    build_room,
)

SEEDS = range(12)


@pytest.fixture(scope="module")
def rooms() -> list[Room]:
    return [build_room(np.random.default_rng(s)) for s in SEEDS]


def _prims(room: Room) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(AABB min [3], AABB max [3], class, instance) of every furniture primitive."""
    out = []
    for c, h, yaw, _, cls, inst in room.boxes:
        ext = np.abs(np.cos(yaw)) * h[0] + np.abs(np.sin(yaw)) * h[1]
        eyt = np.abs(np.sin(yaw)) * h[0] + np.abs(np.cos(yaw)) * h[1]
        half = np.array([ext, eyt, h[2]])
        out.append((c - half, c + half, cls, inst))
    for xy, r, z0, z1, _, cls, inst in room.cyls:
        out.append(
            (np.array([xy[0] - r, xy[1] - r, z0]), np.array([xy[0] + r, xy[1] + r, z1]), cls, inst)
        )
    for c, r, _, cls, inst in room.spheres:
        out.append((c - r, c + r, cls, inst))
    return out


def test_furniture_stays_inside_the_room(rooms):
    for room in rooms:
        half = np.array([room.size[0] / 2, room.size[1] / 2])
        for lo, hi, cls, _ in _prims(room):
            assert (lo[:2] >= -half - 1e-6).all() and (hi[:2] <= half + 1e-6).all(), CLASSES[cls]
            assert lo[2] >= -1e-6 and hi[2] <= room.size[2], CLASSES[cls]


def test_instances_have_one_class_and_unique_ids(rooms):
    for room in rooms:
        cls_of: dict[int, set[int]] = {}
        for *_, cls, inst in _prims(room):
            cls_of.setdefault(inst, set()).add(cls)
        assert all(len(c) == 1 for c in cls_of.values())
        assert min(cls_of) == 7 and max(cls_of) == room.n_inst - 1  # 1..6 are the shell
        assert len(room.shell_mat) == 6


def test_once_per_room_kinds_appear_at_most_once(rooms):
    once = {WALL_KINDS[k].label for k in WALL_KINDS if WALL_KINDS[k].once} - {"table"}
    assert once == {"bed", "sofa", "door"}
    seen = set()
    for room in rooms:
        inst_by_cls: dict[int, set[int]] = {}
        for *_, cls, inst in _prims(room):
            inst_by_cls.setdefault(cls, set()).add(inst)
        for label in once:
            assert len(inst_by_cls.get(CLASS_ID[label], ())) <= 1, label
        assert len(inst_by_cls[CLASS_ID["table"]]) <= 2  # the centre table and at most one desk
        seen |= {CLASSES[c] for c in inst_by_cls}
    assert {k.label for k in WALL_KINDS.values()} <= seen  # every kind gets built somewhere


def _on_wall(room: Room, lo: np.ndarray, hi: np.ndarray) -> tuple[int, float, float]:
    """(wall, start, end) of a footprint along the wall it is nearest to; walls 0..3 are x-, x+,
    y-, y+ and the coordinate runs along y for walls 0, 1 and along x for walls 2, 3."""
    w, d = room.size[0] / 2, room.size[1] / 2
    wall = int(np.argmin([lo[0] + w, w - hi[0], lo[1] + d, d - hi[1]]))
    return (wall, lo[1], hi[1]) if wall < 2 else (wall, lo[0], hi[0])


def test_nothing_hangs_above_tall_furniture(rooms):
    """No picture or window overlaps the wall stretch of a tall wall item (the generator keeps
    10 cm off the stretch it gave the item; a plant's leaves may reach 10 cm beyond it)."""
    tall = {CLASS_ID[k.label] for k in WALL_KINDS.values() if k.tall}
    flat = {CLASS_ID[k] for k in DECOR}
    checked = 0
    for room in rooms:
        prims = _prims(room)
        spans = [_on_wall(room, lo, hi) for lo, hi, c, _ in prims if c in tall]
        for lo, hi, c, _ in prims:
            if c in flat:
                wall, a, b = _on_wall(room, lo, hi)
                assert all(tw != wall or b <= ta + 1e-6 or tb <= a + 1e-6 for tw, ta, tb in spans)
                checked += 1
    assert checked >= 2 * len(rooms)


def test_rooms_have_many_classes_and_differ(rooms):
    for room in rooms[:3]:
        classes = {p[-2] for p in room.boxes + room.cyls + room.spheres}
        assert len(classes | {0, 1, 2}) >= 10
    assert rooms[0].textures[0].shape == rooms[1].textures[0].shape
    assert not np.allclose(rooms[0].textures[0], rooms[1].textures[0])
    assert len(rooms[0].textures) == len(rooms[0].tex_scale)
