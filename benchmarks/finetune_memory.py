"""Stage-2 data memory against the number of scenes: peak RSS of one epoch of the training loader.

Synthetic stage-1 runs (`stage2_finetune.synthetic`: random Gaussians over tiny ScanNet++-layout
scenes) of 10 and 100 scenes, `--gaussians` each. For each, a fresh subprocess runs one epoch of
`FinetuneDataModule`'s training loader (every train view rendered through `TargetStore` windows of
`--window` samples, then read back) and reports its peak RSS; a second subprocess holds every
lifted scene in memory at once, as FiT3D did, for reference. Ours should stay flat; the reference
grows with the scenes.

    python benchmarks/finetune_memory.py [--scenes 10 100] [--gaussians 30000] [--window 64]

Prints a table and writes outputs/bench/finetune_memory.json.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.io import write_json  # noqa: E402
from fit3d.runs import benchmark_output  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(mode: str, lift_run: str, window: int) -> dict:
    """One measurement in this (fresh) process: `ours` = one loader epoch, `resident` = all
    lifted scenes loaded at once."""
    import torch

    from fit3d.gaussians import load_lifted_scene
    from stage2_finetune.data import FinetuneDataModule, read_lift_run

    torch.set_num_threads(1)
    run = read_lift_run(lift_run)
    start = time.perf_counter()
    if mode == "resident":
        scenes = [load_lifted_scene(run.path / sid) for sid in run.scene_ids]
        return {"rss_mb": _peak_rss_mb(), "scenes_in_memory": len(scenes)}
    data = FinetuneDataModule(run, lambda h, w: (h // 14, w // 14), batch_size=2, window=window)
    batches = sum(1 for _ in data.train_dataloader())
    store = data.stores[0]
    result = {
        "rss_mb": _peak_rss_mb(),
        "views": len(data.train_pairs),
        "batches": batches,
        "scene_loads": store.loads,
        "rendered": store.rendered,
        "seconds": time.perf_counter() - start,
    }
    data.teardown("fit")
    return result


def make_runs(root: Path, counts: list[int], gaussians: int, views: int) -> dict[int, Path]:
    """One scene set of max(counts) scenes and, per count, a lift run of its first `count`."""
    from stage2_finetune.synthetic import write_lift_run, write_scenes

    n = max(counts)
    ids = [f"scene_{i:03d}" for i in range(n)]
    write_scenes(root / "scenes", ids, n_views=views, test_every=4)
    write_lift_run(root / "lifted", root / "scenes", ids, C=384, D=64, N=gaussians)
    runs = {}
    for count in counts:
        run = root / "lift" / f"n{count}"
        run.mkdir(parents=True)
        for sid in ids[:count]:
            (run / sid).symlink_to(root / "lifted" / sid)
        runs[count] = run
    return runs


def measure(mode: str, run: Path, window: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from finetune_memory import child; "
        f"print(json.dumps(child({mode!r}, {str(run)!r}, {window})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--gaussians", type=int, default=30_000, help="per scene")
    parser.add_argument("--views", type=int, default=8, help="per scene (every 4th is a test view)")
    parser.add_argument("--window", type=int, default=64, help="finetune.target_window")
    parser.add_argument("--out", default=str(benchmark_output("finetune_memory")))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fit3d-memory-") as tmp:
        runs = make_runs(Path(tmp), args.scenes, args.gaussians, args.views)
        rows = {
            n: {"ours": measure("ours", run, args.window), "resident": measure("resident", run, 0)}
            for n, run in runs.items()
        }
    print(f"{'scenes':>6} {'views':>6} {'ours peak RSS MB':>17} {'scene loads':>11} "
          f"{'all-resident peak RSS MB':>25}")  # fmt: skip
    for n, r in rows.items():
        o = r["ours"]
        print(f"{n:>6} {o['views']:>6} {o['rss_mb']:>17.0f} {o['scene_loads']:>11} "
              f"{r['resident']['rss_mb']:>25.0f}")  # fmt: skip
    result = {
        "gaussians_per_scene": args.gaussians,
        "views_per_scene": args.views,
        "window": args.window,
        "rows": rows,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
