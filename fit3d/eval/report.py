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
`eval/depth/rmse@demo_006`, over that group's views); `verdicts` (`fit3d.eval.verdict`) holds
each comparison's mean per-room difference and 95% room bootstrap interval, and the report opens
with them.

Spread = sample standard deviation over the probe seeds (0 for the deterministic
correspondence probe). Changes are relative to the `original` row.
"""

from __future__ import annotations

import io
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


def markdown(results: dict, forest: str = "") -> str:
    """The verdict box (with the picture `forest`, a file name, if given), then one table per
    probe: rows = feature sets, columns = that probe's metrics."""
    sets, metrics = results["feature_sets"], results["metrics"]
    lines = [verdict(results), ""]
    if forest:
        lines += [f"![differences and their room intervals]({forest})", ""]
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
    return "\n".join(lines)


COMPARISON_TITLES = {
    ("fine-tuned", "original"): "fine-tuned - original",
    ("assembled", "original"): "assembled - original",
    ("assembled", "control"): "assembled - control",
}
"""How the verdict names each comparison A - B."""


def metric_label(key: str) -> str:
    """`seg mIoU %`, `corr R@10 30-60deg %`, ... for a metric key."""
    probe = key.split("/")[1].replace("_dpt", " (DPT)")
    return f"{probe} {METRICS[key][0]}"


def _signed(value: float, scale: float) -> str:
    """A difference in display units: 2 decimals for percentages, 3 for metres and degrees."""
    digits = 2 if scale == 100.0 or abs(value * scale) >= 10 else 3
    return f"{value * scale:+.{digits}f}"


def verdict_rows(results: dict) -> list[dict]:
    """The verdicts of results.json as display rows: comparison, metric, difference, interval
    (display units, sign as A - B), rooms, word."""
    rows = []
    for v in results.get("verdicts") or []:
        scale = METRICS[v["key"]][2]
        finite = v["lo"] is not None and not math.isnan(v["lo"])
        interval = f"[{_signed(v['lo'], scale)}, {_signed(v['hi'], scale)}]" if finite else "-"
        rows.append(
            {
                "comparison": COMPARISON_TITLES.get((v["a"], v["b"]), f"{v['a']} - {v['b']}"),
                "metric": metric_label(v["key"])
                + (" (higher is better)" if METRICS[v["key"]][1] else " (lower is better)"),
                "difference": _signed(v["diff"], scale),
                "interval": interval,
                "rooms": v["rooms"],
                "word": v["word"],
                "key": v["key"],
            }
        )
    return rows


def verdict_summary(results: dict) -> str:
    """One sentence per comparison: on which metrics A is better or worse than B (the room
    interval excludes zero), and how many show no clear difference."""
    rows = verdict_rows(results)
    if not rows:
        if "assembled" not in results["metrics"] and "fine-tuned" not in results["metrics"]:
            return "No fine-tuned features: no comparison was run."
        return "No verdict: the test split has fewer than 2 groups (rooms) or no headline metric."
    rooms = max(r["rooms"] for r in rows)
    out = [f"Verdict over {rooms} test rooms (95% paired bootstrap intervals over rooms):"]
    for title in dict.fromkeys(r["comparison"] for r in rows):
        mine = [r for r in rows if r["comparison"] == title]
        said = []
        for word in ("better", "worse"):
            names = [r["metric"].split(" (")[0] for r in mine if r["word"] == word]
            if names:
                said.append(f"{word} on {', '.join(names)}")
        unclear = sum(r["word"] == "no clear difference" for r in mine)
        if unclear:
            said.append(f"no clear difference on {unclear} of {len(mine)} metrics")
        few = sum(r["word"] == "too few rooms" for r in mine)
        if few:
            said.append(f"too few rooms to judge {few}")
        out.append(f"{title}: " + "; ".join(said) + ".")
    return " ".join(out)


def verdict(results: dict) -> str:
    """The verdict box in markdown: the summary, then one row per comparison and metric."""
    rows = verdict_rows(results)
    lines = ["## Verdict", "", verdict_summary(results)]
    if rows:
        lines += [
            "",
            "| comparison | metric | difference | 95% interval | rooms | verdict |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['comparison']} | {r['metric']} | {r['difference']} | {r['interval']} | "
            f"{r['rooms']} | {r['word']} |"
            for r in rows
        ]
    return "\n".join(lines)


def fmt_lr(lr: float) -> str:
    """A learning rate as people write them: 3e-3, 1.5e-4, 0.1 stays 1e-1."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _listing(values) -> str:
    return ", ".join(str(v) for v in values)


def _chosen_lrs(lrs: dict) -> str:
    """'seg 3e-3 (original, fine-tuned), 1.5e-3 (assembled, control); depth ...'."""
    by_probe: dict[str, dict[str, list[str]]] = {}
    for s, per_probe in lrs.items():
        for probe, lr in (per_probe or {}).items():
            by_probe.setdefault(probe, {}).setdefault(fmt_lr(lr), []).append(s)
    return "; ".join(
        f"{probe} " + ", ".join(f"{lr} ({', '.join(sets)})" for lr, sets in chosen.items())
        for probe, chosen in by_probe.items()
    )


def protocol(results: dict) -> str:
    """Plain sentences saying how the numbers were made (for results.md and results.html)."""
    ec, prov = results["config"]["eval"], results["provenance"]
    name = results.get("protocol", ec.get("protocol", "fast"))
    data = results.get("dataset") or {}
    batch16 = ec.get("paper_batch_size", 16)
    seg_iters, depth_iters = ec.get("seg_iters", 40000), ec.get("depth_iters", 38400)
    dpt_lr, dpt_epochs = ec.get("dpt_lr", 5e-4), ec.get("dpt_epochs", 10)
    dpt_hidden, corr_block = ec.get("dpt_hidden", 512), ec.get("corr_block", -1)
    views = prov["views"]
    val = ""
    if views.get("val"):
        val = (
            f" Learning rates were picked on {views['val']} views of "
            f"{len(prov.get('val_scenes') or [])} validation groups ({data.get('val_split')} "
            "split), neither train nor test."
        )
    where = (
        f"trained on {views['train']} views ({len(prov['train_scenes'])} groups) of "
        f"{data.get('name', 'the scenes')} {data.get('train_split') or 'train'} and scored on "
        f"{views['test']} views ({len(prov['test_scenes'])} groups) of its "
        f"{data.get('test_split') or 'val'} split; mean ± sample s.d. over probe seeds "
        f"{_listing(ec['seeds'])}; change vs original in brackets.{val}"
    )
    if name == "paper":
        text = (
            "Protocol: paper. Segmentation and depth probes follow FiT3D's evaluation configs "
            "(augmented crops with features recomputed each iteration, 40k / 38.4k iterations at "
            f"global batch 16 scaled to {batch16} ({seg_iters} / {depth_iters} at batch 16 "
            "here), AdamW, poly / cosine with warm-up, slide inference 512/341, flip test-time "
            "augmentation, no checkpoint picked). "
        )
    else:
        chosen = _chosen_lrs(results.get("lr") or {})
        text = (
            f"Protocol: fast (cached features; {ec['epochs']} epochs at batch "
            f"{ec['batch_size']}; learning rate picked from {_listing(map(fmt_lr, ec['lrs']))}"
            + (f", chosen: {chosen}" if chosen else "")
            + "); the list below says how it differs from protocol=paper. "
        )
    text += (
        f"Heads {where} Segmentation reads the last block after the final norm; linear depth "
        "and normals read it before the final norm (depth also gets the original CLS token). "
        "DPT heads (Probe3D) read the raw outputs of the four quarter blocks and train with "
        f"Probe3D's schedule (AdamW lr {fmt_lr(dpt_lr)}, {dpt_epochs} epochs, 15% warm-up, "
        f"cosine; width {dpt_hidden}). Correspondence (zero-shot, as Probe3D computes it): raw "
        f"output of block {corr_block}, no final norm; depth and K at 1/4 resolution, matches "
        "only between pixels with valid depth in both views, ratio-test weight, top "
        f"{ec['top_k']} matches of up to {ec['pairs_per_scene']} covisible pairs per test group; "
        "errors and the 5/10/20 px thresholds in 1/4-resolution pixels (x4 at full "
        "resolution); recall@10 binned by relative rotation [0,15), [15,30), [30,60), [60,180) "
        "degrees (on NAVI, Probe3D's NAVI protocol: recall of the 3D error at 1/2/5 cm and of "
        "the 2D error at 5/25/50 full-resolution px, recall@2cm binned [0,30) ... [90,120)). "
        "Verdicts: per test room, each set's score (probe seeds averaged), the paired "
        "difference, its mean over rooms and a 95% percentile bootstrap interval resampling "
        "rooms; 'better' or 'worse' only where the interval excludes zero, and only over 5 or "
        "more rooms ('too few rooms' below that).\n"
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


def forest_plot(results: dict) -> bytes | None:
    """PNG of every verdict's difference and room interval: one row per metric (its own units),
    one marker per comparison, zero marked; None without verdicts."""
    from matplotlib.figure import Figure

    rows = verdict_rows(results)
    if not rows:
        return None
    keys = list(dict.fromkeys(r["key"] for r in rows))
    comparisons = list(dict.fromkeys(r["comparison"] for r in rows))
    colors = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(7.5, 0.62 * len(keys) + 0.9))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        scale = METRICS[key][2]
        for k, comp in enumerate(comparisons):
            r = next((r for r in rows if r["key"] == key and r["comparison"] == comp), None)
            v = next(
                (v for v in results["verdicts"] if v["key"] == key
                 and COMPARISON_TITLES.get((v["a"], v["b"])) == comp),
                None,
            )  # fmt: skip
            if r is None or v is None or v["lo"] is None:
                continue
            y = len(comparisons) - 1 - k
            lo, hi, d = v["lo"] * scale, v["hi"] * scale, v["diff"] * scale
            ax.plot([lo, hi], [y, y], color=colors[k], lw=2)
            ax.plot([d], [y], "o", color=colors[k], ms=5, label=comp if key == keys[0] else None)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_yticks([])
        ax.set_ylim(-0.7, len(comparisons) - 0.3)
        better = "right" if METRICS[key][1] else "left"
        ax.set_ylabel(metric_label(key), rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"better to the {better}", fontsize=6, loc="right", pad=1, color="0.4")
    fig.legend(loc="upper center", ncol=len(comparisons), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


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
    """Write results.json (NaN as null), results.md, results.png and forest.png (the verdicts'
    intervals); return the markdown."""
    write_json(out_dir / "results.json", _json_safe(results))
    forest = forest_plot(results)
    if forest is not None:
        with atomic_path(out_dir / "forest.png") as tmp:
            tmp.write_bytes(forest)
    text = markdown(results, "forest.png" if forest is not None else "")
    notes = "".join(f"- {n}\n" for n in results.get("notes", []))
    header = f"# FiT3D evaluation: {results['provenance'].get('backbone', '')}\n\n"
    with atomic_path(out_dir / "results.md") as tmp:
        body = header + text + "\n\n## How these numbers were made\n\n" + protocol(results)
        tmp.write_text(body + ("\nNotes:\n" + notes if notes else ""))
    bar_chart(out_dir / "results.png", results)
    return text
