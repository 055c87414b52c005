"""The demo room as a ScanNet++ scan: the release's file formats (read back independently) and
agreement of the mesh with the generator's exact per-view maps through the reader's poses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fit3d.scenes import open_scene
from fit3d.scenes.demo import CLASSES
from fit3d.scenes.demo.write import generate_room

W, H, N_VIEWS, SEED = 64, 48, 4, 11
HEADER = [
    "ply",
    "format binary_little_endian 1.0",
    "element vertex {V}",
    "property float x",
    "property float y",
    "property float z",
    "property uchar red",
    "property uchar green",
    "property uchar blue",
    "element face {F}",
    "property list uchar int vertex_indices",
    "end_header",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    generate_room(root / "data" / "demo_000", SEED, N_VIEWS, W, H)
    return root


def _read_ply(path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Header lines, vertices [V, 3], colours [V, 3], faces [F, 3] of the expected layout."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    n_v = int(header[2].split()[-1])
    n_f = int(header[9].split()[-1])
    vert = np.frombuffer(raw, np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)]), n_v, end)
    face = np.frombuffer(raw, np.dtype([("n", "u1"), ("i", "<i4", 3)]), n_f, end + vert.nbytes)
    assert end + vert.nbytes + face.nbytes == len(raw)  # nothing after the faces
    assert (face["n"] == 3).all()
    return header, vert["xyz"].copy(), vert["rgb"].copy(), face["i"].copy()


@pytest.fixture(scope="module")
def scan(root):
    scans = root / "data" / "demo_000" / "scans"
    header, xyz, rgb, faces = _read_ply(scans / "mesh_aligned_0.05.ply")
    segs = json.loads((scans / "segments.json").read_text())
    anno = json.loads((scans / "segments_anno.json").read_text())
    return dict(header=header, xyz=xyz, rgb=rgb, faces=faces, segs=segs, anno=anno)


def _vertex_labels(scan) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex (object id, class id) through segIndices and segGroups, as the toolkit reads
    them (-1: unannotated)."""
    seg = np.asarray(scan["segs"]["segIndices"])
    obj, cls = np.full(len(seg), -1), np.full(len(seg), -1)
    for g in scan["anno"]["segGroups"]:
        member = np.isin(seg, g["segments"])
        obj[member], cls[member] = g["objectId"], CLASSES.index(g["label"])
    return obj, cls


def _vertex_normals(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted mean of the incident triangles' normals [V, 3] (counter-clockwise winding
    seen from the visible side, as the module promises)."""
    v = xyz.astype(np.float64)[faces]  # [F, 3, 3]
    fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    acc = np.zeros((len(xyz), 3))
    for k in range(3):
        np.add.at(acc, faces[:, k], fn)
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


def test_scan_files_follow_the_release_format(scan):
    V, F = len(scan["xyz"]), len(scan["faces"])
    assert scan["header"] == [h.format(V=V, F=F) for h in HEADER]
    assert V > 1000 and F > 1000
    assert np.array_equal(np.unique(scan["faces"]), np.arange(V))  # every vertex in a triangle
    assert set(scan["segs"]) == {"sceneId", "segIndices"}
    assert scan["segs"]["segIndices"] == list(range(V))  # one segment per vertex, like the release
    anno = scan["anno"]
    assert set(anno) == {"sceneId", "appId", "annId", "segGroups"}
    assert anno["sceneId"] == "scannetpp.demo_000" and scan["segs"]["sceneId"] == "demo_000"
    members = np.concatenate([g["segments"] for g in anno["segGroups"]])
    assert np.array_equal(np.sort(members), np.arange(V))  # every vertex in exactly one group
    for g in anno["segGroups"]:
        assert g["id"] == g["objectId"] >= 1 and g["label"] in CLASSES
        lo, hi = scan["xyz"][g["segments"]].min(0), scan["xyz"][g["segments"]].max(0)
        np.testing.assert_allclose(g["obb"]["min"], lo, atol=1e-5)
        np.testing.assert_allclose(g["obb"]["axesLengths"], hi - lo, atol=1e-5)
    labels = {g["objectId"]: g["label"] for g in anno["segGroups"]}
    assert [labels[i] for i in range(1, 7)] == ["wall"] * 4 + ["floor", "ceiling"]
    assert len(set(labels.values())) >= 10
    obj, _ = _vertex_labels(scan)
    tri_obj = obj[scan["faces"]]
    assert (tri_obj == tri_obj[:, :1]).all()  # no triangle spans two objects
    assert scan["rgb"].std() > 20  # coloured, not flat


def test_ply_reads_back_with_trimesh(root, scan):
    """An independent PLY reader sees the same vertices, colours and faces."""
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.load(root / "data/demo_000/scans/mesh_aligned_0.05.ply", process=False)
    np.testing.assert_array_equal(np.asarray(m.vertices, np.float32), scan["xyz"])
    np.testing.assert_array_equal(np.asarray(m.faces), scan["faces"])
    np.testing.assert_array_equal(np.asarray(m.visual.vertex_colors)[:, :3], scan["rgb"])


def test_mesh_agrees_with_the_generator_maps(root, scan):
    """Project every mesh vertex into every view through the reader's poses. Where the vertex
    faces the camera and its object is what the generator saw at that pixel (away from object
    borders), the vertex's tangent plane reaches the generator's depth at the pixel centre (a
    mesh in another frame, even a few cm off, would not) with the generator's normal; where it
    reaches that depth, its object and class (through the annotation) are the generator's.
    The depth maps store millimetres: 1e-3 relative is about 4x their rounding at 2 m."""
    sc = open_scene(root, "demo_000")
    obj, cls = _vertex_labels(scan)
    normals = torch.from_numpy(_vertex_normals(scan["xyz"], scan["faces"]))
    xyz = torch.from_numpy(scan["xyz"]).double()
    rel_err, shell, ang, label_ok = [], [], [], []
    for i in range(len(sc)):
        vm, K = sc.viewmat(i).double(), sc.K(i).double()
        depth, inst = sc.load_depth(i).double(), sc.load_instances(i)
        sem, gt_n = sc.load_semantics(i), sc.load_normals(i).double()
        p = xyz @ vm[:3, :3].T + vm[:3, 3]  # camera frame [V, 3]
        n = normals @ vm[:3, :3].T
        u = (p[:, 0] / p[:, 2] * K[0, 0] + K[0, 2]).floor().long()
        v = (p[:, 1] / p[:, 2] * K[1, 1] + K[1, 2]).floor().long()
        ok = (p[:, 2] > 0.1) & (u >= 1) & (v >= 1) & (u < W - 1) & (v < H - 1)
        ok &= (n * p).sum(1) < 0  # faces the camera
        u, v, p, n, idx = u[ok], v[ok], p[ok], n[ok], ok.nonzero()[:, 0]
        win = torch.stack([inst[v + dv, u + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)])
        interior = (win == win[0]).all(0)
        ray = torch.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1]], 1)
        ray = torch.cat([ray, torch.ones(len(u), 1, dtype=ray.dtype)], 1)  # z = 1: t is depth
        t = (n * p).sum(1) / (n * ray).sum(1)  # the vertex's tangent plane at the pixel centre
        d, err = depth[v, u], (t - depth[v, u]).abs() / depth[v, u]
        facing = interior & (d > 0)
        v_obj, v_cls = torch.from_numpy(obj)[idx], torch.from_numpy(cls)[idx]
        seen = facing & (v_obj == inst[v, u])
        rel_err.append(err[seen])
        shell.append(err[seen & (inst[v, u] <= 6)])  # nothing of their own can hide them
        cos = (n[seen] * gt_n[v[seen], u[seen]]).sum(1).clamp(-1, 1)
        ang.append(torch.rad2deg(torch.acos(cos)))
        near = facing & (err < 0.002)  # on the surface seen there (not a rug's 1 cm below it)
        label_ok += [v_obj[near] == inst[v, u][near], v_cls[near] == sem[v, u][near]]
    rel_err, ang, label_ok = torch.cat(rel_err), torch.cat(ang), torch.cat(label_ok)
    shell = torch.cat(shell)
    print(
        f"mesh vs generator maps: {len(rel_err)} vertex views, depth rel. error median "
        f"{rel_err.median():.1e} (walls/floor/ceiling max {shell.max():.1e}), normals median "
        f"{ang.median():.3f} deg, labels equal {label_ok.float().mean():.4f}"
    )
    assert len(rel_err) > 2000
    assert rel_err.median() < 1e-3  # parts of one object may hide each other: a median
    assert len(shell) > 1000 and shell.max() < 1e-3  # walls, floor, ceiling: everywhere
    assert ang.median() < 0.5
    assert label_ok.float().mean() > 0.99
