"""`make gpu-check`: the first command to run on a machine with a GPU.

Runs, on the first CUDA device, with what `make setup` installed and nothing else:
1. gsplat's kernels: the first `gsplat.rasterization` call (a PyPI gsplat compiles its CUDA code
   on first use and caches it under ~/.cache/torch_extensions: minutes, once per machine);
2. the `gpu`-marked tests (`pytest -m gpu`);
3. a small pipeline through the real entry points on `cuda` (2 demo rooms of 32 views at
   224x168, DINOv2 ViT-S, 300 lift steps, one fine-tuning epoch, evaluation on 8 views);
4. the renderer's forward+backward on gsplat against our CPU rasteriser (the `torch` backend), on
   the same random scene (100k Gaussians, 512x384, 64 channels; `benchmarks/raster.py`'s scenes);
then prints one table: lift and fine-tune steps/s, renderer seconds and speed-up, peak GPU memory
per stage, and the tests' summary. Without CUDA it prints one line and exits 0 having run nothing.
Exit status 1 when a part failed. Writes outputs/bench/gpu_check.json.

    python benchmarks/gpu_check.py [--keep DIR]
    python benchmarks/gpu_check.py --has-gpu   # exit 0 with CUDA, else the one line and exit 1
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
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PIPELINE = [
    "backbone.name=dinov2",
    "run.device=cuda",
    "scenes.demo_train=1",
    "scenes.demo_val=1",
    "scenes.demo_views=32",
    "scenes.demo_width=224",
    "scenes.demo_height=168",
    "lift.steps=300",
    "lift.checkpoint_every=0",
    "finetune.devices=1",
    "finetune.val_views=2",
    "finetune.corr_pairs=2",
    "eval.max_views=8",
    "eval.seeds=[0]",
    "eval.lrs=[0.01]",
    "eval.epochs=2",
    "eval.pairs_per_scene=2",
]
"""Overrides of the demo preset for the timed pipeline (the paper's method at a small size)."""


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def _stage(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run fn on a fresh peak-memory counter; (its result, peak GPU GiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, _peak_gb()


def gsplat_warmup() -> dict[str, Any]:
    """Time the first gsplat call (kernel compilation or loading)."""
    from raster import make_scene

    from fit3d.render import rasterization

    s = make_scene(1000, 64, 48, 3)
    t = time.perf_counter()
    img, _, _ = rasterization(
        s["means"].cuda(), s["quats"].cuda(), s["scales"].cuda(), s["opacities"].cuda(),
        s["colors"].cuda(), s["viewmat"][None].cuda(), s["K"][None].cuda(), 64, 48,
        backend="gsplat",
    )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.isfinite(img).all() and img.abs().sum() > 0, "gsplat rendered nothing"
    return {"seconds": time.perf_counter() - t}


def gpu_tests() -> dict[str, Any]:
    """`pytest -m gpu` in a subprocess; its closing line and exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "no output"}


def pipeline(out: Path) -> dict[str, Any]:
    """Demo rooms -> lift -> fine-tune -> eval on CUDA through the entry points' `main`."""
    import stage1_lift.__main__ as lift_main
    import stage2_finetune.__main__ as finetune_main
    from fit3d.cli import parse_cli
    from fit3d.eval.__main__ import main as eval_main
    from fit3d.scenes import generate_demo_set

    argv = ["--preset", "demo", f"run.out={out}", *PIPELINE]
    generate_demo_set(parse_cli(argv, "gpu_check", ""))
    result: dict[str, Any] = {}
    for name, main in (("lift", lift_main.main), ("finetune", finetune_main.main)):
        rc, peak = _stage(lambda main=main: main(argv))
        if rc != 0:
            raise RuntimeError(f"{name} exited {rc}")
        result[f"{name}_peak_gb"] = peak
    t = time.perf_counter()
    rc, result["eval_peak_gb"] = _stage(lambda: eval_main(argv))
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
        "finetune_batch": ft["batch"],
    }
    return result


def renderer(repeats: int = 5) -> dict[str, Any]:
    """Median forward+backward seconds, gsplat (CUDA) vs our CPU path, on the same scene."""
    from raster import make_scene

    from fit3d.render import rasterization

    s = make_scene(100_000, 512, 384, 64)

    def step(dev: str, backend: str) -> float:
        t = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in s.items()}
        params = [
            t[k].requires_grad_() for k in ("means", "quats", "scales", "opacities", "colors")
        ]
        start = time.perf_counter()
        img, _, _ = rasterization(
            *params, t["viewmat"][None], t["K"][None], t["width"], t["height"], backend=backend
        )
        img.square().mean().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    gpu = [step("cuda", "gsplat") for _ in range(repeats + 1)][1:]
    cpu = [step("cpu", "torch") for _ in range(2)][1:]
    g, c = statistics.median(gpu), statistics.median(cpu)
    return {
        "gsplat_seconds": g,
        "cpu_seconds": c,
        "speedup": c / g,
        "cpu_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the pipeline's outputs here (kept)")
    parser.add_argument("--has-gpu", action="store_true", help="only say whether CUDA is present")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU present (torch.cuda.is_available() is False); nothing run")
        return 1 if args.has_gpu else 0
    if args.has_gpu:
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.cuda.get_device_name(0)
    print(f"gpu-check on {device} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    out = args.keep or Path(tempfile.mkdtemp(prefix="fit3d-gpu-check-"))
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "gsplat": gsplat_warmup,
        "tests": gpu_tests,
        "pipeline": lambda: pipeline(out),
        "renderer": renderer,
    }
    results: dict[str, Any] = {"device": device}
    failed = []
    start = time.perf_counter()
    for name, fn in parts.items():
        t = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            results[name] = fn()
            if name == "tests" and results[name]["returncode"] != 0:
                failed.append(name)
        except Exception as e:  # report every part, then fail
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        results[name]["wall_seconds"] = time.perf_counter() - t
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - start
    _print_table(results)
    from fit3d.io import write_json
    from fit3d.runs import benchmark_output

    write_json(benchmark_output("gpu_check"), results)
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}")
        return 1
    return 0


def _print_table(r: dict[str, Any]) -> None:
    def get(part: str, key: str, fmt: str) -> str:
        v = r.get(part, {}).get(key)
        return "failed" if v is None else format(v, fmt)

    rows = [
        ("gsplat first call (compile/load)", get("gsplat", "seconds", ".1f") + " s"),
        ("gpu tests (pytest -m gpu)", r.get("tests", {}).get("summary", "failed")),
        ("lift steps/s", get("pipeline", "lift_steps_per_s", ".1f")),
        ("fine-tune steps/s (global batch 2)", get("pipeline", "finetune_steps_per_s", ".2f")),
        ("renderer fwd+bwd gsplat s", get("renderer", "gsplat_seconds", ".4f")),
        ("renderer fwd+bwd our CPU path s", get("renderer", "cpu_seconds", ".3f")),
        ("renderer speed-up (CPU / gsplat)", get("renderer", "speedup", ".0f") + "x"),
        ("peak GPU memory lift GiB", get("pipeline", "lift_peak_gb", ".2f")),
        ("peak GPU memory fine-tune GiB", get("pipeline", "finetune_peak_gb", ".2f")),
        ("peak GPU memory eval GiB", get("pipeline", "eval_peak_gb", ".2f")),
        ("total", f"{r['total_seconds']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'gpu-check: ' + r['device']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
