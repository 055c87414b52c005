"""ScanNet++ labels from the mesh, checked against an analytic box room written in the official
scan format (binary PLY, segments.json, segments_anno.json, map_benchmark.csv): depth of known
planes, camera-frame normals, labels of boxes; then the CLI end to end (files, resume, relabel on
changed settings, sharding, bad roots, a labelled copy via `labels.out`) and the scene EvalSet
reading the result. Last, a generated demo room labelled from its own scan against the
generator's exact maps (issue 15's acceptance figures)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fit3d.config import Config, load_config
from fit3d.datasets import open_dataset
from fit3d.datasets import scannetpp_labels as spl
from fit3d.datasets.scenes import SCANNETPP_CLASSES
from fit3d.errors import UserError
from fit3d.scenes import generate_demo_set, open_scene
from fit3d.scenes.demo import CLASSES as DEMO_CLASSES
from fit3d.scenes.scannetpp import viewmat_to_nerfstudio

SPP = "scenes.name=scannetpp"


def config(root: Path, *overrides: str) -> Config:
    """The labeller's config for a ScanNet++ root (as `--preset scannetpp` would give)."""
    return load_config([], [SPP, f"scenes.root={root}", *overrides])


W, H = 64, 48
ROOM = (np.array([-2.0, -1.5, 0.0]), np.array([2.0, 1.5, 2.5]))  # inside of a box room
# (lo, hi, label); "books" is mapped to "book" by map_benchmark.csv, "stuff" is no class,
# "clutter" is mapped to None (ignored)
BOXES = [
    (np.array([0.8, -0.9, 0.0]), np.array([1.6, -0.1, 0.7]), "table"),
    (np.array([0.9, 0.3, 0.0]), np.array([1.5, 0.9, 1.2]), "books"),
    (np.array([-1.6, 0.6, 0.0]), np.array([-1.0, 1.2, 0.5]), "stuff"),
    (np.array([-1.5, -1.2, 0.0]), np.array([-1.0, -0.7, 0.4]), "clutter"),
]
SHELL = ["wall", "wall", "wall", "wall", "floor", "ceiling"]  # faces x-, x+, y-, y+, z-, z+


def _quad_grid(corner, du, dv, n):
    """Vertices [(n+1)^2, 3] and triangles of an n x n grid on the parallelogram corner+du+dv."""
    s = np.linspace(0, 1, n + 1)
    a, b = np.meshgrid(s, s, indexing="ij")
    verts = corner + a[..., None] * du + b[..., None] * dv
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    q = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
    tris = np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]])
    return verts.reshape(-1, 3), tris


def _box_faces(lo, hi, n):
    """Six gridded faces of an axis-aligned box: list of (verts, tris)."""
    d = hi - lo
    ex, ey, ez = np.diag(d)
    return [
        _quad_grid(lo, ey, ez, n),
        _quad_grid(lo + ex, ey, ez, n),
        _quad_grid(lo, ex, ez, n),
        _quad_grid(lo + ey, ex, ez, n),
        _quad_grid(lo, ex, ey, n),
        _quad_grid(lo + ez, ex, ey, n),
    ]


def write_ply(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY as ScanNet++ ships it (xyz float, rgb uchar, uchar/int faces)."""
    vdt = np.dtype(
        [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")]
    )
    v = np.zeros(len(verts), vdt)
    v["x"], v["y"], v["z"] = verts.T
    v["r"] = v["g"] = v["b"] = 128
    fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,))])
    f = np.zeros(len(faces), fdt)
    f["n"], f["i"] = 3, faces
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(verts)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    path.write_bytes(header.encode() + v.tobytes() + f.tobytes())


def build_scan(scene_dir: Path, grid: int = 3) -> None:
    """Room shell + boxes as one mesh; each face of the shell and each box is one object."""
    parts = []  # (verts, tris, label)
    for (v, t), label in zip(_box_faces(*ROOM, grid), SHELL, strict=True):
        parts.append((v, t, label))
    for lo, hi, label in BOXES:
        for v, t in _box_faces(lo, hi, grid):
            parts.append((v, t, label))
    verts, faces, groups, off = [], [], [], 0
    seg_of_vertex = []
    objects: dict[int, dict] = {}
    for k, (v, t, label) in enumerate(parts):
        verts.append(v)
        faces.append(t + off)
        # segments: non-identity ids, 3 vertices each, so vertex -> segment -> object is tested
        segs = 7000 + (off + np.arange(len(v))) // 3 * 2
        seg_of_vertex.append(segs)
        obj = 1 + (k if k < 6 else 6 + (k - 6) // 6)  # one object per shell face / per box
        objects.setdefault(obj, {"objectId": obj, "label": label, "segments": []})
        objects[obj]["segments"] += sorted(set(segs.tolist()))
        off += len(v)
    seg_idx = np.concatenate(seg_of_vertex)
    scans = scene_dir / "scans"
    scans.mkdir(parents=True)
    write_ply(scans / "mesh_aligned_0.05.ply", np.concatenate(verts), np.concatenate(faces))
    (scans / "segments.json").write_text(json.dumps({"segIndices": seg_idx.tolist()}))
    groups = list(objects.values())
    (scans / "segments_anno.json").write_text(json.dumps({"segGroups": groups}))


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV world-to-camera [4, 4] of a camera at `eye` looking at `target`."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    vm = np.eye(4)
    vm[:3, :3], vm[:3, 3] = R, -R @ eye
    return vm


CAMERAS = [
    look_at([-1.2, 0.2, 1.2], [2.0, -0.3, 0.5]),
    look_at([0.0, 1.2, 1.6], [1.2, -0.5, 0.3]),
    look_at([0.5, -1.0, 1.0], [-2.0, 1.5, 0.4]),
]
K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])


def build_scene(root: Path, sid: str = "scene0") -> Path:
    dslr = root / "data" / sid / "dslr"
    (dslr / "undistorted_images").mkdir(parents=True)
    (dslr / "nerfstudio").mkdir()
    frames = []
    for i, vm in enumerate(CAMERAS):
        name = f"DSC{i:05d}.JPG"
        cv2.imwrite(str(dslr / "undistorted_images" / name), np.full((H, W, 3), 90, np.uint8))
        frames.append({"file_path": name, "transform_matrix": viewmat_to_nerfstudio(vm).tolist()})
    meta = {"fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "w": W, "h": H}
    meta["frames"] = frames
    (dslr / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
    build_scan(root / "data" / sid)
    return root / "data" / sid


def write_root(root: Path, scenes=("scene0",), mapping: bool = True) -> Path:
    (root / "splits").mkdir(parents=True)
    for sid in scenes:
        build_scene(root, sid)
    (root / "splits" / "nvs_sem_train.txt").write_text(scenes[0] + "\n")
    (root / "splits" / "nvs_sem_val.txt").write_text("\n".join(scenes[1:]) + "\n")
    if mapping:
        m = root / "metadata" / "semantic_benchmark"
        m.mkdir(parents=True)
        (m / "map_benchmark.csv").write_text(
            "class,count,semantic_map_to,instance_map_to\n"
            "books,10,book,book\nclutter,4,None,None\ntable,30,,\nwall,99,,\n"
        )
    return root


# --- analytic reference ---------------------------------------------------------------------
def _slab(o, d, lo, hi):
    """Entry / exit ray parameters into an axis-aligned box (inf when missed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), -1)
    tmax = np.nanmin(np.maximum(t1, t2), -1)
    return tmin, tmax


def analytic(vm: np.ndarray):
    """Exact depth, camera normals, class ids and object ids of the box room for one view."""
    R, t = vm[:3, :3], vm[:3, 3]
    eye = -R.T @ t
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    d = cam.reshape(-1, 3) @ R
    _, t_room = _slab(eye, d, *ROOM)  # exit through the room's inside
    best, obj = t_room.copy(), np.zeros(len(d), int)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = eye + best[:, None] * d
        wall = np.argmin(
            np.abs(np.concatenate([p - ROOM[0], ROOM[1] - p], 1))[:, [0, 3, 1, 4, 2, 5]], 1
        )
    obj = 1 + wall  # shell objects 1..6 in SHELL order
    normal_w = np.zeros_like(d)
    axes = [0, 0, 1, 1, 2, 2]
    for k in range(6):
        normal_w[obj == k + 1, axes[k]] = 1.0
    for b, (lo, hi, _) in enumerate(BOXES):
        tmin, tmax = _slab(eye, d, lo, hi)
        hit = (tmax >= tmin) & (tmin > 0) & (tmin < best)
        best[hit] = tmin[hit]
        obj[hit] = 7 + b
        p = eye + tmin[hit, None] * d[hit]
        face = np.argmin(np.concatenate([np.abs(p - lo), np.abs(p - hi)], 1), 1) % 3
        normal_w[hit] = 0.0
        normal_w[hit, face] = 1.0
    n_c = normal_w @ R.T
    n_c *= np.where(np.einsum("ij,ij->i", n_c, cam.reshape(-1, 3)) > 0, -1.0, 1.0)[:, None]
    labels = SHELL + [b[2] for b in BOXES]
    mapped = {"books": "book", "clutter": None}
    cls = np.array(
        [
            SCANNETPP_CLASSES.index(mapped.get(lab, lab))
            if mapped.get(lab, lab) in SCANNETPP_CLASSES
            else 255
            for lab in labels
        ]
    )
    return (
        best.reshape(H, W),
        n_c.reshape(H, W, 3),
        cls[obj - 1].reshape(H, W),
        obj.reshape(H, W),
    )


def _interior(obj: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one object (away from object edges)."""
    pad = np.pad(obj, 1, mode="edge")
    same = np.ones_like(obj, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= pad[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] == obj
    return same


def test_render_matches_analytic_room(tmp_path):
    root = write_root(tmp_path / "spp")
    mapping = spl.read_mapping(root / spl.MAPPING)
    scan = spl.read_scan(root / "data" / "scene0", SCANNETPP_CLASSES, mapping)
    caster = spl.Caster(scan)
    rel, ang, agree_sem, agree_inst = [], [], [], []
    for vm in CAMERAS:
        maps = caster.render(K, vm, W, H)
        depth, normals, cls, obj = analytic(vm)
        inner = _interior(obj)
        assert (maps["depth"] > 0).all()  # a closed room: every ray hits
        rel.append(np.abs(maps["depth"] - depth)[inner] / depth[inner])
        cos = np.clip((maps["normals"] * normals).sum(-1), -1, 1)
        ang.append(np.degrees(np.arccos(cos))[inner])
        agree_sem.append((maps["semantics"] == cls)[inner])
        agree_inst.append((maps["instances"] == obj)[inner])
        figures = spl.agreement(maps, depth, normals, cls, edges_of=obj)
        assert figures["pixels"] == inner.sum()
        assert figures["semantic_agreement"] == 1.0
        assert figures["depth_rel_median"] == pytest.approx(np.median(rel[-1]), abs=1e-12)
    rel, ang = np.concatenate(rel), np.concatenate(ang)
    sem, inst = np.concatenate(agree_sem), np.concatenate(agree_inst)
    print(
        f"\nmesh labels vs analytic room: depth rel. error median {np.median(rel):.2e} "
        f"max {rel.max():.2e}; normals median {np.median(ang):.3f} deg; semantic agreement "
        f"{sem.mean():.4f}, instance agreement {inst.mean():.4f} ({sem.size} interior pixels)"
    )
    assert np.median(rel) < 1e-5 and rel.max() < 1e-3
    assert np.median(ang) < 0.01 and ang.max() < 0.1
    assert sem.all() and inst.all()
    # the mapping did its work: books -> book, clutter -> ignore, "stuff" -> ignore
    all_sem = np.concatenate([caster.render(K, vm, W, H)["semantics"].ravel() for vm in CAMERAS])
    assert SCANNETPP_CLASSES.index("book") in all_sem and 255 in all_sem


def test_first_vertex_rule_and_overwrite_order():
    """A face takes its first vertex's object; a later segGroup overwrites an earlier one."""
    seg = np.array([5, 5, 9, 9, 12])
    groups = [
        {"objectId": 3, "label": "wall", "segments": [5, 9]},
        {"objectId": 4, "label": "chair", "segments": [9]},
    ]
    assert spl.vertex_objects(seg, groups).tolist() == [3, 3, 4, 4, 0]
    cls = spl.object_classes(groups, SCANNETPP_CLASSES, None)
    assert cls == {3: SCANNETPP_CLASSES.index("wall"), 4: SCANNETPP_CLASSES.index("chair")}


def test_encode_round_trips_through_scene_reader(tmp_path):
    """Encoded PNGs decode (by fit3d.scenes) to the maps to within file quantisation."""
    root = write_root(tmp_path / "spp")
    spl.main([SPP, f"scenes.root={root}"])
    scene_dir = root / "data" / "scene0"
    scan = spl.read_scan(scene_dir, SCANNETPP_CLASSES, spl.read_mapping(root / spl.MAPPING))
    maps = spl.Caster(scan).render(K, CAMERAS[1], W, H)
    ds = open_dataset("scannetpp", root, "train", resolution=1.0)
    s = ds[1]
    assert s.key == "scene0/DSC00001.JPG" and s.group == "scene0"
    assert torch.allclose(s.depth, torch.from_numpy(maps["depth"]), atol=5e-4)
    assert torch.allclose(s.normals, torch.from_numpy(maps["normals"]), atol=1e-4)
    assert torch.equal(s.seg, torch.from_numpy(maps["semantics"].astype(np.int64)))
    assert torch.allclose(s.K, torch.from_numpy(K).float())
    assert ds.tasks == {"seg", "depth", "normals", "corr"} and ds.classes == SCANNETPP_CLASSES
    inst = cv2.imread(str(scene_dir / "dslr" / "gt_instances" / "DSC00001.png"), -1)
    assert inst.dtype == np.uint16 and np.array_equal(inst, maps["instances"])
    (scene_dir / "dslr" / "gt_normals" / "DSC00002.png").unlink()  # an unfinished labelling
    with pytest.raises(UserError, match="DSC00002.png.*normals.*scannetpp_labels"):
        ds[2]


def test_cli_resumes_relabels_and_shards(tmp_path, monkeypatch, capsys):
    root = write_root(tmp_path / "spp", scenes=("scene0", "scene1"))
    monkeypatch.setenv("SHARD", "1/2")
    out = spl.run(config(root))
    assert list(out["scenes"]) == ["scene1"]  # every 2nd scene from index 1
    assert not (root / "data" / "scene0" / "dslr" / "gt_depth").exists()
    monkeypatch.delenv("SHARD")
    gt = root / "data" / "scene1" / "dslr" / "gt_semantics" / "DSC00002.png"
    gt.unlink()  # as if killed mid-scene
    out = spl.run(config(root))
    assert out["scenes"]["scene1"]["labelled"] == 1 and out["scenes"]["scene0"]["labelled"] == 3
    assert gt.is_file()
    out = spl.run(config(root))
    assert out["labelled"] == 0  # all done: nothing recast
    marker = json.loads((root / "data" / "scene0" / "dslr" / spl.MARKER).read_text())
    assert marker["complete"] and marker["settings"]["mapping_sha256"]
    # dropping the mapping changes the settings: every view is relabelled, books is now ignored
    (root / spl.MAPPING).unlink()
    out = spl.run(config(root))
    assert out["labelled"] == 6
    assert not list((root / "data").rglob(".*.tmp"))  # nothing half-written left behind


def test_bad_roots_are_one_line(tmp_path, capsys):
    assert spl.main([SPP, f"scenes.root={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data" in err and "kaldir" in err
    root = write_root(tmp_path / "spp", scenes=("scene0", "scene1"))
    (root / "data" / "scene1" / "scans" / "segments_anno.json").unlink()
    assert spl.main([SPP, f"scenes.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "segments_anno.json" in err and err.count("\n") == 0
    # validated before any work: scene0 (valid, first) was not labelled either
    assert not (root / "data" / "scene0" / "dslr" / "gt_depth").exists()


def test_scene_set_without_labels_names_the_command(tmp_path):
    root = write_root(tmp_path / "spp")
    with pytest.raises(UserError, match="gt_depth.*scannetpp_labels"):
        open_dataset("scannetpp", root, "train")


def test_labelled_copy_leaves_the_dataset_alone(tmp_path):
    """`labels.out`: the maps go to a copy of the root whose other files link into the dataset;
    the copy reads like the dataset with labels, the dataset tree gets nothing."""
    root = write_root(tmp_path / "spp")
    copy = tmp_path / "labelled"
    out = spl.run(config(root, f"labels.out={copy}"))
    assert out["labelled"] == 3 and out["root"] == copy
    assert not list(root.rglob("gt_*")) and not list(root.rglob(spl.MARKER))
    dslr = copy / "data" / "scene0" / "dslr"
    assert (dslr / "undistorted_images").is_symlink() and (copy / "splits").is_symlink()
    assert (copy / "data" / "scene0" / "scans").is_symlink()
    assert not (dslr / "gt_depth").is_symlink() and len(list((dslr / "gt_depth").iterdir())) == 3
    # the copy reads as a labelled dataset; its maps are the render of the source mesh
    ds = open_dataset("scannetpp", copy, "train", resolution=1.0)
    assert ds.tasks == {"seg", "depth", "normals", "corr"}
    scan = spl.read_scan(root / "data" / "scene0", SCANNETPP_CLASSES, None)
    want = spl.Caster(scan).render(K, CAMERAS[2], W, H)
    assert torch.equal(ds[2].seg, torch.from_numpy(want["semantics"].astype(np.int64)))
    assert spl.run(config(root, f"labels.out={copy}"))["labelled"] == 0  # resumes in the copy
    # a copy of another dataset is refused, nothing is written into it
    other = write_root(tmp_path / "other")
    with pytest.raises(UserError, match="another dataset"):
        spl.run(config(other, f"labels.out={copy}"))
    with pytest.raises(UserError, match="inside"):
        spl.run(config(root, f"labels.out={root / 'data' / 'x'}"))
    # a copy inside the root (not in data/) does not link itself
    inner = spl.run(config(root, f"labels.out={root / 'labelled'}"))
    assert inner["labelled"] == 3 and not (root / "labelled" / "labelled").exists()


def test_foreign_labels_are_not_overwritten(tmp_path, capsys):
    """gt_* maps no labelling run wrote (no marker) stop the run before any work."""
    root = write_root(tmp_path / "spp")
    dslr = root / "data" / "scene0" / "dslr"
    (dslr / "gt_depth").mkdir()
    (dslr / "gt_depth" / "DSC00000.png").write_bytes(b"theirs")
    assert spl.main([SPP, f"scenes.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gt_depth" in err and "labels.out" in err
    assert (dslr / "gt_depth" / "DSC00000.png").read_bytes() == b"theirs"
    assert not (dslr / "gt_semantics").exists()


# --- the demo room: labels from its scan against the generator's exact maps ------------------
DEMO = {"demo_train": 1, "demo_val": 0, "demo_views": 6, "demo_width": 96, "demo_height": 64}
DEMO |= {"demo_probe": 0, "demo_test": 0}
"""One small room (the default room is 336x224 with 40 views), no probe or test rooms."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_room_labels_agree_with_generator(tmp_path, capsys):
    """The demo generator writes each room as a ScanNet++ scan; labels rendered from that mesh
    (class list from the root's classes.json) agree with the generator's own maps: median relative
    depth error < 1e-3, >= 99% equal semantic ids away from object edges, normals median < 1 deg."""
    root, copy = tmp_path / "demo", tmp_path / "labelled"
    overrides = [f"scenes.root={root}", *(f"scenes.{k}={v}" for k, v in DEMO.items())]
    generate_demo_set(load_config(["demo"], overrides))
    theirs = {p: _sha(p) for p in sorted((root / "data").rglob("gt_*/*.png"))}
    assert len(theirs) == 4 * DEMO["demo_views"]
    with pytest.raises(UserError, match="demo generator.*labels.out"):  # in place would clobber
        spl.run(load_config(["demo"], overrides))
    t0 = time.perf_counter()
    out = spl.run(load_config(["demo"], [*overrides, f"labels.out={copy}"]))
    wall = time.perf_counter() - t0
    assert out["labelled"] == DEMO["demo_views"]
    assert {p: _sha(p) for p in theirs} == theirs  # the generator's maps are untouched
    marker = json.loads((copy / "data" / "demo_000" / "dslr" / spl.MARKER).read_text())
    demo_sha = hashlib.sha256("\n".join(DEMO_CLASSES).encode()).hexdigest()
    assert marker["settings"]["classes_sha256"] == demo_sha  # classes.json, not the 100 classes

    ref, got = open_scene(root, "demo_000"), open_scene(copy, "demo_000")
    views, h, w = range(len(ref)), DEMO["demo_height"], DEMO["demo_width"]
    maps = {  # every view stacked into one tall map (the files, as the readers decode them)
        kind: np.concatenate([getattr(got, f"load_{kind}")(i).numpy() for i in views])
        for kind in ("depth", "normals", "semantics", "instances")
    }
    want = {k: np.concatenate([getattr(ref, f"load_{k}")(i).numpy() for i in views]) for k in maps}
    fig = spl.agreement(
        maps, want["depth"], want["normals"], want["semantics"], edges_of=want["instances"]
    )
    # the same against the float maps before PNG rounding (the files agree to the millimetre)
    scan = spl.read_scan(root / "data" / "demo_000", tuple(DEMO_CLASSES), None)
    caster = spl.Caster(scan)
    renders = [
        caster.render(got.K(i).double().numpy(), got.viewmat(i).double().numpy(), w, h)
        for i in views
    ]
    floats = {k: np.concatenate([r[k] for r in renders]) for k in maps}
    raw = spl.agreement(
        floats, want["depth"], want["normals"], want["semantics"], edges_of=want["instances"]
    )
    away = spl.interior(want["instances"])  # the pixels `agreement` compares
    away &= (maps["depth"] > 0) & (want["depth"] > 0)
    inst = float((maps["instances"] == want["instances"])[away].mean())
    with capsys.disabled():
        print(
            f"\ndemo room {w}x{h}, {len(ref)} views, labels from its mesh vs the generator's maps "
            f"({fig['pixels']} pixels away from object edges): depth rel. error median "
            f"{fig['depth_rel_median']:.2e}, semantic agreement {fig['semantic_agreement']:.4f}, "
            f"normals median {fig['normals_median_deg']:.3f} deg; instance agreement {inst:.4f}; "
            f"before PNG rounding: depth {raw['depth_rel_median']:.2e}, semantic "
            f"{raw['semantic_agreement']:.4f}, normals {raw['normals_median_deg']:.3f} deg; "
            f"labelling {out['views_per_second']:.1f} views/s ({wall:.2f} s wall for the run, "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
        )
    assert fig["pixels"] > 0.7 * len(ref) * h * w  # the comparison covers most of each view
    assert fig["depth_rel_median"] < 1e-3
    assert fig["semantic_agreement"] >= 0.99
    assert fig["normals_median_deg"] < 1.0
    assert raw["depth_rel_median"] < 1e-3 and raw["normals_median_deg"] < 1.0
    assert raw["semantic_agreement"] >= 0.99
    assert inst >= 0.99  # objectId = the generator's instance id
    # the labelled copy is a demo set the evaluator reads, classes from the linked classes.json
    ds = open_dataset("demo", copy, "train")
    assert ds.classes == tuple(DEMO_CLASSES) and ds.tasks == {"seg", "depth", "normals", "corr"}


def test_evaluation_on_mesh_labels_runs_every_probe(tmp_path):
    """Acceptance: a ScanNet++ tree that ships only meshes, labelled by this module, is evaluated
    with the scannetpp preset and no probe is skipped (fast protocol, tiny random ViT)."""
    from fit3d.eval.run import run as evaluate

    root = write_root(tmp_path / "spp", scenes=("scene0", "scene1"))
    assert spl.run(config(root))["labelled"] == 6
    cfg = config(
        root, "scenes.resolution=1.0", "backbone.name=test_tiny", f"run.out={tmp_path / 'out'}",
        "eval.finetune_run=", "eval.protocol=fast", "eval.head=linear", "eval.seeds=[0]",
        "eval.lrs=[0.01]", "eval.epochs=1", "eval.num_workers=0", "eval.pairs_per_scene=2",
        "eval.min_overlap=0.05", "eval.pca_views=1",
    )  # fmt: skip
    res = evaluate(cfg)
    m = res["metrics"]["original"]
    for key in ("eval/seg/miou", "eval/depth/rmse", "eval/normals/within_30",
                "eval/corr/recall_10px"):  # fmt: skip
        assert key in m and m[key]["mean"] is not None, (key, res.get("notes"))
