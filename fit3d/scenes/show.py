"""Picture of a scene: rgb / depth / normals / semantics of a few views and a top-down map of the
sparse points and the camera path.

Run: `python -m fit3d.scenes.show SCENE_ID [--root ROOT] [--views 4] [--out PNG]`; without
`--root` the demo set (`make scenes`) is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from fit3d.errors import cli_entry
from fit3d.geometry import camera_centres
from fit3d.scenes.scannetpp import Scene, open_scene
from fit3d.viz import save_figure


def _top_down(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2D map coordinates in the plane orthogonal to the average camera up vector: camera
    centres [N, 2], forward directions [N, 2], points [P, 2] and point colours [P, 3]."""
    viewmats, _ = scene.cameras()
    R = viewmats[:, :3, :3].double()
    centres = camera_centres(viewmats.double())  # [N, 3]
    forward = R[:, 2, :]  # camera z axis in world
    up = -R[:, 1, :].mean(0)  # cameras' -y axes point up on average
    up = up / up.norm()
    a = torch.linalg.svd(torch.eye(3, dtype=up.dtype) - up[:, None] * up[None, :])[0][:, :2]
    xyz, rgb = scene.points()
    return (
        (centres @ a).numpy(),
        (forward @ a).numpy(),
        (xyz.double() @ a).numpy(),
        rgb.numpy(),
    )


def show_scene(scene: Scene, out: Path, n_views: int = 4) -> Path:
    """Write the mosaic PNG for `scene` to `out`."""
    idx = np.linspace(0, len(scene) - 1, min(n_views, len(scene))).round().astype(int)
    fig = Figure(figsize=(4 * 2.6 + 4.5, len(idx) * 1.9 + 0.4), dpi=100)
    grid = fig.add_gridspec(len(idx), 5, width_ratios=[1, 1, 1, 1, 1.7])
    n_cls = max(len(scene.classes or []), 20)
    for row, i in enumerate(idx):
        panels = [("rgb", scene.load_image(i).numpy(), {})]
        depth = scene.load_depth(i)
        if depth is not None:
            panels.append(("depth (m)", depth.numpy(), {"cmap": "turbo", "vmin": 0}))
        normals = scene.load_normals(i)
        if normals is not None:
            panels.append(("normals (camera)", (normals.numpy() + 1) / 2, {}))
        sem = scene.load_semantics(i)
        if sem is not None:
            sem = np.ma.masked_equal(sem.numpy(), 255)
            panels.append(("semantics", sem, {"cmap": "tab20", "vmin": 0, "vmax": n_cls}))
        for col, (title, img, kw) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(img, interpolation="nearest", **kw)
            ax.set_axis_off()
            ax.set_title(f"{scene.image_name(i)} {title}" if col == 0 else title, fontsize=7)
    ax = fig.add_subplot(grid[:, 4])
    cams, fwd, pts, cols = _top_down(scene)
    if len(pts):
        ax.scatter(pts[:, 0], pts[:, 1], c=cols, s=1, linewidths=0)
    ax.plot(cams[:, 0], cams[:, 1], "-", color="0.3", lw=0.8)
    test = set(scene.test_views)
    for i, (c, f) in enumerate(zip(cams, fwd, strict=True)):
        colour = "tab:red" if i in test else "tab:blue"
        ax.arrow(c[0], c[1], 0.3 * f[0], 0.3 * f[1], color=colour, head_width=0.06, lw=0.6)
    ax.scatter(cams[idx, 0], cams[idx, 1], s=25, facecolors="none", edgecolors="k", lw=0.8)
    ax.set_aspect("equal")
    ax.set_title(f"{scene.scene_id}: top-down, {len(scene)} views (red = test)", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    save_figure(fig, out)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from fit3d.cli import show_args
    from fit3d.config import load_config
    from fit3d.runs import scenes_picture
    from fit3d.scenes import scenes_root

    args = show_args(argv, __doc__)
    root = args.root or scenes_root(load_config(["demo"]))
    scene = open_scene(root, args.scene, args.resolution)
    out = Path(args.out) if args.out else scenes_picture(args.scene)
    print(show_scene(scene, out, args.views))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
