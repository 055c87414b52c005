"""results.html: self-contained, numbers equal to results.json, winners marked, offline-viewable."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from fit3d.eval.html import write_html
from fit3d.eval.report import METRICS, summarize, verdict_rows, write_report
from fit3d.eval.verdict import verdicts
from fit3d.view.browser import browser_missing


def _results() -> dict:
    """Three feature sets, two seeds, one empty rotation bin (NaN -> null in results.json)."""

    def m(miou, rmse, r10, rot):
        out = {
            "eval/seg/miou": summarize(miou),
            "eval/depth/rmse": summarize(rmse),
            "eval/corr/recall_10px": summarize([r10]),
        }
        keys = [k for k in METRICS if "recall_10px_rot" in k]
        out |= {k: summarize([v]) for k, v in zip(keys, rot, strict=True)}
        return out

    metrics = {
        "original": m([0.30, 0.32], [0.40, 0.40], 0.20, [0.5, 0.3, 0.1, math.nan]),
        "assembled": m([0.33, 0.35], [0.35, 0.37], 0.19, [0.6, 0.35, 0.12, math.nan]),
        "control": m([0.30, 0.31], [0.35, 0.37], 0.20, [0.5, 0.3, 0.1, math.nan]),
    }
    rooms = {"original": (0.3, 0.32, 0.31, 0.30, 0.33), "assembled": (0.34, 0.35, 0.33, 0.33, 0.36),
             "control": (0.36, 0.33, 0.31, 0.31, 0.37)}  # fmt: skip
    for s, per_room in rooms.items():
        for r, v in enumerate(per_room):
            metrics[s][f"eval/seg/miou@room{r}"] = summarize([v, v + 0.01])
    return {
        "feature_sets": ["original", "assembled", "control"],
        "metrics": metrics,
        "verdicts": [v.to_dict() for v in verdicts(metrics)],
        "lr": {"original": {"seg": 0.01}},
        "notes": ["a note <with> markup"],
        "provenance": {
            "backbone": "dinov2",
            "timm_name": "vit_small_patch14_dinov2.lvd142m",
            "original_weights": {"source": "file", "path": "/w/a.safetensors", "sha256": "ab" * 32},
            "finetuned_weights": {
                "source": "file",
                "path": "/w/b.safetensors",
                "sha256": "cd" * 32,
            },
            "git_commit": "0123abc",
            "views": {"train": 4, "test": 2},
            "train_scenes": ["a"],
            "test_scenes": ["b"],
        },
        "config": {
            "eval": {
                "epochs": 1,
                "batch_size": 2,
                "lrs": [0.01],
                "label_stride": 1,
                "seeds": [0, 1],
                "pairs_per_scene": 1,
                "top_k": 10,
            }
        },
    }


class _Cells(HTMLParser):
    """Collect <td data-key> cells (attributes and text) and every src/href."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.links: list[str] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "td" and "data-key" in a:
            self._cell = a | {"text": ""}

    def handle_data(self, text):
        if self._cell is not None:
            self._cell["text"] += text

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None


def _report(tmp_path: Path) -> tuple[Path, dict]:
    """results.json + results.png as the evaluator writes them, a pca.png, then results.html."""
    results = _results()
    write_report(tmp_path, results)
    grad = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "pca.png"), grad)
    path = write_html(tmp_path, results, ["results.png", "pca.png", "missing.png"])
    return path, json.loads((tmp_path / "results.json").read_text())


def test_cells_equal_results_json_and_winners_are_marked(tmp_path):
    path, stored = _report(tmp_path)
    assert path == tmp_path / "results.html"
    page = path.read_text()
    parser = _Cells()
    parser.feed(page)
    assert all(link.startswith("data:image/png;base64,") for link in parser.links)
    # forest and rotation plots, results.png, pca.png (missing.png left out)
    assert len(parser.links) == 4
    assert not re.search(r"url\(|@import|<script|<link", page)
    sets, metrics = stored["feature_sets"], stored["metrics"]
    seen = set()
    for cell in parser.cells:
        s, key = cell["data-set"], cell["data-key"]
        mean = metrics[s][key]["mean"]
        seen.add((s, key))
        if mean is None:
            assert cell["text"].strip() == "-" and "data-mean" not in cell
            continue
        assert (
            float(cell["data-mean"]) == mean and float(cell["data-std"]) == metrics[s][key]["std"]
        )
        scale, digits = METRICS[key][2], int(cell["data-digits"])
        shown = float(cell["text"].split()[0])
        assert shown == pytest.approx(mean * scale, abs=0.51 * 10**-digits)
    assert seen == {(s, k) for s in sets for k in metrics[s] if "@" not in k}
    # The winner of each column, found by brute force over the stored means.
    for key in (k for k in metrics["original"] if "@" not in k):
        higher = METRICS[key][1]
        means = {s: metrics[s][key]["mean"] for s in sets if metrics[s][key]["mean"] is not None}
        best = {s for s, v in means.items() if v == (max if higher else min)(means.values())}
        marked = {c["data-set"] for c in parser.cells if c["data-key"] == key and c.get("class")}
        assert marked == best, key
    texts = {(c["data-set"], c["data-key"]): " ".join(c["text"].split()) for c in parser.cells}
    assert texts["assembled", "eval/seg/miou"] == "34.00 ± 1.41 (+3.00)"  # mean ± s.d., change
    assert "cd" * 32 in page and "0123abc" in page and "a note &lt;with&gt; markup" in page
    assert "Protocol: fast" in page  # the protocol is named in every report


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_results_html_in_offline_chromium(tmp_path):
    """With networking off, every picture loads from the file and the table shows results.json."""
    from fit3d.view.browser import chromium_page

    path, stored = _report(tmp_path)
    with chromium_page(1000, 800, offline=True) as (page, requests):
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "() => [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        cells = page.evaluate(
            """() => [...document.querySelectorAll('td[data-key]')].map(
                td => [td.dataset.set, td.dataset.key, td.innerText])"""
        )
    assert len(images) == 4 and all(ok and w > 0 and h > 0 for ok, w, h in images), images
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    per_set = [k for s in stored["feature_sets"] for k in stored["metrics"][s] if "@" not in k]
    assert len(cells) == len(per_set)
    for s, key, text in cells:
        mean = stored["metrics"][s][key]["mean"]
        if mean is None:
            assert text.strip() == "-"
            continue
        label, _, scale = METRICS[key]
        digits = 4 if scale == 1.0 and abs(mean) < 10 else 2
        assert text.split()[0] == f"{mean * scale:.{digits}f}", (s, key, text)


class _Verdict(HTMLParser):
    """The first element inside <body> and the verdict table's rows (data-* and cell texts)."""

    def __init__(self):
        super().__init__()
        self.first: tuple[str, dict] | None = None
        self.rows: list[dict] = []
        self._in_body = False
        self._row: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self._in_body = True
        elif self._in_body and self.first is None:
            self.first = (tag, a)
        if tag == "tr" and "data-diff" in a:
            self._row = a | {"cells": []}
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")

    def handle_data(self, text):
        if self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += text

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None


def test_verdict_box_opens_the_page_and_equals_results_json(tmp_path):
    path, stored = _report(tmp_path)
    parser = _Verdict()
    parser.feed(path.read_text())
    assert parser.first == ("section", {"id": "verdict"})
    assert len(parser.rows) == len(stored["verdicts"]) == 2  # assembled vs original, vs control
    for row, v, shown in zip(parser.rows, stored["verdicts"], verdict_rows(stored), strict=True):
        assert (row["data-a"], row["data-b"], row["data-key"]) == (v["a"], v["b"], v["key"])
        assert float(row["data-diff"]) == v["diff"] and float(row["data-lo"]) == v["lo"]
        assert float(row["data-hi"]) == v["hi"] and int(row["data-rooms"]) == v["rooms"] == 5
        _, _, diff, interval, rooms, word = (c.strip() for c in row["cells"])
        assert diff == f"{v['diff'] * 100:+.2f}" and word == v["word"] == shown["word"]
        assert interval == f"[{v['lo'] * 100:+.2f}, {v['hi'] * 100:+.2f}]"
    # assembled beat original in every room (+4, +3, +2, +3, +3 points): the interval excludes zero
    assert [r["cells"][-1] for r in parser.rows] == ["better", "no clear difference"]
    md = (tmp_path / "results.md").read_text()
    assert md.index("## Verdict") < md.index("### ") and (tmp_path / "forest.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_screenshot_shows_the_verdict_box_first(tmp_path):
    """In headless Chromium the verdict box is at the top of the first screen: nothing above it,
    its frame drawn in the screenshot, its rows reading results.json's verdicts."""
    from fit3d.view.browser import chromium_page

    path, stored = _report(tmp_path)
    with chromium_page(1000, 700, offline=True) as (page, _):
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        box = page.evaluate(
            """() => { const r = document.getElementById('verdict').getBoundingClientRect();
                       return {x: r.x, y: r.y, w: r.width, h: r.height}; }"""
        )
        above = page.evaluate(
            """() => [...document.body.querySelectorAll('*')].filter(e => {
                 const r = e.getBoundingClientRect(), v = document.getElementById('verdict');
                 return r.height > 0 && r.bottom <= v.getBoundingClientRect().top
                        && !v.contains(e); }).length"""
        )
        rows = page.evaluate(
            """() => [...document.querySelectorAll('#verdict tr[data-diff]')].map(
                 tr => [...tr.cells].map(td => td.innerText))"""
        )
        png = page.screenshot()
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)  # [H, W, 3] BGR
    assert above == 0 and box["y"] < 40 and box["h"] > 100 and box["y"] + 100 < shot.shape[0]
    frame = np.array([102, 68, 68])  # #446 in BGR: the box's border
    top = int(box["y"]) + 1
    line = shot[top - 1 : top + 2, int(box["x"]) + 10 : int(box["x"] + box["w"]) - 10]
    assert (np.abs(line.astype(int) - frame).sum(-1) < 40).mean() > 0.5
    shown = verdict_rows(stored)
    assert [r[-1] for r in rows] == [s["word"] for s in shown]
    assert [r[2] for r in rows] == [s["difference"] for s in shown]
