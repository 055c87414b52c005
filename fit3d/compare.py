"""`make compare`: stage-2 objectives and adapters side by side, scored by one evaluator.

For every variant `objective/adapter` (`finetune.objective`, `finetune.adapter`): one stage-2 run
from the same stage-1 run with the same schedule (run name `cmp-<name>-<objective>-<adapter>`; in
the comparison named `default`, `fit3d/full` is the plain `run.name`, so `make demo`'s own
fine-tune is reused), then one evaluation of original vs that run's fine-tuned features
(`eval.feature_sets=[original,fine-tuned]`, run name `cmp-<name>-<variant>`; every variant shares
one feature cache, so the original's features are extracted once). Each stage is its own process
(`python -m ...`), as `make` runs it; a finished run is skipped by the stage itself.

Output, `<run.out>/compare/<name>/`: `compare.json` (per variant: its fine-tune meta numbers, its
verdicts fine-tuned - original with 95% room intervals, its fine-tuned scores), `compare.md` (one
table) and `compare.png` (the differences and their intervals, one panel per metric). Nothing is
tuned here: every variant runs with the settings given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fit3d.config import Config
from fit3d.errors import UserError, cli_entry
from fit3d.io import atomic_path, write_json

KEYS = (
    "eval/seg/miou",
    "eval/depth/rmse",
    "eval/corr/recall_10px",
    "eval/corr/recall_10px_rot0-15",
    "eval/corr/recall_10px_rot15-30",
    "eval/corr/recall_10px_rot30-60",
    "eval/corr/recall_10px_rot60-180",
)
"""Metrics of the comparison table and plot (those of the default demo verdict)."""


@dataclass(frozen=True)
class Variant:
    """One stage-2 setting compared."""

    objective: str
    adapter: str

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.adapter}".replace("+", "_")

    @property
    def label(self) -> str:
        return f"{self.objective} / {self.adapter}"

    def finetune_run(self, plain: str, compare: str) -> str:
        """Stage-2 run name: `cmp-<compare>-<variant>`; for FiT3D as it is in the comparison
        named `default`, `plain` (the run's own `run.name`: `make demo`'s fine-tune is reused)."""
        if (self.objective, self.adapter) == ("fit3d", "full") and compare == "default":
            return plain
        return f"cmp-{compare}-{self.name}"


def parse_variants(text: str) -> list[Variant]:
    """`fit3d/full,equivariance/lora` (checked by `fit3d.cli.compare_args`) -> variants."""
    return [Variant(*t.strip().split("/")) for t in text.split(",") if t.strip()]


def _stage(module: str, args: list[str]) -> float:
    """Run `python -m module args` (output streamed); its wall seconds, or a UserError."""
    print(f"compare: python -m {module} {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], check=False)
    if done.returncode != 0:
        raise UserError(f"compare: `python -m {module}` failed (exit {done.returncode}); see above")
    return time.perf_counter() - t0


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"compare: cannot read {path}: {e}") from None


def collect(variant: Variant, meta: dict, results: dict, eval_seconds: float) -> dict[str, Any]:
    """One variant's row: fine-tune numbers, verdicts fine-tuned - original, fine-tuned scores."""
    verdicts = {
        v["key"]: {k: v[k] for k in ("diff", "lo", "hi", "rooms", "word")}
        for v in results.get("verdicts", [])
        if (v["a"], v["b"]) == ("fine-tuned", "original") and v["key"] in KEYS
    }
    metrics = results.get("metrics", {})
    means = {
        s: {k: metrics[s][k]["mean"] for k in KEYS if k in metrics.get(s, {})}
        for s in ("original", "fine-tuned")
    }
    return {
        "variant": variant.label,
        "objective": variant.objective,
        "adapter": variant.adapter,
        "finetune_seconds": meta.get("seconds"),
        "steps": meta.get("steps"),
        "trainable_params": meta.get("trainable_params"),
        "heldout_masked_l1": (meta.get("heldout") or {}).get("masked_l1", {}).get("finetuned"),
        "weights_sha256": meta.get("weights_sha256"),
        "eval_seconds": round(eval_seconds, 1),
        "verdicts": verdicts,
        "original": means["original"],
        "fine-tuned": means["fine-tuned"],
    }


def run(
    cfg: Config, presets: list[str], overrides: list[str], variants: list[Variant], name: str
) -> dict[str, Any]:
    """Fine-tune and evaluate every variant (module docstring); returns compare.json's dict."""
    out = Path(cfg.run.out) / "compare" / name
    out.mkdir(parents=True, exist_ok=True)
    base = [a for p in presets for a in ("--preset", p)] + list(overrides)
    if cfg.scenes.name == "demo":
        _stage("fit3d.scenes.demo", base)
    _stage("stage1_lift", base)
    rows = []
    for v in variants:
        ft_run = v.finetune_run(cfg.run.name, name)
        _stage("stage2_finetune", base + [
            f"run.name={ft_run}", f"finetune.objective={v.objective}",
            f"finetune.adapter={v.adapter}",
        ])  # fmt: skip
        ev_run = f"cmp-{name}-{v.name}"
        seconds = _stage("fit3d.eval", base + [
            f"run.name={ev_run}", f"eval.finetune_run={ft_run}",
            "eval.feature_sets=[original,fine-tuned]", f"eval.cache_dir={out / 'cache'}",
        ])  # fmt: skip
        meta = _read(Path(cfg.run.out) / "finetune" / ft_run / "meta.json")
        results = _read(Path(cfg.run.out) / "eval" / ev_run / "results.json")
        rows.append(collect(v, meta, results, seconds))
    report = {"name": name, "presets": presets, "overrides": overrides, "variants": rows}
    write_json(out / "compare.json", report)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(table(rows) + "\n")
    png = plot(rows)
    if png is not None:
        with atomic_path(out / "compare.png") as tmp:
            tmp.write_bytes(png)
    print(table(rows))
    print(f"compare: {out / 'compare.md'}, {out / 'compare.png'}")
    return report


def _cell(v: dict | None, scale: float) -> str:
    if v is None or v.get("lo") is None:
        return "-"
    d, lo, hi = (v[k] * scale for k in ("diff", "lo", "hi"))
    digits = 1 if scale == 100.0 else 3
    word = v["word"]
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {word}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per variant, fine-tuned - original per metric with its room interval
    and word, then the fine-tune time and trainable parameters."""
    from fit3d.eval.report import METRICS, metric_label

    heads = [metric_label(k).replace(" %", "") for k in KEYS]
    lines = [
        "| variant | " + " | ".join(heads) + " | fine-tune s | trainable params |",
        "|---|" + "---|" * (len(KEYS) + 2),
    ]
    for r in rows:
        cells = [_cell(r["verdicts"].get(k), METRICS[k][2]) for k in KEYS]
        params = r["trainable_params"]
        shown = (
            "-"
            if not isinstance(params, int)
            else (f"{params / 1e6:.2f} M" if params >= 1e6 else f"{params / 1e3:.1f} k")
        )
        secs = r["finetune_seconds"]
        took = f"{secs:.0f}" if secs is not None else "-"
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {took} | {shown} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> bytes | None:
    """PNG: one panel per metric, one row per variant: fine-tuned - original and its 95% room
    interval, zero marked; None without any interval."""
    import io

    import matplotlib
    from matplotlib.figure import Figure

    from fit3d.eval.report import METRICS, metric_label

    keys = [k for k in KEYS if any(r["verdicts"].get(k, {}).get("lo") is not None for r in rows)]
    if not keys:
        return None
    colors = matplotlib.colormaps["tab10"].colors
    cols = min(4, len(keys))
    lines = -(-len(keys) // cols)
    fig = Figure(figsize=(3.2 * cols, (0.4 * len(rows) + 1.0) * lines + 0.4))
    grid = fig.subplots(lines, cols, squeeze=False)
    for ax in grid.flat[len(keys) :]:
        ax.set_axis_off()
    for n, (ax, key) in enumerate(zip(grid.flat, keys, strict=False)):
        scale = METRICS[key][2]
        for i, r in enumerate(rows):
            v = r["verdicts"].get(key)
            if v is None or v.get("lo") is None:
                continue
            y = len(rows) - 1 - i
            ax.plot([v["lo"] * scale, v["hi"] * scale], [y, y], color=colors[i % 10], lw=2)
            ax.plot([v["diff"] * scale], [y], "o", color=colors[i % 10], ms=5)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_yticks(range(len(rows)), [r["variant"] for r in reversed(rows)], fontsize=7)
        if n % cols:
            ax.set_yticklabels([])
        better = "right" if METRICS[key][1] else "left"
        ax.set_title(f"{metric_label(key)}\n(better to the {better})", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("fine-tuned - original, 95% interval over test rooms", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """`python -m fit3d.compare [--variants a/b,...] [--name N] [--preset P]... [key=value]...`."""
    from fit3d.cli import compare_args

    cfg, presets, overrides, variants, name = compare_args(argv)
    run(cfg, presets, overrides, parse_variants(variants), name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
