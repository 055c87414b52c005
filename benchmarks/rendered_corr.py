"""How good are dense correspondences from the lifted Gaussians' rendered depth?

For every scene of a finished stage-1 run, view pairs are picked with `geometry.select_pairs`
(ground-truth depth, covisibility >= --min-overlap, spread over the rotation bins) among the
scene's test views (held out from lifting), its train views, or all views. For each pair (a, b):

- rendered: `render_depth` of both views at --scale (K' = diag(sx, sy, 1) K), then
  `dense_correspondences` a -> b;
- reference: the ground-truth depth brought to the same w x h grid and K' by `resize_depth` (the
  full-res pixel under each low-res pixel centre: no blending, and no min-pooling, which would
  give background pixels next to an edge the foreground's depth and so lift them to points that
  are on no surface), then `dense_correspondences` a -> b with the same settings.

A rendered correspondence is correct when its a pixel has a reference one and the two b locations
are within --radius pixels of the low-res grid (1 px at scale 0.25 = 4 full-res px). Pooled
numbers are micro-averages: precision = correct / predicted, recall = correct / reference, summed
over pairs; the median error is over all rendered correspondences that have a reference one;
"no ref" is the share of rendered correspondences whose a pixel has no reference one (the
rendered depth calls visible what the ground truth calls occluded, outside or invalid).

    python benchmarks/rendered_corr.py --lift outputs/lift/<run> [--pairs 10] [--scale 0.25]
        [--radius 1.0] [--views test train] [--min-overlap 0.3] [--seed 0]

Prints markdown tables per view set: per scene and pooled, and per rotation bin (pooled).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.correspond import (  # noqa: E402
    dense_correspondences,
    match_reference,
    render_depth,
    resize_depth,
    scaled_intrinsics,
)
from fit3d.gaussians import load_lifted_scene  # noqa: E402
from fit3d.geometry import ROTATION_BINS, rotation_bin, select_pairs  # noqa: E402
from fit3d.scenes import Scene  # noqa: E402
from stage2_finetune.data import open_run_scenes, read_lift_run  # noqa: E402


@dataclass
class Tally:
    """Summed counts and the pooled errors of a group of pairs."""

    pairs: int = 0
    predicted: int = 0
    reference: int = 0
    correct: int = 0
    unmatched: int = 0
    errors: list[torch.Tensor] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.pairs += other.pairs
        self.predicted += other.predicted
        self.reference += other.reference
        self.correct += other.correct
        self.unmatched += other.unmatched
        self.errors += other.errors

    def row(self, name: str) -> str:
        prec = self.correct / self.predicted if self.predicted else float("nan")
        rec = self.correct / self.reference if self.reference else float("nan")
        err = torch.cat(self.errors) if self.errors else torch.zeros(0)
        med = float(err.median()) if len(err) else float("nan")
        no_ref = self.unmatched / self.predicted if self.predicted else float("nan")
        return (
            f"| {name} | {self.pairs} | {self.predicted} | {self.reference} | {prec:.3f} | "
            f"{rec:.3f} | {med:.3f} | {no_ref:.3f} |"
        )


HEADER = (
    "| {key} | pairs | predicted | reference | precision | recall | median err (px) | no ref |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def view_list(scene: Scene, which: str) -> list[int]:
    """Indices of the scene's test, train or all views."""
    if which == "test":
        return list(scene.test_views)
    if which == "train":
        return list(scene.train_views)
    return list(range(len(scene)))


def evaluate_scene(
    run: Path, scene_id: str, scene: Scene, which: str, args: argparse.Namespace
) -> list[tuple[int, Tally]]:
    """(rotation bin, tally) of each selected pair of one scene's `which` views."""
    loaded = [(i, scene.load_depth(i)) for i in view_list(scene, which)]
    views = [i for i, d in loaded if d is not None]
    gt = [d for _, d in loaded if d is not None]  # full-res [H, W]
    if len(views) < 2:
        return []
    Ks = [scene.K(i) for i in views]
    vms = [scene.viewmat(i) for i in views]
    pairs = select_pairs(gt, Ks, vms, args.pairs, args.min_overlap, args.seed)
    if not pairs:
        return []
    lifted = load_lifted_scene(run / scene_id)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def small(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rendered depth [h, w], ground truth [h, w], K' [3, 3]) of list entry k."""
        if k not in cache:
            i = views[k]
            width, height = scene.width(i), scene.height(i)
            rendered = render_depth(lifted, vms[k], Ks[k], width, height, args.scale)
            h, w = rendered.shape
            cache[k] = (
                rendered,
                resize_depth(gt[k], w, h),
                scaled_intrinsics(Ks[k], width, height, w, h),
            )
        return cache[k]

    out = []
    for a, b, rot in pairs:
        rend_a, gt_a, K_a = small(a)
        rend_b, gt_b, K_b = small(b)
        opts = dict(rel_tol=args.rel_tol, cycle_px=args.cycle_px)
        xy_a, xy_b = dense_correspondences(rend_a, rend_b, K_a, K_b, vms[a], vms[b], **opts)
        ref_a, ref_b = dense_correspondences(gt_a, gt_b, K_a, K_b, vms[a], vms[b], **opts)
        has_ref, err = match_reference(xy_a, xy_b, ref_a, ref_b)
        correct = int((err <= args.radius).sum())
        unmatched = int((~has_ref).sum())
        tally = Tally(1, len(xy_a), len(ref_a), correct, unmatched, [err[has_ref]])
        out.append((rotation_bin(rot), tally))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lift", required=True, type=Path, help="stage-1 run folder")
    ap.add_argument("--pairs", type=int, default=10, help="view pairs per scene and view set")
    ap.add_argument("--scale", type=float, default=0.25, help="render / grid scale")
    ap.add_argument("--radius", type=float, default=1.0, help="px of the scaled grid")
    ap.add_argument(
        "--views", nargs="+", choices=("test", "train", "all"), default=["test", "train"],
        help="view sets, each reported on its own (default: held-out test views, then train)",
    )  # fmt: skip
    ap.add_argument("--min-overlap", type=float, default=0.3)
    ap.add_argument("--rel-tol", type=float, default=0.05)
    ap.add_argument("--cycle-px", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    run = read_lift_run(args.lift)
    scenes = open_run_scenes(run)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    print(
        f"run {run.path}: {len(run.scene_ids)} scenes, scale {args.scale}, radius "
        f"{args.radius} px, rel_tol {args.rel_tol}, cycle {args.cycle_px} px"
    )
    for which in args.views:
        t0 = time.perf_counter()
        per_scene: dict[str, Tally] = {}
        per_bin = [Tally() for _ in ROTATION_BINS]
        pooled = Tally()
        items = list(zip(run.scene_ids, scenes, strict=True))
        for sid, scene in tqdm(items, desc=f"{which} views", leave=False):
            tally = Tally()
            for k, t in evaluate_scene(run.path, sid, scene, which, args):
                tally.add(t)
                per_bin[k].add(t)
            per_scene[sid] = tally
            pooled.add(tally)
        print(f"\n### {which} views ({time.perf_counter() - t0:.1f} s)\n")
        print(HEADER.format(key="scene"))
        for sid, tally in per_scene.items():
            print(tally.row(sid))
        print(pooled.row("**pooled**"))
        print()
        print(HEADER.format(key="rotation (deg)"))
        for (lo, hi), tally in zip(ROTATION_BINS, per_bin, strict=True):
            print(tally.row(f"{lo:g}-{hi:g}"))


if __name__ == "__main__":
    main()
