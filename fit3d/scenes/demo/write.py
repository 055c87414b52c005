"""Writing one generated room exactly as the ScanNet++ toolkit lays out a scene.

Under `<scene>/dslr/` (see `fit3d.scenes.scannetpp` for the layout and docs/method.md,
"ScanNet++ layout and poses"): undistorted JPG images and all-valid masks, the nerfstudio json
(camera-to-world in OpenGL axes and ScanNet++'s permuted world frame, so the reader's conversion
applies unchanged), `train_test_lists.json` (every 8th view held out), a complete COLMAP text
model whose sparse points are back-projected from the train views' exact depth (like SfM, on
surfaces only), and the exact ground truth in `gt_{depth,normals,semantics,instances}/`.

Under `<scene>/scans/`, the room as a laser scan in the release's formats, in the COLMAP world
frame of the poses (as the release aligns its DSLR poses to its scans):

- `mesh_aligned_0.05.ply`: binary little-endian PLY, vertices `float x, y, z` and
  `uchar red, green, blue`, faces `list uchar int vertex_indices` (see `mesh` for the geometry).
- `segments.json`: `{"sceneId", "segIndices"}` with one segment per vertex, `segIndices[v] = v`:
  the current release annotates vertices directly and ships exactly this identity over-segmentation
  (github.com/scannetpp/scannetpp issue 48), so readers that look vertices up through
  `segIndices` and readers that take `segments` as vertex ids agree.
- `segments_anno.json`: `{"sceneId": "scannetpp.<id>", "appId", "annId", "segGroups"}`, one group
  per instance: `id` = `objectId` = the instance id of `gt_instances/`, `label` = its class name
  in `CLASSES`, `segments` = its vertices, `obb` = its axis-aligned bounding box as `centroid`,
  `axesLengths`, `normalizedAxes` (identity, row-major), `min`, `max`.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from fit3d.io import atomic_path, write_json
from fit3d.scenes.demo.camera import camera_path, demo_K
from fit3d.scenes.demo.layout import CLASSES, build_room
from fit3d.scenes.demo.mesh import RoomMesh, room_mesh
from fit3d.scenes.demo.raycast import RoomTensors, render_view
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

SCAN_DIR = "scans"
MESH_FILE = "mesh_aligned_0.05.ply"
SEGMENTS_FILE = "segments.json"
ANNOTATION_FILE = "segments_anno.json"


def write_colmap(dst: Path, names, viewmats, K, width, height, xyz, rgb) -> None:
    """A complete COLMAP text model: one PINHOLE camera, posed images (world-to-camera, wxyz
    quaternions), coloured points xyz [P, 3] with rgb [P, 3] in [0, 1]."""
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


def generate_room(
    scene_dir: Path,
    seed: int,
    n_views: int,
    width: int,
    height: int,
    test_every: int = 8,
    points_per_view: int = 600,
    poses: list[int] | None = None,
) -> None:
    """Generate one room (all its random draws come from `seed`) under `scene_dir`: its DSLR
    capture in `dslr/`, then its scan in `scans/`. The camera films an `n_views`-pose loop, of
    which `poses` (default: all) are rendered, named by their pose index; pose i is a test view
    when i % test_every == test_every - 1."""
    rng = np.random.default_rng(seed)
    K = demo_K(width, height)
    room = build_room(rng, footprint=1.8 / K[0, 0])  # pixel size at 1.8 m
    T = RoomTensors(room)
    loop = camera_path(room, n_views, rng)
    poses = list(range(n_views)) if poses is None else list(poses)
    viewmats = [loop[i] for i in poses]
    n_views = len(poses)
    dslr = scene_dir / "dslr"
    names = [f"DSC{i:05d}.JPG" for i in poses]
    for sub in (IMAGE_DIR, MASK_DIR, *GT_DIRS.values(), "nerfstudio"):
        (dslr / sub).mkdir(parents=True, exist_ok=True)
    mask = np.full((height, width), 255, np.uint8)
    test = {k for k, i in enumerate(poses) if i % test_every == test_every - 1}
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
    write_colmap(dslr / COLMAP_DIR, names, viewmats, K, width, height, xyz[keep], rgb_pts[keep])

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
    write_scan(scene_dir / SCAN_DIR, room_mesh(room, T), scene_dir.name)


def write_ply(path: Path, vertices: np.ndarray, colors: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY of a triangle mesh: vertices [V, 3], uint8 colors [V, 3],
    faces [F, 3] (written atomically)."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    )
    vert = np.empty(len(vertices), np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)]))
    vert["xyz"], vert["rgb"] = vertices, colors
    face = np.empty(len(faces), np.dtype([("n", "u1"), ("idx", "<i4", 3)]))
    face["n"], face["idx"] = 3, faces
    with atomic_path(path) as tmp:
        tmp.write_bytes(header.encode("ascii") + vert.tobytes() + face.tobytes())


def _write_compact_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:  # one line, like the release (these lists are long)
        tmp.write_text(json.dumps(obj))


def write_scan(scan_dir: Path, mesh: RoomMesh, scene_id: str) -> None:
    """The mesh, its per-vertex segments and their annotation (formats: module docstring)."""
    order = np.argsort(mesh.inst, kind="stable")
    ids, starts = np.unique(mesh.inst[order], return_index=True)
    groups = []
    for inst, vids in zip(ids.tolist(), np.split(order, starts[1:]), strict=True):
        labels = np.unique(mesh.cls[vids])
        if len(labels) != 1:  # the layout gives every instance one class
            raise ValueError(f"instance {inst} has classes {labels.tolist()}")
        xyz = mesh.vertices[vids].astype(np.float64)
        lo, hi = xyz.min(0), xyz.max(0)
        obb = {
            "centroid": ((lo + hi) / 2).round(6).tolist(),
            "axesLengths": (hi - lo).round(6).tolist(),
            "normalizedAxes": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "min": lo.round(6).tolist(),
            "max": hi.round(6).tolist(),
        }
        label = CLASSES[int(labels[0])]
        segs = np.sort(vids).tolist()
        groups.append({"id": inst, "objectId": inst, "label": label, "segments": segs, "obb": obb})
    write_ply(scan_dir / MESH_FILE, mesh.vertices, mesh.colors, mesh.faces)
    segments = {"sceneId": scene_id, "segIndices": list(range(len(mesh.vertices)))}
    _write_compact_json(scan_dir / SEGMENTS_FILE, segments)
    anno = {
        "sceneId": f"scannetpp.{scene_id}",
        "appId": "fit3d.scenes.demo",
        "annId": "generated",
        "segGroups": groups,
    }
    _write_compact_json(scan_dir / ANNOTATION_FILE, anno)
