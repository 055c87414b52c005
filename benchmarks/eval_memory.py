"""Peak memory of the evaluator on 50 and 500 generated views: it must not grow with the views.

Each size runs in a fresh process: a generated `EvalSet` (random smooth images with
segmentation, depth and normals, produced on the fly, registered like any dataset) goes through
the real path, `fit3d.eval.run.run` with `eval.dataset=synthetic`: ground truth checked and stored,
features extracted into the on-disk cache, the segmentation and depth probes trained and scored
streaming from it. Prints the peak resident set (ru_maxrss) of both and their ratio (bar: 1.3)
and writes them to `outputs/bench/eval_memory.json`.

    python benchmarks/eval_memory.py [--views 50 500] [--size 448 672] [--backbone test_tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from fit3d.datasets.base import EvalSet, Sample, ViewInfo

CLASSES = tuple(f"class{k}" for k in range(8))


class SyntheticSet(EvalSet):
    """`views` generated views of `height` x `width` (options come from the environment, since
    `open_dataset` passes no options to this name); view i depends only on (split, i)."""

    name = "synthetic"
    tasks = frozenset({"seg", "depth", "normals"})
    classes = CLASSES
    max_depth = 10.0

    def __init__(self, root, split: str):
        self.split = split
        self.views = int(os.environ["FIT3D_BENCH_VIEWS"])
        self.height, self.width = (int(v) for v in os.environ["FIT3D_BENCH_SIZE"].split("x"))
        self.root = Path(root)

    def __len__(self) -> int:
        return self.views

    def info(self, i: int) -> ViewInfo:
        return ViewInfo(f"{self.split}/{i:05d}", f"g{i // 10}", self.height, self.width)

    def _load(self, i: int) -> Sample:
        gen = torch.Generator().manual_seed(i * 2 + (self.split == "val"))
        low = torch.rand(1, 4, self.height // 32, self.width // 32, generator=gen)
        field = torch.nn.functional.interpolate(low, size=(self.height, self.width),
                                                mode="bilinear")[0]  # fmt: skip
        image = field[:3].permute(1, 2, 0).contiguous()  # [H, W, 3] smooth random colours
        seg = (field[3] * len(CLASSES)).long().clamp(max=len(CLASSES) - 1)
        depth = 1.0 + 8.0 * field[0]
        normals = torch.nn.functional.normalize(field[:3].permute(1, 2, 0) - 0.5, dim=-1)
        return Sample(self.info(i).key, image, seg, depth, normals, group=self.info(i).group)


def child(views: int, size: tuple[int, int], backbone: str, out: Path) -> dict:
    """One evaluator run on `views` generated views per split; returns its figures."""
    from fit3d.config import load_config
    from fit3d.datasets import DATASETS
    from fit3d.eval.run import run

    os.environ["FIT3D_BENCH_VIEWS"] = str(views)
    os.environ["FIT3D_BENCH_SIZE"] = f"{size[0]}x{size[1]}"
    module = types.ModuleType("fit3d.datasets._bench_synthetic")
    module.SyntheticSet = SyntheticSet
    sys.modules[module.__name__] = module
    DATASETS["synthetic"] = ("_bench_synthetic", "SyntheticSet")
    cfg = load_config(
        [],
        [
            f"backbone.name={backbone}",
            f"run.out={out}",
            "run.device=cpu",
            "eval.dataset=synthetic",
            f"eval.dataset_root={out}",
            "eval.finetune_run=",
            "eval.feature_sets=[original]",
            "eval.probes=[seg,depth]",
            "eval.seeds=[0]",
            "eval.lrs=[0.01]",
            "eval.epochs=1",
            "eval.label_stride=4",
            "eval.pca_views=0",
        ],
    )
    t0 = time.time()
    results = run(cfg)
    return {
        "views_per_split": views,
        "image_size": list(size),
        "backbone": backbone,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(time.time() - t0, 1),
        "miou": results["metrics"]["original"]["eval/seg/miou"]["mean"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--size", type=int, nargs=2, default=[448, 672], metavar=("H", "W"))
    parser.add_argument("--backbone", default="test_tiny")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fig = child(args.child, tuple(args.size), args.backbone, Path(args.out))
        print("FIGURES " + json.dumps(fig), flush=True)
        return 0
    figures = []
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for n in args.views:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--child", str(n), "--out", tmp, "--backbone",
                   args.backbone, "--size", *map(str, args.size)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FIGURES "))
            figures.append(json.loads(line.removeprefix("FIGURES ")))
            f = figures[-1]
            print(f"{n:5d} views per split: peak RSS {f['peak_rss_mb']:.0f} MB "
                  f"({f['seconds']:.0f} s)", flush=True)  # fmt: skip
    ratio = figures[-1]["peak_rss_mb"] / figures[0]["peak_rss_mb"]
    labels_mb = np.prod(args.size) * (1 + 4 + 6) * max(args.views) * 2 / 2**20
    print(f"peak RSS ratio {max(args.views)} / {min(args.views)} views: {ratio:.2f} (bar 1.3); "
          f"their labels alone would take {labels_mb:.0f} MB held in memory")  # fmt: skip
    from fit3d.io import write_json
    from fit3d.runs import benchmark_output

    write_json(benchmark_output("eval_memory"), {"runs": figures, "ratio": round(ratio, 3)})
    return 0 if ratio <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
