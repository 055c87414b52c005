"""Rasteriser benchmark: fit3d.render (torch backend) against the shared pure-torch baseline.

Forward+backward seconds per view (best of --repeats), our CPU-seconds per wall-second in that
step, Gaussian-pixel pairs per second and peak RSS, for (10k, 256x192), (50k, 512x384),
(100k, 512x384) at 3 and 64 channels, on the same random but realistic scenes (3-sigma radius 3-9
px, mean ~6; opacity 0.1-0.9; depth 2-6 m), on --threads threads. Every measurement runs in a
fresh subprocess so peak RSS is its own; with --rounds R ours and the baseline alternate R times
per case and each keeps its best, so a busy machine slows both alike. Ours runs under the default
allocator; the baseline gets its best (tcmalloc through LD_PRELOAD when installed, else large glibc
mmap/trim thresholds).

The "before" column is measured in the same run, not quoted: `--before REV` (default a71b1ac)
exports that revision's `fit3d` package with `git archive REV fit3d | tar -x` into
outputs/bench/before-<sha>/ (kept and reused), and the same worker times it in a fresh subprocess
with that folder first on sys.path (the worker checks that `fit3d.render` was imported from there
and records the file). a71b1ac is the last commit that changed fit3d/render before issue 13's speed
work (5276587 onward; the renderer is identical through its parent 03413eb). The old code JIT-builds
its own C++ extension (another name, cached under ~/.cache/torch_extensions; 1-2 min the first
time, inside the untimed warm-up). It runs under the baseline's allocator (it gained from a tuned
malloc, so that is the conservative choice) and alternates with ours and the baseline in every
round. "x faster" = before / ours. Without git or the revision (a tarball install) one line says
so and the column is left out; `--before ''` leaves it out too. The load average is printed before
and after, since only side-by-side ratios are meaningful on a shared machine.

Figures the issue quoted for the code before it (another machine: idle 2 cores, one core used; a
reference only, not comparable across machines): 10k 256x192 C=3 0.024 s, 50k 512x384 C=3 0.283 s,
100k 512x384 C=3 0.542 s, 100k 512x384 C=64 0.916 s per view.

    python benchmarks/raster.py [--repeats 3] [--rounds 1] [--baseline PATH] [--before REV]
                                [--cases ...]

Prints a table and writes outputs/bench/raster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# fit3d is imported lazily (not at module level): a "before" worker puts the old package ahead of
# this one on sys.path first
sys.path.insert(0, str(ROOT))
CASES = [(10_000, 256, 192), (50_000, 512, 384), (100_000, 512, 384)]
CHANNELS = [3, 64]
DEFAULT_BEFORE = "a71b1ac"  # last change to fit3d/render before issue 13's speed work
# fwd+bwd seconds per view the issue quoted for the code before it (another machine: idle 2 cores,
# one core used, best of 3); printed as a reference only, never a ratio's denominator
ISSUE_FIGURES = {
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


def _step_ours(render, scene: dict, params: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    img, alpha, _ = render.rasterization(
        *params, scene["viewmat"][None], scene["K"][None], scene["width"], scene["height"]
    )
    torch.autograd.backward([img, alpha], [grad_out[None], torch.ones_like(alpha)])


def _step_baseline(module, scene: dict, params: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    img, alpha, _ = module.rasterize(
        *params, scene["viewmat"], scene["K"], scene["width"], scene["height"]
    )
    torch.autograd.backward([img, alpha], [grad_out, torch.ones_like(alpha)])


def _import_render(args: argparse.Namespace):
    """fit3d.render for this worker: the old package for "before" (checked), else this checkout."""
    if args.worker == "before":
        sys.path.insert(0, str(args.before_dir))
    import fit3d.render

    where = Path(fit3d.render.__file__).resolve()
    if args.worker == "before" and not where.is_relative_to(args.before_dir.resolve()):
        raise RuntimeError(f"fit3d.render imported from {where}, not from {args.before_dir}")
    return fit3d.render, str(where)


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
    extra = {}
    if args.worker in ("ours", "before"):
        render, extra["module_file"] = _import_render(args)
        step = lambda: _step_ours(render, scene, params, grad_out)  # noqa: E731
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("raster_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        step = lambda: _step_baseline(module, scene, params, grad_out)  # noqa: E731
    step()  # warm-up (and, for ours and before, the one-time C++ build/load)
    if args.worker in ("ours", "before"):  # a failed build falls back to pure torch: say so
        ext = getattr(sys.modules.get("fit3d.render._cpp"), "_extension", None)
        extra["cpp"] = ext is not None and ext() is not None
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
                **extra,
            }
        )
    )


def export_before(rev: str, cache: Path) -> tuple[Path, str] | str:
    """`fit3d` of git revision `rev` under cache/before-<sha>/ (exported once, then reused) and
    its commit; or the reason it is unavailable."""
    if not shutil.which("git"):
        return "git not found"
    res = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "unknown revision"
        return f"revision {rev!r} not available ({why})"
    sha = res.stdout.strip()
    target = cache / f"before-{sha[:7]}"
    if (target / "fit3d" / "render" / "__init__.py").exists():
        return target, sha
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".before-{sha[:7]}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    archive = subprocess.Popen(["git", "archive", sha, "fit3d"], cwd=ROOT, stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0 or not (tmp / "fit3d" / "render").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        return f"could not export fit3d at {rev} with git archive"
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target, sha


def _run(renderer: str, n: int, w: int, h: int, c: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    allocator = "default"
    if renderer in ("baseline", "before"):
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
    if renderer == "before":
        cmd += ["--before-dir", str(args.before_dir)]
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
    ap.add_argument("--rounds", type=int, default=1, help="alternate the renderers this often")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--baseline", type=Path, default=ROOT.parent / "shared/baselines/raster_baseline.py"
    )
    ap.add_argument(
        "--before",
        default=DEFAULT_BEFORE,
        help="git revision timed side by side as 'before' ('' leaves the column out)",
    )
    ap.add_argument("--out", type=Path, help="default outputs/bench/raster.json")
    ap.add_argument("--cases", default="all", help="'all' or e.g. '100000x512x384x64'")
    ap.add_argument("--worker", choices=["ours", "baseline", "before"], help=argparse.SUPPRESS)
    ap.add_argument("--before-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--channels", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from fit3d.runs import benchmark_output

    if args.out is None:
        args.out = ROOT / benchmark_output("raster")
    cases = [(n, w, h, c) for n, w, h in CASES for c in CHANNELS]
    if args.cases != "all":
        cases = [tuple(int(v) for v in s.split("x")) for s in args.cases.split(",")]
    has_baseline = args.baseline.exists()
    before_sha = None
    if args.before:
        got = export_before(args.before, args.out.parent)
        if isinstance(got, str):
            print(f"before: {got}; the before column is left out")
        else:
            args.before_dir, before_sha = got
            print(f"before: fit3d at {args.before} ({before_sha[:10]}) from {args.before_dir}")
    has_before = before_sha is not None
    load_before = os.getloadavg()
    print(
        f"{args.threads} threads, {os.cpu_count()} CPUs; load average before: "
        + " ".join(f"{v:.2f}" for v in load_before)
    )
    rows = []
    side = f"{'s/view':>8} {'Mpairs/s':>8} {'RSS MB':>6}"
    header = f"{'case':>20} | ours: {side}"
    if has_before:
        header += f" | before: {'s/view':>8} {'RSS MB':>6} {'x faster':>8}"
    header += f" | baseline: {side} | ours/base | CPU/wall"
    print(header)
    print("-" * len(header))
    names = ["ours"] + ["before"] * has_before + ["baseline"] * has_baseline
    shown_file = False
    for n, w, h, c in cases:
        pairs = _pairs(make_scene(n, w, h, 1))
        runs = {name: [] for name in names}
        for _ in range(args.rounds):  # alternate, so load changes hit all alike
            for name in names:
                runs[name].append(_run(name, n, w, h, c, args))
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
        sides = [ours, base]
        if has_before:
            before = row["before"] = _best(runs["before"])
            sides.append(before)
        for sd in sides:
            if "seconds" in sd:
                sd["mpairs_per_s"] = pairs / sd["seconds"] / 1e6
        if "seconds" in ours and "seconds" in base:
            row["ratio"] = ours["seconds"] / base["seconds"]
        if has_before and "seconds" in ours and "seconds" in before:
            row["speedup_vs_before"] = before["seconds"] / ours["seconds"]
        rows.append(row)

        def cell(sd: dict) -> str:
            if "seconds" not in sd:
                return f"{sd.get('error', '-')[:24]:>24}"
            return f"{sd['seconds']:8.3f} {sd['mpairs_per_s']:8.1f} {sd['peak_rss_mb']:6.0f}"

        line = f"{f'{n // 1000}k {w}x{h} C={c}':>20} |       {cell(ours)}"
        if has_before:
            if "seconds" in before:
                line += f" |         {before['seconds']:8.3f} {before['peak_rss_mb']:6.0f}"
                line += f" {row['speedup_vs_before']:7.1f}x"
            else:
                line += f" |         {before.get('error', '-')[:24]:>24}"
        ratio = f"{row['ratio']:8.2f}x" if "ratio" in row else f"{'-':>9}"
        cpw = f"{ours['cpu_per_wall']:8.2f}" if "cpu_per_wall" in ours else f"{'-':>8}"
        print(f"{line} |           {cell(base)} | {ratio} | {cpw}", flush=True)
        if has_before and "module_file" in before and not shown_file:
            print(f"{'':>20}   (before imported fit3d.render from {before['module_file']})")
            shown_file = True
        for name, sd in (("ours", ours), ("before", row.get("before", {}))):
            if sd.get("cpp") is False:
                print(f"{'':>20}   ({name} ran without its C++ kernels: pure torch, build failed?)")
    load_after = os.getloadavg()
    print("load average after: " + " ".join(f"{v:.2f}" for v in load_after))
    print(
        "figures the issue quoted for the code before it (another machine, idle, one core; "
        "reference only): "
        + ", ".join(
            f"{n // 1000}k {w}x{h} C={c} {s:.3f}" for (n, w, h, c), s in ISSUE_FIGURES.items()
        )
        + " s/view"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "before_rev": args.before or None,
        "before_commit": before_sha,
        "before_dir": str(args.before_dir) if has_before else None,
        "issue_quoted_before_seconds": [
            {"n": n, "width": w, "height": h, "channels": c, "seconds": s}
            for (n, w, h, c), s in ISSUE_FIGURES.items()
        ],
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
