"""Stage-2 training step, full fine-tuning against LoRA (`fit3d.lora`): time and memory.

One step = forward of the backbone on preprocessed images (`backbone(backbone.preprocess(x))`,
the last block's normed patch tokens [B, C, h, w]), an L1 loss to a fixed random target of that
shape, backward, and an AdamW step over the trainable parameters: all of them (`full`) or the
LoRA A / B's (`lora`: `add_lora(backbone.model, rank, blocks, targets)`, the rest frozen).

Time: both adapters live in this process on the same images and weights and are stepped
alternately (full, lora, full, ...) after 2 warm-up steps each, so machine load hits both alike;
the table gives the mean over `--steps`. Memory: ru_maxrss only grows over a process's life, so
each adapter's memory comes from its own fresh subprocess (this script with `--only full|lora`),
which reports its peak RSS (weights, setup and steps) and, on Linux, the peak of the steps above
the RSS they started from (peak RSS reset through /proc/self/clear_refs, read as VmHWM).

    python benchmarks/adapter_step.py [--backbone dinov2] [--steps 10] [--batch 2]
        [--size 168 252] [--rank 4] [--blocks 4] [--targets q v] [--precision fp32|bf16]

CPU only. `dinov2` is the real ViT-S/14 (offline weights through `fit3d.weights`); if they cannot
be resolved, random weights of the same architecture (the step costs the same).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fit3d.backbones import Backbone  # noqa: E402
from fit3d.lora import LORA_TARGETS, add_lora  # noqa: E402

ADAPTERS = ("full", "lora")
WARMUP = 2


def _load(name: str) -> tuple[Backbone, str]:
    """The backbone with its resolved weights, else random weights; and which it got."""
    try:
        backbone = Backbone(name)
    except Exception as exc:  # any failure to resolve the weights: fall back
        print(f"# {name}: weights not resolved ({exc}); using random weights", file=sys.stderr)
        backbone = Backbone(name, weights="random")
    return backbone, backbone.weights_info.source


def _prepare(backbone: Backbone, adapter: str, args: argparse.Namespace) -> list[torch.Tensor]:
    """Make `backbone` train as `adapter`; return its trainable parameters."""
    backbone.train()
    if adapter == "full":
        return [p for p in backbone.parameters() if p.requires_grad]
    return add_lora(backbone.model, rank=args.rank, blocks=args.blocks, targets=args.targets)


def _step_fn(
    backbone: Backbone,
    params: list[torch.Tensor],
    images: torch.Tensor,
    target: torch.Tensor,
    bf16: bool,
) -> Callable[[], None]:
    """One training step: forward, L1 to `target`, backward, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = backbone(backbone.preprocess(images))  # [B, C, h, w]
        loss = F.l1_loss(out.float(), target)
        loss.backward()
        optimizer.step()

    return step


def _inputs(backbone: Backbone, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images [B, 3, H, W] in [0, 1] and an L1 target [B, C, h, w]."""
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    images = torch.rand(args.batch, 3, h, w, generator=g)
    gh, gw = backbone.token_grid(h, w)
    target = torch.randn(args.batch, backbone.embed_dim, gh, gw, generator=g)
    return images, target


def _rss_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(adapter: str, args: argparse.Namespace) -> dict:
    """This process, fresh: set up one adapter, run warm-up + steps, report its memory."""
    backbone, _ = _load(args.backbone)
    params = _prepare(backbone, adapter, args)
    images, target = _inputs(backbone, args)
    step = _step_fn(backbone, params, images, target, args.precision == "bf16")
    start_rss = _rss_kib("VmRSS")
    reset = _reset_peak_rss() and start_rss is not None
    for _ in range(WARMUP + args.steps):
        step()
    peak = _rss_kib("VmHWM") if reset else None
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_peak_mib": (peak - start_rss) / 1024 if peak is not None else None,
    }


def _child_args(args: argparse.Namespace, adapter: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--only",
        adapter,
        "--backbone",
        args.backbone,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--size",
        *map(str, args.size),
        "--rank",
        str(args.rank),
        "--blocks",
        str(args.blocks),
        "--targets",
        *args.targets,
        "--precision",
        args.precision,
        "--threads",
        str(args.threads),
    ]


def _memory(args: argparse.Namespace, adapter: str) -> dict:
    """Run `child` in a fresh subprocess; its result (the last stdout line, JSON)."""
    proc = subprocess.run(_child_args(args, adapter), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"--only {adapter} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="dinov2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[168, 252], metavar=("H", "W"))
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=["q", "v"], choices=LORA_TARGETS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--only", choices=ADAPTERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only:
        print(json.dumps(child(args.only, args)))
        return 0

    full, source = _load(args.backbone)
    lora = copy.deepcopy(full)
    models = {"full": full, "lora": lora}
    params = {name: _prepare(models[name], name, args) for name in ADAPTERS}
    images, target = _inputs(full, args)
    bf16 = args.precision == "bf16"
    steps = {n: _step_fn(models[n], params[n], images, target, bf16) for n in ADAPTERS}
    times: dict[str, list[float]] = {n: [] for n in ADAPTERS}
    for i in range(WARMUP + args.steps):
        for name in ADAPTERS:  # alternate, so that load changes hit both
            start = time.perf_counter()
            steps[name]()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
    memory = {name: _memory(args, name) for name in ADAPTERS}

    h, w = args.size
    gh, gw = full.token_grid(h, w)
    print(
        f"\n{args.backbone} ({full.timm_name}, weights: {source}), batch {args.batch}, "
        f"{h}x{w} ({gh}x{gw} tokens), {args.precision}, CPU, {torch.get_num_threads()} threads; "
        f"LoRA rank {args.rank} on {' '.join(args.targets)} of the last {args.blocks} blocks; "
        f"mean of {args.steps} alternating steps after {WARMUP} warm-up each\n"
    )
    print(
        "| adapter | trainable params | mean step s | ratio to full | peak RSS MiB "
        "| step peak above setup MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    mean_full = sum(times["full"]) / len(times["full"])
    for name in ADAPTERS:
        n_params = sum(p.numel() for p in params[name])
        mean = sum(times[name]) / len(times[name])
        step_peak = memory[name]["step_peak_mib"]
        step_peak_text = "n/a" if step_peak is None else f"{step_peak:.0f}"
        print(
            f"| {name} | {n_params:,} | {mean:.3f} | {mean / mean_full:.2f} "
            f"| {memory[name]['peak_rss_mib']:.0f} | {step_peak_text} |"
        )
    print(
        "\nMemory: each adapter in its own fresh subprocess (`--only`). Peak RSS = ru_maxrss of "
        "that process (weights, setup, steps); step peak = VmHWM after warm-up + steps minus the "
        "RSS before them (peak reset through /proc/self/clear_refs): activations, gradients, "
        "AdamW state."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
