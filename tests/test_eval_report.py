"""Report tables: cells, changes vs original, the headline verdict, NaN-safe JSON, PCA colours."""

import json
import math

import pytest
import torch

from fit3d.eval.report import markdown, summarize, verdict, write_report
from fit3d.viz import pca_rgb


def _results():
    def m(miou, rmse, r10):
        return {
            "eval/seg/miou": summarize(miou),
            "eval/depth/rmse": summarize(rmse),
            "eval/corr/recall_10px": summarize([r10]),
            "eval/corr/recall_10px_rot0-15": summarize([math.nan]),
        }

    return {
        "feature_sets": ["original", "assembled", "control"],
        "metrics": {
            "original": m([0.30, 0.32], [0.40, 0.40], 0.20),
            "assembled": m([0.33, 0.35], [0.35, 0.37], 0.19),
            "control": m([0.30, 0.31], [0.41, 0.41], 0.20),
        },
        "lr": {"original": {"seg": 0.01}},
        "notes": ["a note"],
        "provenance": {
            "backbone": "dinov2",
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


def test_summarize_is_mean_and_sample_std():
    s = summarize([1.0, 3.0])
    assert s["mean"] == 2.0
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert summarize([5.0])["std"] == 0.0


def test_markdown_changes_and_verdict():
    text = markdown(_results())
    row = next(line for line in text.splitlines() if line.startswith("| assembled") and "±" in line)
    assert "34.00 ± 1.41 (+3.00)" in row  # mIoU % = mean, s.d. over 2 seeds, change vs original
    assert "Assembled vs original: better on 2 of 3 headline metrics" in text  # corr got worse
    assert "Assembled vs control: better on 2 of 3 headline metrics" in text
    assert "| - |" in text or "| - " in text  # the empty rotation bin


def test_verdict_says_when_no_headline_metric_ran():
    res = _results()
    for per_set in res["metrics"].values():  # a normals-only run: no seg, depth or corr
        for key in [k for k in per_set if not k.startswith("eval/normals")]:
            del per_set[key]
    assert verdict(res) == "No headline metric (seg, depth, corr) in this run."
    assert "better on" in verdict(_results())


def test_write_report_json_has_no_nan(tmp_path):
    write_report(tmp_path, _results())
    res = json.loads((tmp_path / "results.json").read_text())  # strict parse
    assert res["metrics"]["original"]["eval/corr/recall_10px_rot0-15"]["mean"] is None
    assert "a note" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0


def test_pca_rgb_shared_basis():
    base = torch.randn(6, 4, 5)
    rgb = pca_rgb([base, base.clone()])
    assert rgb[0].shape == (4, 5, 3)
    torch.testing.assert_close(rgb[0], rgb[1])  # same features -> same colours across views
    assert float(rgb[0].min()) >= 0.0 and float(rgb[0].max()) <= 1.0


def test_verdict_counts_the_test_groups_where_assembled_wins():
    res = _results()
    per_room = {"original": (0.50, 0.30), "assembled": (0.40, 0.35), "control": (0.45, 0.25)}
    for s, rmse in per_room.items():
        for g, v in zip(("room1", "room2"), rmse, strict=True):
            res["metrics"][s][f"eval/depth/rmse@{g}"] = summarize([v, v])
    text = verdict(res)
    assert "RMSE m -0.04 (seed spread 0.014; better in 1 of 2 test groups: -0.1 / +0.05)" in text
    assert "better in 1 of 2 test groups: -0.05 / +0.1" in text  # vs control
    assert "room1" not in markdown(res).split("Assembled vs")[0]  # tables: no per-group keys
