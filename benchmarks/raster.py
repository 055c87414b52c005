"""Rasteriser benchmark: fit3d.render (torch backend) against the shared pure-torch baseline.

Forward+backward seconds per view (best of --repeats), our CPU-seconds per wall-second in that
step, Gaussian-pixel pairs per second and peak RSS, for (10k, 256x192), (50k, 512x384),
(100k, 512x384) at 3 and 64 channels, on the same random but realistic scenes (3-sigma radius 3-9
px, mean ~6; opacity 0.1-0.9; depth 2-6 m), on --threads threads. Every measurement runs in a
fresh subprocess so peak RSS is its own; with --rounds R ours and the baseline alternate R times
per case and each keeps its best, so a busy machine slows both alike. Ours runs under the default
allocator; the baseline gets its best (tcmalloc through LD_PRELOAD when installed, else large glibc
mmap/trim thresholds). The "before" column is fit3d's figure before issue 13 (idle 2-core
machine, one core used) and "x faster" our speedup over it; the load average is printed before
and after, since only the side-by-side ratio is meaningful on a shared machine.

    python benchmarks/raster.py [--repeats 3] [--rounds 1] [--baseline PATH] [--cases ...]

Prints a table and writes outputs/bench/raster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fit3d.runs import benchmark_output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [(10_000, 256, 192), (50_000, 512, 384), (100_000, 512, 384)]
CHANNELS = [3, 64]
# fit3d's fwd+bwd seconds per view before issue 13 (idle 2-core machine, best of 3)
BEFORE = {
    (10_000, 256, 192, 3): 0.024,
    (50_000, 512, 384, 3): 0.283,
    (100_000, 512, 384, 3): 0.542,
    (100_000, 512, 384, 64): 0.916,
}
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def make_scene(n: int, width: int, height: int, channels: int, seed: int = 0) -> dict:
    """Random Gaussians in front of an identity camera with realistic on-screen sizes."""
    g = torch.Generator().manual_seed(seed)
    f = 0.8 * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    z = 2.0 + 4.0 * torch.rand(n, generator=g)
    px = torch.rand(n, generator=g) * width
    py = torch.rand(n, generator=g) * height
    means = torch.stack([(px - width / 2) * z / f, (py - height / 2) * z / f, z], -1)
    radius_px = 3.0 + 6.0 * torch.rand(n, generator=g)  # 3-sigma radius in pixels
    sigma = (radius_px / 3.0 * z / f)[:, None] * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    return dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=sigma,
        opacities=0.1 + 0.8 * torch.rand(n, generator=g),
        colors=torch.rand(n, channels, generator=g),
        viewmat=torch.eye(4),
        K=K,
        width=width,
        height=height,
    )


def _pairs(scene: dict) -> int:
    """Gaussian-pixel pairs: pixels inside each visible Gaussian's radius box, clipped to image."""
    from fit3d.render import rasterization

    with torch.no_grad():
        _, _, info = rasterization(
            scene["means"], scene["quats"], scene["scales"], scene["opacities"],
            scene["colors"][:, :1], scene["viewmat"][None], scene["K"][None], scene["width"],
            scene["height"], packed=True,
        )  # fmt: skip
    m, r = info["means2d"], info["radii"].float()
    w = (torch.minimum(m[:, 0] + r[:, 0], torch.tensor(float(scene["width"])))
         - torch.maximum(m[:, 0] - r[:, 0], torch.tensor(0.0))).clamp_min(0)  # fmt: skip
    h = (torch.minimum(m[:, 1] + r[:, 1], torch.tensor(float(scene["height"])))
         - torch.maximum(m[:, 1] - r[:, 1], torch.tensor(0.0))).clamp_min(0)  # fmt: skip
    return int((w * h).sum())


def _step_ours(scene: dict, params: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    from fit3d.render import rasterization

    img, alpha, _ = rasterization(
        *params, scene["viewmat"][None], scene["K"][None], scene["width"], scene["height"]
    )
    torch.autograd.backward([img, alpha], [grad_out[None], torch.ones_like(alpha)])


def _step_baseline(module, scene: dict, params: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    img, alpha, _ = module.rasterize(
        *params, scene["viewmat"], scene["K"], scene["width"], scene["height"]
    )
    torch.autograd.backward([img, alpha], [grad_out, torch.ones_like(alpha)])


def worker(args: argparse.Namespace) -> None:
    """Time one (renderer, size, channels) case in this process and print one JSON line."""
    torch.set_num_threads(args.threads)
    scene = make_scene(args.n, args.width, args.height, args.channels)
    params = [
        scene[k].clone().requires_grad_(True)
        for k in ("means", "quats", "scales", "opacities", "colors")
    ]
    grad_out = torch.randn(
        args.height, args.width, args.channels, generator=torch.Generator().manual_seed(1)
    )
    if args.worker == "ours":
        step = lambda: _step_ours(scene, params, grad_out)  # noqa: E731
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("raster_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        step = lambda: _step_baseline(module, scene, params, grad_out)  # noqa: E731
    step()  # warm-up (and, for ours, the one-time C++ build/load)
    times, cpu = [], []
    for _ in range(args.repeats):
        for p in params:
            p.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best = min(range(len(times)), key=times.__getitem__)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": times[best],
                "cpu_per_wall": cpu[best] / times[best],
                "all_seconds": times,
                "peak_rss_mb": peak_mb,
            }
        )
    )


def _run(renderer: str, n: int, w: int, h: int, c: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    allocator = "default"
    if renderer == "baseline":
        if TCMALLOC.exists():
            env["LD_PRELOAD"] = str(TCMALLOC)
            allocator = "tcmalloc"
        else:
            env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
            allocator = "glibc-tunables"
    cmd = [
        sys.executable, __file__, "--worker", renderer, "--n", str(n), "--width", str(w),
        "--height", str(h), "--channels", str(c), "--repeats", str(args.repeats),
        "--threads", str(args.threads), "--baseline", str(args.baseline),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return {
            "error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed",
            "allocator": allocator,
        }
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["allocator"] = allocator
    return out


def _best(results: list[dict]) -> dict:
    """The fastest successful run, else the last failure."""
    ok = [r for r in results if "seconds" in r]
    return min(ok, key=lambda r: r["seconds"]) if ok else results[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/baseline this often")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--baseline", type=Path, default=ROOT.parent / "shared/baselines/raster_baseline.py"
    )
    ap.add_argument("--out", type=Path, default=ROOT / benchmark_output("raster"))
    ap.add_argument("--cases", default="all", help="'all' or e.g. '100000x512x384x64'")
    ap.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--channels", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cases = [(n, w, h, c) for n, w, h in CASES for c in CHANNELS]
    if args.cases != "all":
        cases = [tuple(int(v) for v in s.split("x")) for s in args.cases.split(",")]
    has_baseline = args.baseline.exists()
    load_before = os.getloadavg()
    print(
        f"{args.threads} threads, {os.cpu_count()} CPUs; load average before: "
        + " ".join(f"{v:.2f}" for v in load_before)
    )
    rows = []
    side = f"{'s/view':>8} {'Mpairs/s':>8} {'RSS MB':>6}"
    header = (
        f"{'case':>20} | ours: {side} {'CPU/wall':>8} | baseline: {side} | ours/base"
        f" | {'before':>6} {'x faster':>8}"
    )
    print(header)
    print("-" * len(header))
    for n, w, h, c in cases:
        pairs = _pairs(make_scene(n, w, h, 1))
        runs = {"ours": [], "baseline": []}
        for _ in range(args.rounds):  # alternate, so load changes hit both alike
            runs["ours"].append(_run("ours", n, w, h, c, args))
            if has_baseline:
                runs["baseline"].append(_run("baseline", n, w, h, c, args))
        ours = _best(runs["ours"])
        base = _best(runs["baseline"]) if has_baseline else {"error": "baseline not found"}
        row = {
            "n": n,
            "width": w,
            "height": h,
            "channels": c,
            "pairs": pairs,
            "ours": ours,
            "baseline": base,
        }
        for sd in (ours, base):
            if "seconds" in sd:
                sd["mpairs_per_s"] = pairs / sd["seconds"] / 1e6
        if "seconds" in ours and "seconds" in base:
            row["ratio"] = ours["seconds"] / base["seconds"]
        before = BEFORE.get((n, w, h, c))
        if before is not None and "seconds" in ours:
            row["before_seconds"] = before
            row["speedup_vs_before"] = before / ours["seconds"]
        rows.append(row)

        def cell(sd: dict) -> str:
            if "seconds" not in sd:
                return f"{sd.get('error', '-')[:24]:>24}"
            return f"{sd['seconds']:8.3f} {sd['mpairs_per_s']:8.1f} {sd['peak_rss_mb']:6.0f}"

        cpw = f"{ours['cpu_per_wall']:8.2f}" if "cpu_per_wall" in ours else f"{'-':>8}"
        ratio = f"{row['ratio']:8.2f}x" if "ratio" in row else f"{'-':>9}"
        vs = (
            f"{before:6.3f} {row['speedup_vs_before']:7.1f}x"
            if "speedup_vs_before" in row
            else f"{'-':>6} {'-':>8}"
        )
        case = f"{n // 1000}k {w}x{h} C={c}"
        print(f"{case:>20} |       {cell(ours)} {cpw} |           {cell(base)} | {ratio} | {vs}",
              flush=True)  # fmt: skip
    load_after = os.getloadavg()
    print("load average after: " + " ".join(f"{v:.2f}" for v in load_after))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
