"""The GPU check: what `tools/gpu_check.sh` runs once the bundle is installed and the gsplat
kernels are built (docs/gpu.md has the command and reads the table).

    python benchmarks/gpu_check.py --out DIR              # on a CUDA machine
    python benchmarks/gpu_check.py --out DIR --rehearsal  # the CPU rehearsal of the same parts
    python benchmarks/gpu_check.py --has-gpu              # exit 0 with CUDA, else one line, exit 1

Parts, in this order; each prints a line when it starts and its figures when it ends (a run cut
off at its time limit still shows how far it got), and DIR/gpu_check.json is rewritten after each:
1. gsplat: the first gsplat render and the kernel module it loaded (the one tools/gsplat_kernels.py
   built, or gsplat's own JIT build when that failed: minutes);
2. tests: `pytest -m gpu` (collects the whole suite; CPU vs gsplat renderer agreement, stage 2 and
   a tiny pipeline on CUDA, fp16/bf16 mixed precision), streamed;
3. pipeline: demo rooms -> lift -> fine-tune -> eval on `cuda` through the entry points' `main`
   (1 room of 32 views at 224x168, 300 lift steps, the demo preset's 3 fine-tuning epochs, bf16
   where the GPU has it; probes on it and 1 more room, scored on 2 test rooms). The backbone is
   DINOv2 ViT-S with RANDOM weights: the offline weights (88 MB) cannot travel with the check,
   so this checks that the pipeline runs and measures speed and memory; its probe scores mean
   nothing;
4. renderer: forward+backward of one random scene (`raster.make_scene`: 100k Gaussians, 512x384,
   64 channels) with gsplat on CUDA and with fit3d's CPU renderer: agreement of pixels and
   gradients, and median seconds;
5. imports: every module this process and pytest's imported came from the GPU machine's package
   list, the bundle, the standard library or the checkout (`tools/gpu_bundle.py audit`).
Then one table, printed and written to DIR/gpu_check.txt. Exit 1 when a part failed.

--rehearsal runs the same parts on CPU with the GPU machine's package set (`make gpu-rehearsal`):
the gsplat part checks that gsplat is the bundle's and renders on CPU through fit3d's stand-in
path; `pytest -m gpu` must collect the whole suite and skip every test, then the CPU tests of
`REHEARSAL_TESTS` run; the pipeline runs smaller on `cpu`; the renderer compares fit3d's C++
path with its pure-torch path on a smaller scene; the import audit is the point of it all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tools")]

COMMON = (
    "backbone.name=dinov2",
    "backbone.weights=random",
    "scenes.demo_train=1",
    "scenes.demo_val=1",
    "scenes.demo_probe=1",
    "scenes.demo_test=2",
    "lift.checkpoint_every=0",
    "finetune.devices=1",
    "finetune.val_views=2",
    "finetune.corr_pairs=2",
    "eval.seeds=[0]",
    "eval.lrs=[0.01]",
    "eval.pairs_per_scene=2",
)
"""Overrides of the demo preset shared by both modes' pipelines."""
GPU_PIPELINE = (
    *COMMON,
    "run.device=cuda",
    "scenes.demo_views=32",
    "scenes.demo_width=224",
    "scenes.demo_height=168",
    "scenes.demo_probe_views=8",
    "scenes.demo_test_views=5",
    "lift.steps=300",
    "eval.max_views=8",
    "eval.epochs=2",
)
"""The timed CUDA pipeline (the paper's method at a small size)."""
CPU_PIPELINE = (
    *COMMON,
    "run.device=cpu",
    "scenes.demo_views=8",
    "scenes.demo_width=112",
    "scenes.demo_height=84",
    "scenes.demo_probe_views=3",
    "scenes.demo_test_views=3",
    "lift.steps=20",
    "finetune.max_steps=2",
    "eval.max_views=4",
    "eval.epochs=1",
)
"""The rehearsal's pipeline: the same code paths on CPU, sized for 2 cores (~1 min)."""
REHEARSAL_TESTS = ("tests/test_render_gsplat.py", "tests/test_gpu_bundle.py")
"""CPU tests the rehearsal runs: the gsplat backend's (against a stand-in) and the bundle's."""
TEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class Mode:
    """What one mode runs where."""

    name: str
    device: str
    pipeline: tuple[str, ...]
    scene: tuple[int, int, int, int]
    """Renderer scene: Gaussians, width, height, channels."""
    reference: tuple[str, str]
    """(device, fit3d.render backend) the renderer part compares against."""
    subject: tuple[str, str]
    """(device, backend) under test."""


GPU = Mode(
    "gpu", "cuda", GPU_PIPELINE, (100_000, 512, 384, 64), ("cpu", "torch"), ("cuda", "gsplat")
)
REHEARSAL = Mode(
    "rehearsal", "cpu", CPU_PIPELINE, (10_000, 256, 192, 64), ("cpu", "torch-python"),
    ("cpu", "torch"),
)  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _stage(device: str, fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run fn on a fresh peak-memory counter; (its result, peak GPU GiB or None on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    _sync(device)
    return out, _peak_gib(device)


def gsplat_part(mode: Mode) -> dict[str, Any]:
    """First gsplat render (GPU) or gsplat import from the bundle plus a CPU render (rehearsal)."""
    import gsplat
    from raster import make_scene

    from fit3d.render import rasterization

    out: dict[str, Any] = {"version": gsplat.__version__, "from": str(Path(gsplat.__file__).parent)}
    site = os.environ.get("GPU_CHECK_SITE")
    if site and not Path(gsplat.__file__).resolve().is_relative_to(Path(site).resolve()):
        raise RuntimeError(f"gsplat imported from {gsplat.__file__}, not the bundle in {site}")
    s = make_scene(1000, 64, 48, 3)
    dev, backend = mode.subject
    t = time.perf_counter()
    img, _, _ = rasterization(
        s["means"].to(dev), s["quats"].to(dev), s["scales"].to(dev), s["opacities"].to(dev),
        s["colors"].to(dev), s["viewmat"][None].to(dev), s["K"][None].to(dev), 64, 48,
        backend=backend,
    )  # fmt: skip
    _sync(dev)
    out["seconds"] = time.perf_counter() - t
    if not (torch.isfinite(img).all() and img.abs().sum() > 0):
        raise RuntimeError(f"{backend} rendered nothing")
    if mode is GPU:
        from gsplat.cuda._backend import _C

        out["kernels"] = getattr(_C, "__file__", "?")
    else:
        built = Path(gsplat.__file__).parent / "csrc.so"
        out["kernels"] = str(built) if built.exists() else "none built (no nvcc here)"
    print(f"  gsplat {out['version']} from {out['from']}; kernels: {out['kernels']}")
    return out


def _stream(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run cmd, echoing its output as it comes; (exit code, last non-empty line)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    last = "no output"
    try:
        for line in proc.stdout:
            print(f"  | {line}", end="")
            if line.strip():
                last = line.strip()
    finally:
        timer.cancel()
    rc = proc.wait()
    if rc < 0:
        last = f"killed after {timeout:.0f} s ({last})"
    return rc, last


def tests_part(mode: Mode) -> dict[str, Any]:
    """`pytest -m gpu`, and in the rehearsal also the CPU tests of REHEARSAL_TESTS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tools"), env.get("PYTHONPATH")]))
    base = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    base += ["-p", "import_log"]
    rc, summary = _stream([*base, "-m", "gpu", "--durations=5"], env, TEST_TIMEOUT_S)
    out: dict[str, Any] = {"returncode": rc, "summary": summary}
    if mode is REHEARSAL:
        if rc == 0 and "passed" in summary:
            raise RuntimeError(f"gpu tests ran without CUDA: {summary}")
        rc_cpu, cpu = _stream([*base, "-m", "not gpu", *REHEARSAL_TESTS], env, TEST_TIMEOUT_S)
        out |= {"cpu_returncode": rc_cpu, "cpu_summary": cpu}
    return out


def pipeline_part(mode: Mode, out: Path) -> dict[str, Any]:
    """Demo rooms -> lift -> fine-tune -> eval through the entry points' `main`."""
    import stage1_lift.__main__ as lift_main
    import stage2_finetune.__main__ as finetune_main
    from fit3d.cli import parse_cli
    from fit3d.eval.__main__ import main as eval_main
    from fit3d.scenes import generate_demo_set

    argv = ["--preset", "demo", f"run.out={out}", *mode.pipeline]
    generate_demo_set(parse_cli(argv, "gpu_check", ""))
    result: dict[str, Any] = {"weights": "random: DINOv2 ViT-S architecture, no pretrained weights"}
    for name, main in (("lift", lift_main.main), ("finetune", finetune_main.main)):
        print(f"  {name} ...", flush=True)
        rc, result[f"{name}_peak_gib"] = _stage(mode.device, lambda main=main: main(argv))
        if rc != 0:
            raise RuntimeError(f"{name} exited {rc}")
    print("  eval ...", flush=True)
    t = time.perf_counter()
    rc, result["eval_peak_gib"] = _stage(mode.device, lambda: eval_main(argv))
    if rc != 0:
        raise RuntimeError(f"eval exited {rc}")
    result["eval_seconds"] = time.perf_counter() - t
    lift = [json.loads(p.read_text()) for p in (out / "lift" / "default").glob("*/meta.json")]
    lift_steps = sum(m["steps"] for m in lift)
    lift_seconds = sum(m["seconds"] - m.get("teacher_seconds", 0.0) for m in lift)
    ft = json.loads((out / "finetune" / "default" / "meta.json").read_text())
    result |= {
        "lift_steps": lift_steps,
        "lift_steps_per_s": lift_steps / max(lift_seconds, 1e-9),
        "finetune_steps": ft["steps"],
        "finetune_steps_per_s": ft["steps"] / max(ft["seconds"], 1e-9),
        "finetune_global_batch": ft["batch"]["global_batch"],
        "finetune_precision": ft.get("precision", "?"),
    }
    return result


def _render_step(scene: dict, device: str, backend: str) -> tuple[float, list[torch.Tensor]]:
    """Seconds of one forward+backward; [image, grads of means, quats, scales, opacities,
    colors] on CPU."""
    from fit3d.render import rasterization

    t = {k: v.detach().clone().to(device) if torch.is_tensor(v) else v for k, v in scene.items()}
    names = ("means", "quats", "scales", "opacities", "colors")
    params = [t[k].requires_grad_() for k in names]
    _sync(device)
    start = time.perf_counter()
    img, _, _ = rasterization(
        *params, t["viewmat"][None], t["K"][None], t["width"], t["height"], backend=backend
    )
    img.square().mean().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, [x.detach().cpu().clone() for x in (img, *(p.grad for p in params))]


def renderer_part(mode: Mode, repeats: int = 5) -> dict[str, Any]:
    """Agreement and median forward+backward seconds, subject vs reference, on one scene."""
    from raster import make_scene

    n, width, height, channels = mode.scene
    scene = make_scene(n, width, height, channels)
    (ref_dev, ref_backend), (dev, backend) = mode.reference, mode.subject
    ref_times, ref = zip(
        *(_render_step(scene, ref_dev, ref_backend) for _ in range(2)), strict=True
    )
    times, sub = zip(*(_render_step(scene, dev, backend) for _ in range(repeats + 1)), strict=True)
    a, b = sub[0], ref[0]
    names = ("means", "quats", "scales", "opacities", "colors")
    pixel_err = float((a[0] - b[0]).abs().max()) / max(1.0, float(b[0].abs().max()))
    grad_err = {
        k: float((x - y).norm() / y.norm().clamp_min(1e-30))
        for k, x, y in zip(names, a[1:], b[1:], strict=True)
    }
    g, c = statistics.median(times[1:]), ref_times[1]
    return {
        "scene": f"{n} Gaussians {width}x{height} C={channels}",
        "subject": f"{backend} on {dev}",
        "reference": f"{ref_backend} on {ref_dev}",
        "pixel_max_rel_err": pixel_err,
        "grad_rel_err": grad_err,
        "grad_rel_err_max": max(grad_err.values()),
        "seconds": g,
        "reference_seconds": c,
        "speedup": c / g,
        "cpu_threads": torch.get_num_threads(),
    }


def imports_part(mode: Mode, logs: Path | None) -> dict[str, Any]:
    """Audit the module logs of this process and pytest's against the machine's package list."""
    import gpu_bundle
    import import_log

    if logs is None:
        return {"skipped": "FIT3D_IMPORT_LOG unset"}
    import_log.write(str(logs))
    allowed = set(gpu_bundle.read_machine())
    bundle = Path(os.environ.get("GPU_BUNDLE", gpu_bundle.BUNDLE_DIR))
    allowed |= {gpu_bundle.wheel_metadata(w)[0] for w in bundle.glob("*.whl")}
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"))
    roots = [*gpu_bundle.PROJECT, built.expanduser().resolve()]
    files = sorted(logs.glob("*.txt"))
    bad = gpu_bundle.audit(files, allowed, roots)
    names = {ln.partition("\t")[0] for f in files for ln in f.read_text().splitlines()}
    for line in bad:
        print(f"  import from outside the machine's list: {line}")
    return {"processes": len(files), "modules": len(names), "outside": bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--rehearsal", action="store_true", help="the CPU rehearsal")
    parser.add_argument("--has-gpu", action="store_true", help="only say whether CUDA is present")
    parser.add_argument("--keep", type=Path, help="write the pipeline's run folders here")
    args = parser.parse_args(argv)
    mode = REHEARSAL if args.rehearsal else GPU
    if mode is GPU and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU present (torch.cuda.is_available() is False); nothing run")
        return 1 if args.has_gpu else 0
    if args.has_gpu:
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if mode is GPU else "CPU (rehearsal)"
    print(f"gpu-check ({mode.name}) on {device}: torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, Python {sys.version.split()[0]}")  # fmt: skip
    logs = Path(os.environ["FIT3D_IMPORT_LOG"]) if os.environ.get("FIT3D_IMPORT_LOG") else None
    work = args.keep or Path(tempfile.mkdtemp(prefix="fit3d-gpu-check-"))
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "gsplat": lambda: gsplat_part(mode),
        "tests": lambda: tests_part(mode),
        "pipeline": lambda: pipeline_part(mode, work),
        "renderer": lambda: renderer_part(mode),
        "imports": lambda: imports_part(mode, logs),
    }
    results: dict[str, Any] = {
        "mode": mode.name,
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "kernels": os.environ.get("GPU_CHECK_KERNELS", "?"),
    }
    from fit3d.io import write_json

    failed = []
    start = time.perf_counter()
    for i, (name, fn) in enumerate(parts.items(), 1):
        t = time.perf_counter()
        print(f"gpu-check [{i}/{len(parts)}] {name} ... (+{t - start:.0f} s)", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # report every part, then fail
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        part = results[name]
        if "error" in part or part.get("returncode", 0) or part.get("cpu_returncode", 0):
            failed.append(name)
        elif part.get("outside"):
            failed.append(name)
        part["wall_seconds"] = time.perf_counter() - t
        shown = {k: v for k, v in part.items() if k not in ("outside", "grad_rel_err")}
        print(f"gpu-check [{i}/{len(parts)}] {name}: {'FAILED' if name in failed else 'ok'} "
              f"{json.dumps(shown, default=str)}", flush=True)  # fmt: skip
        results["total_seconds"] = time.perf_counter() - start
        write_json(args.out / "gpu_check.json", results)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    table = _table(results)
    print("\n" + table)
    (args.out / "gpu_check.txt").write_text(table + "\n")
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}")
        return 1
    print(f"gpu-check: all {len(parts)} parts passed; table in {args.out / 'gpu_check.txt'}")
    return 0


def _table(r: dict[str, Any]) -> str:
    def get(part: str, key: str, fmt: str, unit: str = "") -> str:
        v = r.get(part, {}).get(key)
        if v is None:
            return "failed" if "error" in r.get(part, {}) else "-"
        return format(v, fmt) + unit

    gpu = r["mode"] == "gpu"
    ren = r.get("renderer", {})
    tests = r.get("tests", {})
    rows = [
        ("kernels", r.get("kernels", "?")),
        ("gsplat first render", get("gsplat", "seconds", ".1f", " s")),
        ("gpu tests (pytest -m gpu)", tests.get("summary", "failed")),
    ]
    if not gpu:
        rows.append((f"CPU tests ({', '.join(REHEARSAL_TESTS)})", tests.get("cpu_summary", "-")))
    rows += [
        ("pipeline backbone", "DINOv2 ViT-S, random weights: speed and memory only"),
        ("lift steps/s", get("pipeline", "lift_steps_per_s", ".1f")),
        ("fine-tune steps/s (global batch 2)", get("pipeline", "finetune_steps_per_s", ".2f")),
        ("peak GPU memory lift", get("pipeline", "lift_peak_gib", ".2f", " GiB")),
        ("peak GPU memory fine-tune", get("pipeline", "finetune_peak_gib", ".2f", " GiB")),
        ("peak GPU memory eval", get("pipeline", "eval_peak_gib", ".2f", " GiB")),
        ("renderer scene", ren.get("scene", "-")),
        (f"renderer {ren.get('subject', '')} vs {ren.get('reference', '')}: max pixel err",
         get("renderer", "pixel_max_rel_err", ".1e", " (of max(1, |pixel|))")),
        ("renderer gradients: worst relative L2 err", get("renderer", "grad_rel_err_max", ".1e")),
        ("renderer fwd+bwd " + ren.get("subject", ""), get("renderer", "seconds", ".4f", " s")),
        ("renderer fwd+bwd " + ren.get("reference", ""),
         get("renderer", "reference_seconds", ".3f", " s")),
        ("renderer speed-up", get("renderer", "speedup", ".1f", "x")),
        ("imports outside the machine's list",
         str(len(r["imports"]["outside"])) if "outside" in r.get("imports", {}) else "failed"),
        ("total (after the kernel build)", f"{r.get('total_seconds', 0):.0f} s"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    head = f"gpu-check ({r['mode']}): {r['device']}, torch {r['torch']}, Python {r['python']}"
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


if __name__ == "__main__":
    sys.exit(main())
