"""The evaluation report: results.json, results.md (markdown tables), results.png, pca.png (the
evaluator also writes results.html from the same dict, `fit3d.eval.html`).

`results` (what `fit3d.eval` builds and results.json stores)::

    {"feature_sets": [...], "metrics": {set: {"eval/seg/miou": {"mean", "std", "values"}, ...}},
     "lr": {set: {probe: lr}}, "notes": [...], "provenance": {...}, "config": {...},
     "protocol": "fast" | "paper",
     "as_published": [the originals' quirks reproduced], "fixes": [the known fixes applied],
     "dataset": {"name", "train_split", "test_split"},
     "paper": {"original" | "assembled": {metric key: published value}}}

Metric keys: `eval/<probe>/<metric>` with probe seg, depth, normals (linear heads), depth_dpt,
normals_dpt (Probe3D's DPT head, `eval.head=dpt|both`) and corr (`METRICS`). `paper` holds the
published FiT3D numbers of the same backbone on the same dataset (original = before, assembled =
after FiT3D; empty when the paper has none); the markdown puts them beside ours.
`provenance` keeps `train_scenes` / `test_scenes` (the groups of each split), `views`, `device`,
`seconds`, `cpu_seconds` and the weights of both backbones. With 2 to 64 test groups
(scenes), each probe's headline metric is also kept per group as `<key>@<group>` (e.g.
`eval/depth/rmse@demo_006`, over that group's views); the verdict counts the groups where the
assembled features win, since a few test scenes can decide a comparison.

Spread = sample standard deviation over the probe seeds (0 for the deterministic
correspondence probe). Changes are relative to the `original` row.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from torch import Tensor

from fit3d.io import atomic_path, write_json
from fit3d.viz import pca_rgb, save_figure

_DEPTH_COLUMNS = {
    "rmse": ("RMSE m", False, 1.0),
    "absrel": ("AbsRel", False, 1.0),
    "sqrel": ("SqRel", False, 1.0),
    "rmse_log": ("RMSE log", False, 1.0),
    "delta1": ("delta1 %", True, 100.0),
    "delta2": ("delta2 %", True, 100.0),
    "delta3": ("delta3 %", True, 100.0),
}
_NORMAL_COLUMNS = {
    "within_11": ("<11.25deg %", True, 1.0),
    "within_22": ("<22.5deg %", True, 1.0),
    "within_30": ("<30deg %", True, 1.0),
    "ang_rmse": ("ang. RMSE deg", False, 1.0),
}
METRICS: dict[str, tuple[str, bool, float]] = {
    "eval/seg/miou": ("mIoU %", True, 100.0),
    "eval/seg/macc": ("mAcc %", True, 100.0),
    "eval/seg/aacc": ("aAcc %", True, 100.0),
    **{f"eval/depth/{k}": v for k, v in _DEPTH_COLUMNS.items()},
    **{f"eval/depth_dpt/{k}": v for k, v in _DEPTH_COLUMNS.items()},
    **{
        f"eval/depth_dpt/aligned_{k}": (f"aligned {_DEPTH_COLUMNS[k][0]}", *_DEPTH_COLUMNS[k][1:])
        for k in ("rmse", "delta1", "delta2", "delta3")
    },
    **{f"eval/normals/{k}": v for k, v in _NORMAL_COLUMNS.items()},
    **{f"eval/normals_dpt/{k}": v for k, v in _NORMAL_COLUMNS.items()},
    "eval/corr/recall_5px": ("R@5px %", True, 100.0),
    "eval/corr/recall_10px": ("R@10px %", True, 100.0),
    "eval/corr/recall_20px": ("R@20px %", True, 100.0),
    "eval/corr/recall_10px_rot0-15": ("R@10 0-15deg %", True, 100.0),
    "eval/corr/recall_10px_rot15-30": ("R@10 15-30deg %", True, 100.0),
    "eval/corr/recall_10px_rot30-60": ("R@10 30-60deg %", True, 100.0),
    "eval/corr/recall_10px_rot60-180": ("R@10 60-180deg %", True, 100.0),
    **{f"eval/corr/recall_{k}": (f"R@{k} %", True, 100.0) for k in ("1cm", "2cm", "5cm")},
    **{f"eval/corr/recall2d_{k}px": (f"R@{k}px full-res %", True, 100.0) for k in (5, 25, 50)},
    **{
        f"eval/corr/recall_2cm_rot{lo}-{hi}": (f"R@2cm {lo}-{hi}deg %", True, 100.0)
        for lo, hi in ((0, 30), (30, 60), (60, 90), (90, 120))
    },
}
"""Metric key -> (column label, higher is better, display scale). Correspondence pixels are
pixels of the 1/4-resolution image (Probe3D's units)."""
HEADLINE = ("eval/seg/miou", "eval/depth/rmse", "eval/corr/recall_10px", "eval/corr/recall_2cm")
"""The metrics on which the assembled features should beat the original (FiT3D's claim)."""
PROBE_TITLES = {
    "seg": "Semantic segmentation (linear)",
    "depth": "Depth (linear, 256 bins)",
    "depth_dpt": "Depth (Probe3D DPT head on 4 blocks)",
    "normals": "Surface normals (linear, angular NLL)",
    "normals_dpt": "Surface normals (Probe3D DPT head on 4 blocks)",
    "corr": "Multiview correspondence (zero-shot, Probe3D; px at 1/4 resolution)",
}
FAST_DIFFERENCES = (
    "features are cached once per view at the dataset resolution: no resize/crop/flip/colour "
    "augmentation, whole-image inference (no slide windows, no flip test-time augmentation)",
    "linear heads train for eval.epochs epochs at eval.batch_size with AdamW (wd 1e-4), 10% "
    "linear warm-up then poly 0.9 (FiT3D: 40k / 38.4k iterations at batch 16, poly / cosine)",
    "the learning rate is picked from eval.lrs on a validation part of the train split, per "
    "feature set or (eval.sweep_each_set=false) on the first set, then scaled by width (FiT3D: "
    "fixed 1e-3 segmentation, 1e-4 depth)",
    "the depth head keeps a BatchNorm before its conv and has no SigLoss warm-up, no gradient "
    "clipping and no OneCycle momentum (FiT3D's has none of the BatchNorm, all of the rest)",
    "losses may use every eval.label_stride-th label pixel; metrics use all pixels",
)
"""How protocol=fast differs from protocol=paper (printed in every fast report)."""


def summarize(values: list[float]) -> dict:
    """{"mean", "std" (sample, 0 for one value), "values"} of per-seed metric values."""
    finite = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def _cell(stat: dict | None, base: dict | None, scale: float) -> str:
    if stat is None or math.isnan(stat["mean"]):
        return "-"
    digits = 4 if scale == 1.0 and abs(stat["mean"]) < 10 else 2
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat["std"] > 0:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    if base is not None and base is not stat and not math.isnan(base["mean"]):
        text += f" ({(stat['mean'] - base['mean']) * scale:+.{digits}f})"
    return text


def markdown(results: dict) -> str:
    """One table per probe: rows = feature sets, columns = that probe's metrics."""
    sets, metrics = results["feature_sets"], results["metrics"]
    lines = []
    for probe, title in PROBE_TITLES.items():
        keys = [k for k in METRICS if k.split("/")[1] == probe]
        keys = [k for k in keys if any(k in metrics.get(s, {}) for s in sets)]
        if not keys:
            continue
        lines += [f"### {title}", ""]
        lines.append("| features | " + " | ".join(METRICS[k][0] for k in keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for s in sets:
            row = metrics.get(s, {})
            base = metrics.get("original", {})
            cells = [_cell(row.get(k), base.get(k), METRICS[k][2]) for k in keys]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for which, published in (results.get("paper") or {}).items():
            if any(k in published for k in keys):
                cells = [
                    _cell(summarize([published[k]]), None, METRICS[k][2]) if k in published
                    else "-"
                    for k in keys
                ]  # fmt: skip
                label = "FiT3D paper, " + ("original" if which == "original" else "FiT3D")
                lines.append(f"| *{label}* | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(verdict(results))
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """On how many headline metrics the assembled features beat the original, and the control
    (original ++ original: a gain over the control is more than extra width)."""
    metrics = results["metrics"]
    if "assembled" not in metrics or "original" not in metrics:
        return "No fine-tuned features: the FiT3D comparison (assembled vs original) was not run."
    lines = []
    for ref in ("original", "control"):
        if ref not in metrics:
            continue
        parts, wins, total = [], 0, 0
        for key in HEADLINE:
            a, o = metrics["assembled"].get(key), metrics[ref].get(key)
            if a is None or o is None or math.isnan(a["mean"]) or math.isnan(o["mean"]):
                continue
            label, higher, scale = METRICS[key]
            delta = (a["mean"] - o["mean"]) * scale
            spread = max(a["std"], o["std"]) * scale
            total += 1
            wins += delta > 0 if higher else delta < 0
            parts.append(
                f"{label} {delta:+.4g} (seed spread {spread:.2g}"
                + _by_group(metrics["assembled"], metrics[ref], key)
                + ")"
            )
        if total:  # a run without seg, depth or correspondence has no headline metric
            lines.append(
                f"Assembled vs {ref}: better on {wins} of {total} headline metrics: "
                + "; ".join(parts)
            )
    return "\n\n".join(lines) or "No headline metric (seg, depth, corr) in this run."


def _by_group(a: dict, o: dict, key: str) -> str:
    """'; better in k of n test groups: d1 / d2 / ...' from the per-group `key@group` entries
    of two feature sets (group deltas as mean ± s.d. beyond 6 groups); '' when there are none."""
    label, higher, scale = METRICS[key]
    groups = [k for k in a if k.startswith(key + "@") and k in o]
    deltas = [(a[k]["mean"] - o[k]["mean"]) * scale for k in groups]
    deltas = [d for d in deltas if not math.isnan(d)]
    if len(deltas) < 2:
        return ""
    wins = sum(d > 0 if higher else d < 0 for d in deltas)
    if len(deltas) <= 6:
        each = " / ".join(f"{d:+.3g}" for d in deltas)
    else:
        each = f"{statistics.fmean(deltas):+.3g} ± {statistics.stdev(deltas):.2g}"
    return f"; better in {wins} of {len(deltas)} test groups: {each}"


def protocol(results: dict) -> str:
    """A few lines saying how the numbers were made (for results.md and results.html)."""
    ec, prov = results["config"]["eval"], results["provenance"]
    name = results.get("protocol", ec.get("protocol", "fast"))
    data = results.get("dataset") or {}
    lrs = {s: lr for s, lr in results["lr"].items() if lr}
    batch16 = ec.get("paper_batch_size", 16)
    seg_iters, depth_iters = ec.get("seg_iters", 40000), ec.get("depth_iters", 38400)
    dpt_lr, dpt_epochs = ec.get("dpt_lr", 5e-4), ec.get("dpt_epochs", 10)
    dpt_hidden, corr_block = ec.get("dpt_hidden", 512), ec.get("corr_block", -1)
    where = (
        f"trained on {prov['views']['train']} views ({len(prov['train_scenes'])} groups) of "
        f"{data.get('name', 'the scenes')} {data.get('train_split') or 'train'} and scored on "
        f"{prov['views']['test']} views ({len(prov['test_scenes'])} groups) of its "
        f"{data.get('test_split') or 'val'} split; mean ± sample s.d. over seeds {ec['seeds']}; "
        "change vs original in brackets."
    )
    if name == "paper":
        text = (
            "Protocol: paper. Segmentation and depth probes follow FiT3D's evaluation configs "
            "(augmented crops with features recomputed each iteration, 40k / 38.4k iterations at "
            f"global batch 16 scaled to {batch16} ({seg_iters} / {depth_iters} at batch 16 "
            "here), AdamW, poly / cosine with warm-up, slide inference 512/341, flip test-time "
            "augmentation, no checkpoint picked); "
        )
    else:
        text = (
            f"Protocol: fast (cached features; {ec['epochs']} epochs, batch {ec['batch_size']}, "
            f"learning rate from {ec['lrs']} picked on a validation part of the train split, "
            f"chosen: {lrs}); see the list below for how it differs from protocol=paper. "
        )
    text += (
        f"Heads {where} Segmentation reads the last block after the final norm; linear depth "
        "and normals read it before the final norm (depth also gets the original CLS token). "
        "DPT heads (Probe3D) read the raw outputs of the four quarter blocks and train with "
        f"Probe3D's schedule (AdamW lr {dpt_lr}, {dpt_epochs} epochs, 15% warm-up, cosine; "
        f"width {dpt_hidden}). Correspondence (zero-shot, as Probe3D computes it): raw output of "
        f"block {corr_block}, no final norm; depth and K at 1/4 resolution, matches only "
        "between pixels with valid depth in both views, ratio-test weight, top "
        f"{ec['top_k']} matches of up to {ec['pairs_per_scene']} covisible pairs per test group; "
        "errors and the 5/10/20 px thresholds in 1/4-resolution pixels (x4 at full "
        "resolution); recall@10 binned by relative rotation [0,15), [15,30), [30,60), [60,180) "
        "degrees (on NAVI, Probe3D's NAVI protocol: recall of the 3D error at 1/2/5 cm and of "
        "the 2D error at 5/25/50 full-resolution px, recall@2cm binned [0,30) ... [90,120)).\n"
    )
    for title, items in (
        ("As published (the originals' quirks this run reproduced)", "as_published"),
        ("Fixes applied", "fixes"),
    ):
        if results.get(items):
            text += f"\n{title}:\n" + "".join(f"- {q}\n" for q in results[items])
    if name != "paper":
        text += "\nHow protocol=fast differs from protocol=paper (FiT3D's configs):\n"
        text += "".join(f"- {d}\n" for d in FAST_DIFFERENCES)
    return text


def bar_chart(path: Path, results: dict) -> None:
    """results.png: one bar chart per metric (mean over seeds, error bar = spread)."""
    sets, metrics = results["feature_sets"], results["metrics"]
    keys = [k for k in METRICS if any(k in metrics.get(s, {}) for s in sets)]
    if not keys:
        return
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.colormaps["tab10"].colors
    for ax, key in zip(axes.flat, keys, strict=False):
        label, higher, scale = METRICS[key]
        vals = [metrics.get(s, {}).get(key, {"mean": math.nan, "std": 0.0}) for s in sets]
        ax.bar(
            range(len(sets)),
            [v["mean"] * scale for v in vals],
            yerr=[v["std"] * scale for v in vals],
            color=colors[: len(sets)],
            capsize=3,
        )
        ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right", fontsize=7)
        ax.set_title(
            f"{key.removeprefix('eval/')} ({'higher' if higher else 'lower'} better)", fontsize=8
        )
        ax.set_ylabel(label, fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def pca_panel(path: Path, images: list[Tensor], maps: dict[str, list[Tensor]]) -> None:
    """pca.png: columns = held-out views, rows = the image then each feature set's PCA colours."""
    rows = 1 + len(maps)
    cols = len(images)
    fig = Figure(figsize=(2.6 * cols, 1.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, img in enumerate(images):
        axes[0, c].imshow(img.numpy())
    for r, (name, feats) in enumerate(maps.items(), start=1):
        for c, rgb in enumerate(pca_rgb(feats)):
            axes[r, c].imshow(rgb.numpy(), interpolation="nearest")
        axes[r, 0].set_ylabel(name, fontsize=8)
    axes[0, 0].set_ylabel("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _json_safe(obj):
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(out_dir: Path, results: dict) -> str:
    """Write results.json (NaN as null), results.md and results.png; return the markdown."""
    text = markdown(results)
    notes = "".join(f"- {n}\n" for n in results.get("notes", []))
    header = f"# FiT3D evaluation: {results['provenance'].get('backbone', '')}\n\n"
    write_json(out_dir / "results.json", _json_safe(results))
    with atomic_path(out_dir / "results.md") as tmp:
        body = header + text + "\n\n" + protocol(results)
        tmp.write_text(body + ("\nNotes:\n" + notes if notes else ""))
    bar_chart(out_dir / "results.png", results)
    return text
