"""Viewer memory and start-up time on a generated 1M-Gaussian lifted scene.

Writes a synthetic lifted scene (fit3d.view.synthetic: N Gaussians on a wall, SH degree 3,
D = 64 features, a Conv2d(64, 384) decoder: the demo preset's sizes with a ViT-S backbone) and
its 4-camera scene dataset to a temp folder, then starts the viewer server in a fresh process
for each display cap, stops it and reports that process's peak resident memory
(VmHWM) and start-up seconds. A bare process that only imports the viewer gives the floor. Every
process runs one after the other on the same files, so their figures compare directly.

    python benchmarks/view.py [--n 1000000] [--caps 500000 0]   (cap 0 = show all)

Prints a table and writes outputs/bench/view.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.io import write_json  # noqa: E402
from fit3d.runs import benchmark_output  # noqa: E402

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from fit3d.view.server import Viewer
scene, cap = sys.argv[1], int(sys.argv[2])
shown = total = 0
if cap >= 0:
    viewer = Viewer(scene, port=int(sys.argv[3]), max_gaussians=cap)
    shown, total = viewer.shown, viewer.total
    viewer.stop()
try:  # VmHWM: this process image's peak (ru_maxrss would carry the parent's over fork+exec)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    peak = int(hwm) / 2**20  # KiB -> GiB
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"cap": cap, "shown": shown, "total": total, "peak_rss_gib": round(peak, 2),
                  "seconds": round(time.perf_counter() - t0, 1)}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="Gaussians in the generated scene")
    p.add_argument("--caps", type=int, nargs="+", default=[500_000, 0], help="display caps")
    args = p.parse_args()
    from fit3d.view.synthetic import write_synthetic_lift, write_wall_scene

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_wall_scene(root / "scenes")
        scene = write_synthetic_lift(
            root / "lift" / "big",
            args.n,
            scenes_root=root / "scenes",
            feature_dim=64,
            embed_dim=384,
            sh_degree=3,
        )
        size = sum(f.stat().st_size for f in scene.iterdir()) / 2**20
        print(f"generated {args.n:,} Gaussians ({size:.0f} MiB on disk)", flush=True)
        for cap in [-1, *args.caps]:  # -1: imports only
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(scene), str(cap), str(_free_port())],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            what = "imports only" if cap < 0 else f"cap {cap or 'none'}: {row['shown']:,} shown"
            print(f"{what:32s} peak RSS {row['peak_rss_gib']:.2f} GiB, {row['seconds']} s")
    write_json(benchmark_output("view"), {"n": args.n, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
