"""results.html: the evaluation report as one self-contained page to open or send.

Everything is inside the file: pictures are embedded as `data:` URIs, the style is inline, there
is no script and no link, so the page makes no network request. It opens with the verdict box
(each comparison's difference and 95% room interval, in words, as a table and a forest plot),
then one table per probe (mean ± sample s.d. over seeds, change vs original, the winner of each
column marked), recall@10px per rotation bin as a plot, the PCA and bar-chart pictures, the
protocol in plain sentences and the provenance (backbone, weights sha256, commit, config).
Numbers come from the same `results` dict as results.json (see `fit3d.eval.report`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fit3d.eval.report import (
    METRICS,
    PROBE_TITLES,
    forest_plot,
    protocol,
    verdict_rows,
    verdict_summary,
)
from fit3d.io import atomic_path

ROTATION_KEYS = [k for k in METRICS if k.startswith("eval/corr/recall_10px_rot")]
"""Correspondence recall@10px per relative-rotation bin, in bin order."""
CAPTIONS = {
    "results.png": "results.png: each metric per feature set (error bar = spread over seeds)",
    "pca.png": "pca.png: held-out views and the PCA colours of each feature set's features",
}
"""Captions of the evaluator's pictures when `write_html` gets a list of paths."""
_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.winner { font-weight: bold; background: #e6f4e6; }
.delta { color: #666; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
code { font-size: 0.9em; }
#verdict { border: 2px solid #446; border-radius: 6px; padding: 0.2em 1em 0.6em; margin: 1em 0; }
#verdict h2 { margin-top: 0.4em; }
#verdict td:nth-child(2), #verdict th:nth-child(2) { text-align: left; }
td.better { background: #e6f4e6; font-weight: bold; }
td.worse { background: #f8e3e3; font-weight: bold; }
"""


def _number(stat: dict | None) -> float:
    """Mean of a metric summary; NaN when missing (null in results.json)."""
    if not stat or stat.get("mean") is None:
        return math.nan
    return float(stat["mean"])


def _digits(scale: float, mean: float) -> int:
    """Decimals shown: as results.md (4 for unscaled values under 10, else 2)."""
    return 4 if scale == 1.0 and abs(mean) < 10 else 2


def winners(results: dict, key: str) -> set[str]:
    """Feature sets with the best mean on metric `key` (all of them on a tie; none if no value)."""
    higher = METRICS[key][1]
    means = {s: _number(results["metrics"].get(s, {}).get(key)) for s in results["feature_sets"]}
    finite = {s: m for s, m in means.items() if not math.isnan(m)}
    if not finite:
        return set()
    best = max(finite.values()) if higher else min(finite.values())
    return {s for s, m in finite.items() if m == best}


def _cell(results: dict, s: str, key: str, best: set[str]) -> str:
    """One <td>: mean ± spread (change vs original); data-* attributes carry the raw values."""
    label, _, scale = METRICS[key]
    stat = results["metrics"].get(s, {}).get(key)
    mean = _number(stat)
    if math.isnan(mean):
        return f'<td data-set="{html.escape(s)}" data-key="{key}">-</td>'
    std = float(stat.get("std") or 0.0)
    n = len(stat.get("values") or [])
    d = _digits(scale, mean)
    text = f'<span class="value">{mean * scale:.{d}f}</span>'
    if std > 0:
        text += f' ± <span class="spread">{std * scale:.{d}f}</span>'
    base = _number(results["metrics"].get("original", {}).get(key))
    if s != "original" and not math.isnan(base):
        text += f' <span class="delta">({(mean - base) * scale:+.{d}f})</span>'
    cls = ' class="winner"' if s in best else ""
    attrs = (
        f'data-set="{html.escape(s)}" data-key="{key}" data-mean="{mean!r}" data-std="{std!r}" '
        f'data-scale="{scale!r}" data-digits="{d}" data-seeds="{n}"'
    )
    title = f"{label}: mean ± sample s.d. over {n} seed(s)" if n else label
    return f'<td{cls} {attrs} title="{html.escape(title)}">{text}</td>'


def tables(results: dict) -> str:
    """One HTML table per probe: rows = feature sets, columns = that probe's metrics."""
    sets, metrics = results["feature_sets"], results["metrics"]
    out = []
    for probe, title in PROBE_TITLES.items():
        keys = [k for k in METRICS if k.split("/")[1] == probe]
        keys = [k for k in keys if any(k in metrics.get(s, {}) for s in sets)]
        if not keys:
            continue
        head = "".join(
            f'<th data-key="{k}">{html.escape(METRICS[k][0])} {"↑" if METRICS[k][1] else "↓"}</th>'
            for k in keys
        )
        rows = []
        best = {k: winners(results, k) for k in keys}
        for s in sets:
            cells = "".join(_cell(results, s, k, best[k]) for k in keys)
            rows.append(f"<tr><td>{html.escape(s)}</td>{cells}</tr>")
        out.append(
            f"<h3>{html.escape(title)}</h3>\n<table><tr><th>features</th>{head}</tr>\n"
            + "\n".join(rows)
            + "</table>"
        )
    return "\n".join(out)


def data_uri(png: bytes) -> str:
    """PNG bytes -> `data:image/png;base64,...`."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def rotation_plot(results: dict) -> bytes | None:
    """PNG of recall@10px per rotation bin, one line per feature set (None without values)."""
    from matplotlib.figure import Figure

    sets = results["feature_sets"]
    series = {
        s: [_number(results["metrics"].get(s, {}).get(k)) * 100 for k in ROTATION_KEYS]
        for s in sets
    }
    if all(math.isnan(v) for vals in series.values() for v in vals):
        return None
    bins = [k.split("rot")[-1] + "°" for k in ROTATION_KEYS]
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    for s, vals in series.items():
        ax.plot(bins, vals, marker="o", label=s)
    ax.set_xlabel("relative rotation of the view pair")
    ax.set_ylabel("recall@10px %")
    ax.set_title("Multiview correspondence by rotation bin", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(uri: str, caption: str) -> str:
    alt = html.escape(caption)
    return f'<figure><img src="{uri}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def provenance(results: dict) -> str:
    """Definition list of where the numbers came from, then the config as JSON."""
    prov = results.get("provenance", {})
    rows = [("backbone", f"{prov.get('backbone', '?')} ({prov.get('timm_name', '?')})")]
    for which in ("original_weights", "finetuned_weights"):
        w = prov.get(which)
        if w:
            rows.append((which.replace("_", " "), f"{w.get('source')} {w.get('path')}"))
            rows.append((f"{which.split('_')[0]} sha256", w.get("sha256") or "(none)"))
    rows.append(("git commit", prov.get("git_commit", "?")))
    rows.append(("train scenes", ", ".join(prov.get("train_scenes", []))))
    rows.append(("held-out scenes", ", ".join(prov.get("test_scenes", []))))
    views = prov.get("views", {})
    rows.append(("views", f"{views.get('train', '?')} train, {views.get('test', '?')} held-out"))
    if "seconds" in prov:
        rows.append(("time", f"{prov['seconds']} s wall, {prov.get('cpu_seconds', '?')} s CPU"))
    items = "\n".join(
        f"<dt>{html.escape(k)}</dt><dd><code>{html.escape(str(v))}</code></dd>" for k, v in rows
    )
    config = json.dumps(results.get("config", {}), indent=2, default=str)
    ft_meta = prov.get("finetune_meta")
    extra = ""
    if ft_meta:
        extra = (
            "<details><summary>stage-2 meta.json</summary><pre>"
            + html.escape(json.dumps(ft_meta, indent=2, default=str))
            + "</pre></details>"
        )
    return (
        f'<dl id="provenance">{items}</dl>{extra}'
        f"<details><summary>config</summary><pre>{html.escape(config)}</pre></details>"
    )


def verdict_box(results: dict) -> str:
    """The page's first section: its title, the summary sentence, one table row per comparison
    and metric (data-* attributes carry results.json's values) and the forest plot."""
    rows = verdict_rows(results)
    backbone = results.get("provenance", {}).get("backbone", "")
    parts = [
        f'<section id="verdict"><h1>FiT3D evaluation: {html.escape(backbone)}</h1>',
        "<h2>Verdict</h2>",
        f'<p id="verdict-summary">{html.escape(verdict_summary(results))}</p>',
    ]
    if rows:
        body = []
        for r, v in zip(rows, results["verdicts"], strict=True):
            attrs = (
                f'data-a="{html.escape(v["a"])}" data-b="{html.escape(v["b"])}" '
                f'data-key="{v["key"]}" data-diff="{v["diff"]!r}" data-lo="{v["lo"]!r}" '
                f'data-hi="{v["hi"]!r}" data-rooms="{v["rooms"]}"'
            )
            cls = {"better": ' class="better"', "worse": ' class="worse"'}.get(r["word"], "")
            body.append(
                f"<tr {attrs}><td>{html.escape(r['comparison'])}</td>"
                f"<td>{html.escape(r['metric'])}</td><td>{r['difference']}</td>"
                f"<td>{r['interval']}</td><td>{r['rooms']}</td>"
                f"<td{cls}>{html.escape(r['word'])}</td></tr>"
            )
        parts.append(
            "<table><tr><th>comparison</th><th>metric</th><th>difference</th>"
            "<th>95% interval over rooms</th><th>rooms</th><th>verdict</th></tr>\n"
            + "\n".join(body)
            + "</table>"
        )
    forest = forest_plot(results)
    if forest is not None:
        parts.append(
            _figure(data_uri(forest), "each difference (dot) and its 95% room interval (bar)")
        )
    parts.append("</section>")
    return "\n".join(parts)


def _protocol_html(text: str) -> str:
    """Protocol text (paragraphs, `- ` bullet lines) as HTML."""
    out, items = [], []
    for line in text.strip().split("\n"):
        if line.startswith("- "):
            items.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    return "\n".join(out)


def render(results: dict, pictures: Mapping[str, bytes]) -> str:
    """The whole page as a string; `pictures` maps captions to PNG bytes."""
    backbone = results.get("provenance", {}).get("backbone", "")
    try:
        proto = protocol(results)
    except (KeyError, TypeError):
        proto = "Protocol: not recorded in these results."
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>FiT3D evaluation: {html.escape(backbone)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        verdict_box(results),
        "<h2>Results</h2>",
        "<p>Mean ± sample s.d. over probe seeds; change vs <code>original</code> in brackets; "
        "the best value of each column is highlighted (↑ higher is better, ↓ lower).</p>",
        tables(results),
    ]
    rot = rotation_plot(results)
    if rot is not None:
        parts += [
            "<h2>Correspondence by rotation</h2>",
            _figure(data_uri(rot), "recall@10px per rotation bin (empty bins left out)"),
        ]
    if pictures:
        parts.append("<h2>Pictures</h2>")
        parts += [_figure(data_uri(png), caption) for caption, png in pictures.items()]
    notes = results.get("notes") or []
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts += [
        '<h2>How these numbers were made</h2><details id="protocol" open>'
        "<summary>protocol</summary>",
        _protocol_html(proto),
        "</details>",
        "<h2>Provenance</h2>",
        provenance(results),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(
    out_dir: str | Path,
    results: dict,
    pictures: Mapping[str, str | Path] | Sequence[str | Path] = ("results.png", "pca.png"),
) -> Path:
    """Write `out_dir/results.html` atomically and return its path.

    `pictures`: PNG files to embed, as {caption: path} or a list of paths (caption = file name);
    relative paths are taken inside `out_dir`; files that do not exist are left out. The
    evaluator's call: `write_html(out_dir, results, ["results.png", "pca.png"])`.
    """
    out_dir = Path(out_dir)
    if not isinstance(pictures, Mapping):
        pictures = {CAPTIONS.get(Path(p).name, Path(p).name): p for p in pictures}
    found = {}
    for caption, p in pictures.items():
        path = Path(p) if Path(p).is_absolute() else out_dir / p
        if path.is_file():
            found[caption] = path.read_bytes()
    path = out_dir / "results.html"
    with atomic_path(path) as tmp:
        tmp.write_text(render(results, found), encoding="utf-8")
    return path
