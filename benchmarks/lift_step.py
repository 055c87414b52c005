"""Where a training step's time goes: stage 1 (lifting) and stage 2 (fine-tuning), per part.

Stage 1 runs the loop body of `stage1_lift.loop._train` piece by piece, with the real functions
(`fit3d.lift.model.render`, `fit3d.losses.rgb_loss` / `masked_l1`, the scene's `Conv2d(D, C, 3)`
decoder, gsplat's DefaultStrategy, one Adam per parameter), timing each part in sequence:
render (forward), decoder conv (forward), SSIM (the SSIM map of `rgb_loss`, forward), losses (the
rest of `rgb_loss` and the feature L1), backward (all of it), optimizer (steps + zero_grad) and
densification (the strategy's pre/post-backward bookkeeping every step, plus its grow/prune at a
refine step, shown on its own and amortised over the preset's schedule). The backward is then split
by re-running each part's backward alone on the same inputs (render, decoder conv, SSIM), since one
`loss.backward()` cannot be timed piecewise. Last, the two stage-1 costs this benchmark found
avoidable are timed against their replacements, interleaved on the same inputs: the SSIM map's
forward + backward (torchmetrics vs `fit3d.losses.ssim_map`'s separable form) and the 8 Adam steps
(unfused vs fused, as `stage1_lift.loop.adam` now builds them); and the decoder conv + feature L1
forward + backward in fp32 against bf16 autocast (`lift.precision=bf16`, what `auto` picks on a CPU
with native bf16), and in bf16 at a quarter of the pixels (`lift.feature_pixels=0.25`, the demo's).

Stage 2 times one optimizer step at global batch 2: render the targets (rasterise D features of a
lifted scene), decode them at the token grid (`fit3d.targets.decode_to_tokens`), ViT forward +
masked L1 + backward, gradient clipping + AdamW; the ViT forward/backward is also timed under bf16
autocast, to price that option.

Sizes (D = 64, C = 384, ViT-S/14, random weights; synthetic Gaussians fill the view of a camera at
the origin, scale = mean distance to the 3 nearest neighbours, random SH/features):
  demo:      ~23k Gaussians, lifting at 168x112, teacher tokens of a 336x224 image (16x24 grid)
  scannetpp: ~300k Gaussians, 876x584, teacher tokens of the same size (41x62 grid)

Each figure is the median over `--steps` steps after one warm-up step, wall seconds and process
CPU seconds (CPU / wall ~ cores in use). One process, parts interleaved step by step, so machine
load affects all parts alike; compare ratios, not absolute seconds, on a loaded machine.

    python benchmarks/lift_step.py [--steps 5] [--sizes demo,scannetpp] [--no-stage2]

Prints the tables and writes outputs/bench/lift_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fit3d.backbones import Backbone  # noqa: E402
from fit3d.config import load_config  # noqa: E402
from fit3d.gaussians import LiftedScene, make_decoder  # noqa: E402
from fit3d.io import write_json  # noqa: E402
from fit3d.lift.model import (  # noqa: E402
    activated,
    decode_at,
    feature_pixels,
    init_params,
    render,
    upsample_at,
)
from fit3d.losses import masked_l1, ssim_map, upsample  # noqa: E402
from fit3d.render import rasterization  # noqa: E402
from fit3d.runs import autocast, benchmark_output  # noqa: E402
from fit3d.targets import decode_to_tokens  # noqa: E402
from stage1_lift.loop import make_optimizers, make_strategy  # noqa: E402

SIZES = {
    # name: (Gaussians, lifting width, height, teacher image width, height, preset)
    "demo": (23_000, 168, 112, 336, 224, "demo"),
    "scannetpp": (300_000, 876, 584, 876, 584, "scannetpp"),
}
D, PATCH = 64, 14


class Clock:
    """Accumulates (wall, CPU) seconds per named part for the current step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []

    def new_step(self) -> None:
        self.steps.append({})

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the wall and CPU seconds of the `with` body to `name` in the current step."""
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        w, c = time.perf_counter() - w0, time.process_time() - c0
        pw, pc = self.steps[-1].get(name, (0.0, 0.0))
        self.steps[-1][name] = (pw + w, pc + c)

    def medians(self) -> dict[str, tuple[float, float]]:
        """Median (wall, CPU) per part over all steps but the first (warm-up)."""
        rows = self.steps[1:] or self.steps
        names = list(dict.fromkeys(k for s in rows for k in s))
        return {
            k: (
                statistics.median(s[k][0] for s in rows if k in s),
                statistics.median(s[k][1] for s in rows if k in s),
            )
            for k in names
        }


def _ssim_torchmetrics(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SSIM map [H, W] stage 1 used before (torchmetrics), for the side-by-side rows."""
    _, full = structural_similarity_index_measure(
        pred[None],
        target[None],
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=1.0,
        return_full_image=True,
    )
    return full[0].mean(0)


def camera(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity world-to-camera [4, 4] and intrinsics [3, 3] (horizontal field of view ~64 deg)."""
    f = 0.8 * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return torch.eye(4), K


def synthetic_params(n: int, width: int, height: int, gen: torch.Generator):
    """`n` Gaussians [N, ...] uniformly in the camera's view at depth 1-5 (a room-sized slab)."""
    _, K = camera(width, height)
    uv = torch.rand(n, 2, generator=gen) * torch.tensor([width, height], dtype=torch.float32)
    z = 1.0 + 4.0 * torch.rand(n, 1, generator=gen)
    xy = (uv - K[:2, 2]) / K[0, 0] * z
    xyz = torch.cat([xy, z], 1)  # [N, 3]
    rgb = torch.rand(n, 3, generator=gen)
    params = init_params(xyz, rgb, D, 3, 0.5)
    with torch.no_grad():
        params["shN"].normal_(0.0, 0.05, generator=gen)
        params["features"].normal_(0.0, 1.0, generator=gen)
    return params


def stage1(size: str, steps: int, threads: int) -> dict[str, object]:
    """Median per-part seconds of one stage-1 step at `size`, and the backward split."""
    n, w, h, tw, th, preset = SIZES[size]
    cfg = load_config([preset])
    gen = torch.Generator().manual_seed(0)
    params = synthetic_params(n, w, h, gen)
    viewmat, K = camera(w, h)
    C = 384
    decoder = make_decoder(D, C)
    teacher = torch.randn(C, th // PATCH, tw // PATCH, generator=gen)  # [C, h, w] tokens
    target = upsample(teacher, h, w)  # [C, H, W], as `_target` does
    image = torch.rand(h, w, 3, generator=gen)  # [H, W, 3]
    extent = 5.0
    optimizers = make_optimizers(params, cfg, extent)
    decoder_opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lift.lr_decoder, eps=1e-15)
    strategy = make_strategy(cfg)
    sstate = strategy.initialize_state(scene_scale=extent)
    c = cfg.lift
    step_no = c.refine_start + 1  # inside the refine window, not a refine step
    clock = Clock()
    for _ in range(steps + 1):
        clock.new_step()
        with clock.part("render"):
            rgb, feat, _, info = render(params, viewmat, K, w, h, c.sh_degree, "auto")
        with clock.part("densification"):
            strategy.step_pre_backward(params, optimizers, sstate, step_no, info)
        with clock.part("decoder conv"):
            decoded = decoder(feat[None])[0]  # [C, H, W]
        p, t = rgb.permute(2, 0, 1), image.permute(2, 0, 1)  # [3, H, W]
        with clock.part("SSIM"):
            ssim = ssim_map(p, t).mean()
        with clock.part("losses"):
            loss_rgb = (1.0 - c.ssim_weight) * masked_l1(p, t, None) + c.ssim_weight * (1 - ssim)
            loss = loss_rgb + c.feature_weight * masked_l1(decoded, target, None)
        with clock.part("backward"):
            loss.backward()
        with clock.part("optimizer"):
            for opt in [*optimizers.values(), decoder_opt]:
                opt.step()
                opt.zero_grad(set_to_none=True)
        with clock.part("densification"):
            strategy.step_post_backward(params, optimizers, sstate, step_no, info, packed=False)
    table = clock.medians()

    # the backward split: each part's backward alone, on detached inputs of the same shapes
    split = Clock()
    for _ in range(steps + 1):
        split.new_step()
        rgb, feat, _, _ = render(params, viewmat, K, w, h, c.sh_degree, "auto")
        g_rgb, g_feat = torch.randn_like(rgb), torch.randn_like(feat)
        inputs = [params[k] for k in ("means", "quats", "scales", "opacities", "sh0", "features")]
        with split.part("render bwd"):
            torch.autograd.grad((rgb, feat), inputs, (g_rgb, g_feat), allow_unused=True)
        f = feat.detach().requires_grad_(True)
        out = decoder(f[None])[0]
        g_out = torch.randn_like(out)
        with split.part("decoder conv bwd"):
            torch.autograd.grad(out, [f, decoder.weight], g_out)
        r = rgb.detach().permute(2, 0, 1).requires_grad_(True)
        s = ssim_map(r, image.permute(2, 0, 1)).mean()
        with split.part("SSIM bwd"):
            torch.autograd.grad(s, r)
    table_bwd = split.medians()

    # the stage-1 changes against what they replaced, interleaved step by step
    ref = Clock()
    t = image.permute(2, 0, 1)  # [3, H, W]
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    adams = {
        fused: [
            torch.optim.Adam(
                [torch.nn.Parameter(v.detach().clone())], lr=1e-3, eps=1e-15, fused=fused
            )
            for v in params.values()
        ]
        for fused in (False, True)
    }
    for _ in range(steps + 1):
        ref.new_step()
        for name, fn in (("torchmetrics", _ssim_torchmetrics), ("separable (fit3d)", ssim_map)):
            r = rgb.detach().permute(2, 0, 1).requires_grad_(True)
            with ref.part(f"SSIM fwd+bwd, {name}"):
                fn(r, t).mean().backward()
        f = feat.detach().requires_grad_(True)
        for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
            with ref.part(f"decoder + L1 fwd+bwd, {name}"):
                with autocast(torch.device("cpu"), precision):
                    out = decoder(f[None])[0]  # [C, H, W]
                masked_l1(out, target, None).backward()
        # lift.feature_pixels=0.25 (the demo's): decoder and teacher at a quarter of the pixels
        with ref.part("decoder + L1 fwd+bwd, bf16 1/4 px"):
            pixels = feature_pixels(h, w, 0.25, seed=len(ref.steps))
            with autocast(torch.device("cpu"), "bf16"):
                out = decode_at(f, decoder.weight, pixels)[:, None]  # [C, 1, P]
            sub = upsample_at(teacher, h, w, pixels)[:, None]  # [C, 1, P]
            masked_l1(out, sub, None).backward()
        for fused, opts in adams.items():
            for o, g in zip(opts, grads.values(), strict=True):
                o.param_groups[0]["params"][0].grad = g
            with ref.part(f"Adam steps, {'fused' if fused else 'unfused'}"):
                for o in opts:
                    o.step()
    table_ref = ref.medians()

    # one grow/prune at a refine step (on a copy: it changes N); amortised over the schedule
    refine_step = next(
        s for s in range(c.refine_start + 1, c.steps) if s % c.refine_every == 0
    )  # the strategy's first refine step
    refines = sum(
        1 for s in range(c.refine_start + 1, min(c.refine_stop, c.steps)) if s % c.refine_every == 0
    )
    copy = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    )
    copy_opts = make_optimizers(copy, cfg, extent)
    rstate = strategy.initialize_state(scene_scale=extent)
    for st in (refine_step - 1, refine_step):  # one step to set up the statistics, then refine
        rgb, feat, _, info = render(copy, viewmat, K, w, h, c.sh_degree, "auto")
        strategy.step_pre_backward(copy, copy_opts, rstate, st, info)
        (rgb.sum() + feat.sum()).backward()
        if st < refine_step:
            strategy.step_post_backward(copy, copy_opts, rstate, st, info, packed=False)
    # a tenth of the seen Gaussians above the growth threshold, so grow has work as mid-schedule
    seen = rstate["count"] > 0
    fast = torch.rand(int(seen.sum()), generator=gen) < 0.1
    rstate["grad2d"][seen] = c.grow_grad2d * 2 * rstate["count"][seen] * fast
    w0, c0 = time.perf_counter(), time.process_time()
    strategy.step_post_backward(copy, copy_opts, rstate, refine_step, info, packed=False)
    refine = (time.perf_counter() - w0, time.process_time() - c0)
    return {
        "size": size,
        "gaussians": n,
        "image": f"{w}x{h}",
        "tokens": f"{tw // PATCH}x{th // PATCH}",
        "threads": threads,
        "parts": table,
        "backward_split": table_bwd,
        "changes": table_ref,
        "refine": refine,
        "refines_per_schedule": refines,
        "schedule_steps": c.steps,
        "gaussians_after_refine": len(copy["means"]),
    }


def stage2(steps: int) -> dict[str, object]:
    """Median per-part seconds of one stage-2 step at the demo size (batch 2, ViT-S/14)."""
    n, _, _, tw, th, _ = SIZES["demo"]
    gen = torch.Generator().manual_seed(1)
    params = synthetic_params(n, tw, th, gen)
    g = activated(params)
    decoder = make_decoder(D, 384).requires_grad_(False)
    scene = LiftedScene(gaussians=g, decoder=decoder, meta={})
    viewmat, K = camera(tw, th)
    torch.manual_seed(0)
    backbone = Backbone("dinov2", weights="random").train().requires_grad_(True)
    grid = backbone.token_grid(th, tw)
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-5, weight_decay=1e-4, fused=True)
    images = torch.rand(2, 3, th, tw, generator=gen)  # [B, 3, H, W]
    mask = torch.ones(2, *grid)  # [B, h, w]
    clock = Clock()
    for _ in range(steps + 1):
        clock.new_step()
        targets = []
        for _b in range(2):
            with torch.no_grad():
                with clock.part("render targets"):
                    out, _, _ = rasterization(
                        g["means"],
                        g["quats"],
                        g["scales"],
                        g["opacities"],
                        g["features"],
                        viewmat[None],
                        K[None],
                        tw,
                        th,
                    )  # [1, H, W, D]
                rendered = out.permute(0, 3, 1, 2)  # [1, D, H, W]
                with clock.part("decode"):
                    targets.append(decode_to_tokens(rendered, scene.decoder.weight, grid))
        target = torch.cat(targets)  # [B, C, h, w]
        for name, bf16 in (("ViT fwd+bwd", False), ("(ViT fwd+bwd, bf16 autocast)", True)):
            with clock.part(name):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    tokens = backbone(backbone.preprocess(images))  # [B, C, h, w]
                masked_l1(tokens.float(), target, mask).backward()
            if bf16:
                opt.zero_grad(set_to_none=True)
            else:
                with clock.part("clip + AdamW"):
                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 0.1)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    return {"image": f"{tw}x{th}", "tokens": f"{grid[1]}x{grid[0]}", "parts": clock.medians()}


def print_stage1(r: dict[str, object]) -> None:
    parts: dict[str, tuple[float, float]] = r["parts"]  # type: ignore[assignment]
    total = sum(v[0] for v in parts.values())
    total_cpu = sum(v[1] for v in parts.values())
    refine_w, refine_c = r["refine"]  # type: ignore[misc]
    per = r["refines_per_schedule"] / r["schedule_steps"]  # type: ignore[operator]
    print(
        f"\nstage 1 step, {r['size']}: {r['gaussians']} Gaussians, {r['image']}, D={D}, C=384, "
        f"teacher grid {r['tokens']}, {r['threads']} threads"
    )
    print(f"  {'part':<34}{'wall s':>9}{'CPU s':>9}{'% wall':>8}")
    for k, (w, c) in parts.items():
        print(f"  {k:<34}{w:>9.4f}{c:>9.4f}{100 * w / total:>7.1f}%")
    print(f"  {'step total':<34}{total:>9.4f}{total_cpu:>9.4f}")
    for k, (w, c) in r["backward_split"].items():  # type: ignore[union-attr]
        print(f"    of which {k + ' (alone)':<25}{w:>9.4f}{c:>9.4f}{100 * w / total:>7.1f}%")
    print("  this branch's changes, side by side (same inputs, interleaved):")
    for k, (w, c) in r["changes"].items():  # type: ignore[union-attr]
        print(f"    {k:<32}{w:>9.4f}{c:>9.4f}")
    print(
        f"  grow/prune at a refine step{'':<7}{refine_w:>9.4f}{refine_c:>9.4f}   "
        f"({r['refines_per_schedule']} in {r['schedule_steps']} steps: "
        f"{refine_w * per:.4f} s/step amortised; N -> {r['gaussians_after_refine']})"
    )


def print_stage2(r: dict[str, object]) -> None:
    parts: dict[str, tuple[float, float]] = r["parts"]  # type: ignore[assignment]
    total = sum(v[0] for k, v in parts.items() if not k.startswith("("))
    total_cpu = sum(v[1] for k, v in parts.items() if not k.startswith("("))
    print(
        f"\nstage 2 step, demo: batch 2, ViT-S/14 at {r['image']} (grid {r['tokens']}), "
        f"{SIZES['demo'][0]} Gaussians, D={D}"
    )
    print(f"  {'part':<34}{'wall s':>9}{'CPU s':>9}{'% wall':>8}")
    for k, (w, c) in parts.items():
        print(f"  {k:<34}{w:>9.4f}{c:>9.4f}{100 * w / total:>7.1f}%")
    print(f"  {'step total (fp32)':<34}{total:>9.4f}{total_cpu:>9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size (after 1 warm-up)")
    ap.add_argument("--sizes", default="demo,scannetpp", help="comma list of: " + ",".join(SIZES))
    ap.add_argument("--no-stage2", action="store_true", help="skip the stage-2 step")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"lift_step: unknown size(s) {unknown}; choose from {list(SIZES)}")
    threads = torch.get_num_threads()
    results: dict[str, object] = {"stage1": [], "stage2": None}
    for s in sizes:
        r = stage1(s, args.steps, threads)
        print_stage1(r)
        results["stage1"].append(r)  # type: ignore[union-attr]
    if not args.no_stage2:
        r2 = stage2(max(args.steps, 2))
        print_stage2(r2)
        results["stage2"] = r2
    out = benchmark_output("lift_step")
    write_json(out, results)
    print(f"\nwrote {out} (load average {' '.join(f'{x:.1f}' for x in os_load())})")


def os_load() -> tuple[float, float, float]:
    """1/5/15-minute load averages (nan where unavailable)."""
    try:
        import os

        return os.getloadavg()
    except OSError:
        return (math.nan,) * 3


if __name__ == "__main__":
    main()
