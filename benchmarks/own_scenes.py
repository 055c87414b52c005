"""Own scenes from photos alone: does `scenes.name=images` recover a demo room's cameras, and does
lifting from them do as well as lifting from the true ones?

For each of `--rooms` generated demo rooms (the demo preset's 40 views at 336x224; room k is the
one room of the demo set of seed `--seed` + k):

1. Only the room's JPEGs are copied into a photo folder (poses, intrinsics and sparse points are
   withheld) and prepared with `python -m fit3d.scenes.own --preset images` (pycolmap SIFT,
   exhaustive matching, incremental mapping, undistortion), timed.
2. Poses: every view must register. The recovered camera centres are aligned to the true ones by
   the least-squares similarity (`pycolmap.estimate_sim3d`); the report gives the median and max
   rotation error (degrees, the angle of R_est R_align^T R_true^T) and the median and max
   camera-centre error as a fraction of the scene extent (stage 1's: 1.1 x the largest distance
   of a true camera centre from their mean). Acceptance: median < 1 deg and < 2 %.
3. Lifting, with the demo preset's schedule and backbone (stage 1 as `make lift` runs it), three
   times; all three hold out the same views (every 8th by name), so their held-out PSNR and
   decoded-feature cosine compare directly:
   - `recovered`: the prepared scene (recovered cameras, SfM sparse points);
   - `true`: the true cameras (poses and intrinsics) with the same SfM points, carried into the
     true frame by the similarity: only the cameras differ from `recovered`;
   - `generated`: the room as generated (true cameras, and the generator's ~20k sparse points
     back-projected from exact depth: a denser start than any SfM gives).
   Acceptance: recovered PSNR >= true PSNR - 1 dB.

    python benchmarks/own_scenes.py [--rooms 1] [--seed 7] [--views 40 --width 336 --height 224]
        [--poses-only] [--out-dir outputs/bench/own_scenes]
        [key=value ...]   (overrides for the lifts, e.g. lift.steps=100 backbone.name=test_tiny)

Prints one line per room and the means; writes outputs/bench/own_scenes.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pycolmap
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.config import Config, load_config  # noqa: E402
from fit3d.io import write_json  # noqa: E402
from fit3d.lift.model import scene_extent  # noqa: E402
from fit3d.runs import benchmark_output  # noqa: E402
from fit3d.scenes import Scene, open_scene  # noqa: E402
from fit3d.scenes.demo import generate_demo  # noqa: E402
from fit3d.scenes.own import prepare  # noqa: E402
from fit3d.scenes.own.layout import Capture, PosedView, camera, write_capture  # noqa: E402
from fit3d.scenes.scannetpp import IMAGE_DIR  # noqa: E402
from stage1_lift.run import run as lift  # noqa: E402


def centres(viewmats: np.ndarray) -> np.ndarray:
    """Camera centres [N, 3] of world-to-camera poses [N, 4, 4]."""
    return -np.einsum("nji,nj->ni", viewmats[:, :3, :3], viewmats[:, :3, 3])


def similarity(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[3, 4] = [s R | t]: the similarity that best maps est's camera centres onto true's."""
    return pycolmap.estimate_sim3d(centres(est), centres(true)).matrix()


def pose_errors(est: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Rotation (deg) and centre errors (fraction of the true extent) of world-to-camera poses
    est [N, 4, 4] after the similarity that best maps their centres onto true [N, 4, 4]'s."""
    m = similarity(est, true)
    rot = m[:, :3] / np.cbrt(np.linalg.det(m[:, :3]))
    centre = np.linalg.norm(centres(est) @ m[:, :3].T + m[:, 3] - centres(true), axis=1)
    rel = est[:, :3, :3] @ rot.T @ true[:, :3, :3].transpose(0, 2, 1)  # [N, 3, 3]
    cos = (np.trace(rel, axis1=1, axis2=2) - 1) / 2
    deg = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    extent = scene_extent(torch.from_numpy(true).float())
    return {
        "rot_median_deg": float(np.median(deg)),
        "rot_max_deg": float(deg.max()),
        "centre_median_frac": float(np.median(centre) / extent),
        "centre_max_frac": float(centre.max() / extent),
        "extent": float(extent),
    }


def lift_metrics(cfg: Config) -> dict[str, float]:
    """Lift the config's train split (one room) and return its held-out metrics."""
    summary = lift(cfg)
    (scene,) = summary["scenes"].values()
    if scene["status"] != "done":
        raise SystemExit(f"lift failed: {scene}")
    return {k: scene[k] for k in ("psnr", "feat_l1", "feat_cos", "seconds")}


def true_cameras_scene(est: Scene, true: Scene, photos: Path, root: Path) -> Path:
    """A scene set at `root` with `est`'s images and sparse points (carried into the true frame)
    and `true`'s cameras, listed in the train split; returns `root`."""
    names = [est.image_name(i) for i in range(len(est))]
    true_index = [true.index(n) for n in names]
    true_vm = np.stack([true.viewmat(j).double().numpy() for j in true_index])
    m = similarity(est.cameras()[0].double().numpy(), true_vm)
    views = []
    for name, j in zip(names, true_index, strict=True):
        K = true.K(j).double().numpy()
        cam = camera("PINHOLE", true.width(j), true.height(j), [K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
        views.append(PosedView(name, photos / name, cam, true.viewmat(j).double().numpy()))
    xyz, rgb = est.points()  # [P, 3] each
    xyz = xyz.double().numpy() @ m[:, :3].T + m[:, 3]
    capture = Capture(views, xyz, rgb.double().numpy())
    write_capture(capture, root / "data" / est.scene_id, 0, 8, {"source": "control"}, False)
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "nvs_sem_train.txt").write_text(est.scene_id + "\n")
    return root


def room(k: int, args: argparse.Namespace, out: Path) -> dict:
    """Generate room k, pose it from its images, lift it three ways; its figures."""
    seed = args.seed + k
    demo_root = out / f"room{k}" / "demo"
    size = {"n_views": args.views, "width": args.width, "height": args.height}
    generate_demo(demo_root, seed=seed, n_train=1, n_val=0, workers=1, **size)
    true_scene = open_scene(demo_root, "demo_000")
    photos = out / f"room{k}" / "photos" / f"room{k}"
    photos.mkdir(parents=True, exist_ok=True)
    for src in sorted((true_scene.dslr_dir / IMAGE_DIR).iterdir()):
        shutil.copy2(src, photos / src.name)
    common = [f"run.out={out / f'room{k}' / 'outputs'}", *args.overrides]
    own_cfg = load_config(["demo", "images"], [f"scenes.root={photos}", *common])
    t0 = time.perf_counter()
    prepared = prepare(own_cfg, verbose=False)
    sfm_seconds = time.perf_counter() - t0
    est_scene = open_scene(prepared, photos.name)
    names = [est_scene.image_name(i) for i in range(len(est_scene))]
    true_names = [true_scene.image_name(i) for i in range(len(true_scene))]
    registered = len(names)
    true_vm = np.stack([true_scene.viewmat(true_names.index(n)).double().numpy() for n in names])
    est_vm = est_scene.cameras()[0].double().numpy()
    errors = pose_errors(est_vm, true_vm)
    same_test = [names[i] for i in est_scene.test_views] == [
        true_names[i] for i in true_scene.test_views
    ]
    generated_cfg = load_config(
        ["demo"],
        [
            f"scenes.root={demo_root}",
            "scenes.demo_train=1",
            "scenes.demo_val=0",
            f"scenes.demo_seed={seed}",
            f"scenes.demo_views={args.views}",
            f"scenes.demo_width={args.width}",
            f"scenes.demo_height={args.height}",
            "run.name=generated",
            *common,
        ],
    )
    control = true_cameras_scene(est_scene, true_scene, photos, out / f"room{k}" / "true_cameras")
    true_cfg = load_config(
        ["demo"],
        [
            "scenes.name=scannetpp",
            f"scenes.root={control}",
            "scenes.resolution=1.0",
            "run.name=true_cameras",
            *common,
        ],
    )
    if args.poses_only:
        own_lift = true_lift = generated_lift = {"psnr": float("nan"), "feat_cos": float("nan")}
    else:
        own_lift = lift_metrics(replace(own_cfg, run=replace(own_cfg.run, name="recovered")))
        true_lift = lift_metrics(true_cfg)
        generated_lift = lift_metrics(generated_cfg)
    return {
        "demo_seed": seed,
        "views": len(true_names),
        "registered": registered,
        "sfm_seconds": round(sfm_seconds, 1),
        "same_test_views": same_test,
        **errors,
        "recovered": own_lift,
        "true": true_lift,
        "generated": generated_lift,
        "psnr_diff_db": own_lift["psnr"] - true_lift["psnr"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7, help="room k: the demo set of seed + k")
    parser.add_argument("--views", type=int, default=40, help="views per room (demo: 40)")
    parser.add_argument("--width", type=int, default=336, help="image width (demo: 336)")
    parser.add_argument("--height", type=int, default=224, help="image height (demo: 224)")
    parser.add_argument("--poses-only", action="store_true", help="pose the rooms, lift none")
    parser.add_argument("--out-dir", default="outputs/bench/own_scenes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()
    rows = []
    head = (
        f"{'room':<6}{'reg':>7}{'SfM s':>7}{'rot med/max deg':>17}{'centre med/max %':>18}"
        f"  PSNR: recovered / true cameras (diff) / generated   cos: recovered / true / generated"
    )
    print(head)
    for k in range(args.rooms):
        r = room(k, args, out)
        rows.append(r)
        print(
            f"{k:<6}{r['registered']:>3}/{r['views']:<3}{r['sfm_seconds']:>7.1f}"
            f"{r['rot_median_deg']:>9.3f}/{r['rot_max_deg']:<7.3f}"
            f"{100 * r['centre_median_frac']:>9.3f}/{100 * r['centre_max_frac']:<8.3f}"
            f"{r['recovered']['psnr']:>14.2f} / {r['true']['psnr']:.2f} ({r['psnr_diff_db']:+.2f})"
            f" / {r['generated']['psnr']:.2f}{r['recovered']['feat_cos']:>21.3f} / "
            f"{r['true']['feat_cos']:.3f} / {r['generated']['feat_cos']:.3f}",
            flush=True,
        )

    def mean(key, sub=None):
        return statistics.fmean(r[key] if sub is None else r[key][sub] for r in rows)

    summary = {
        "rooms": rows,
        "all_registered": all(r["registered"] == r["views"] for r in rows),
        "rot_median_deg": mean("rot_median_deg"),
        "centre_median_frac": mean("centre_median_frac"),
        "psnr_recovered": mean("recovered", "psnr"),
        "psnr_true": mean("true", "psnr"),
        "psnr_generated": mean("generated", "psnr"),
        "psnr_diff_db": mean("psnr_diff_db"),
        "config_overrides": args.overrides,
    }
    ok = (
        summary["all_registered"]
        and max(r["rot_median_deg"] for r in rows) < 1.0
        and max(r["centre_median_frac"] for r in rows) < 0.02
        and (args.poses_only or min(r["psnr_diff_db"] for r in rows) > -1.0)
    )
    summary["acceptance"] = ok
    print(
        f"mean: rotation {summary['rot_median_deg']:.3f} deg, centre "
        f"{100 * summary['centre_median_frac']:.3f} % of extent, held-out PSNR recovered "
        f"{summary['psnr_recovered']:.2f} / true cameras {summary['psnr_true']:.2f} dB "
        f"({summary['psnr_diff_db']:+.2f}; as generated {summary['psnr_generated']:.2f}); "
        f"acceptance (every view registered, median rotation < 1 deg, median centre < 2 %, "
        f"PSNR within 1 dB of the true cameras'): {'holds' if ok else 'FAILS'}"
    )
    write_json(benchmark_output("own_scenes"), summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
