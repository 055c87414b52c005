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
from fit3d.eval.report import METRICS, summarize, write_report
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

    return {
        "feature_sets": ["original", "assembled", "control"],
        "metrics": {
            "original": m([0.30, 0.32], [0.40, 0.40], 0.20, [0.5, 0.3, 0.1, math.nan]),
            "assembled": m([0.33, 0.35], [0.35, 0.37], 0.19, [0.6, 0.35, 0.12, math.nan]),
            "control": m([0.30, 0.31], [0.35, 0.37], 0.20, [0.5, 0.3, 0.1, math.nan]),
        },
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
    assert len(parser.links) == 3  # rotation plot, results.png, pca.png (missing.png left out)
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
    assert seen == {(s, k) for s in sets for k in metrics[s]}
    # The winner of each column, found by brute force over the stored means.
    for key in metrics["original"]:
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
    assert len(images) == 3 and all(ok and w > 0 and h > 0 for ok, w, h in images), images
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert len(cells) == sum(len(stored["metrics"][s]) for s in stored["feature_sets"])
    for s, key, text in cells:
        mean = stored["metrics"][s][key]["mean"]
        if mean is None:
            assert text.strip() == "-"
            continue
        label, _, scale = METRICS[key]
        digits = 4 if scale == 1.0 and abs(mean) < 10 else 2
        assert text.split()[0] == f"{mean * scale:.{digits}f}", (s, key, text)
