"""Report: the verdict box first, tables (cells, changes vs original), the protocol in plain
words, NaN-safe JSON, PCA colours."""

import json
import math

import pytest
import torch

from fit3d.eval.report import fmt_lr, markdown, protocol, summarize, verdict, write_report
from fit3d.eval.verdict import verdicts
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


def _with_rooms(res: dict) -> dict:
    """Per-room depth RMSE for 5 rooms (assembled lower in every room than original; mixed vs
    control) and the verdicts results.json would carry."""
    per_room = {
        "original": (0.50, 0.30, 0.40, 0.35, 0.45),
        "assembled": (0.40, 0.25, 0.30, 0.30, 0.35),
        "control": (0.45, 0.20, 0.50, 0.25, 0.40),
    }
    for s, rmse in per_room.items():
        for g, v in zip(("room1", "room2", "room3", "room4", "room5"), rmse, strict=True):
            res["metrics"][s][f"eval/depth/rmse@{g}"] = summarize([v, v])
    res["verdicts"] = [v.to_dict() for v in verdicts(res["metrics"])]
    return res


def test_markdown_opens_with_the_verdict_then_the_tables():
    res = _with_rooms(_results())
    text = markdown(res)
    assert text.startswith("## Verdict")
    assert text.index("## Verdict") < text.index("### Semantic segmentation")
    row = next(line for line in text.splitlines() if line.startswith("| assembled") and "±" in line)
    assert "34.00 ± 1.41 (+3.00)" in row  # mIoU % = mean, s.d. over 2 seeds, change vs original
    # assembled - original: -0.1, -0.05, -0.1, -0.05, -0.1 m in the 5 rooms: every resample is
    # negative, and its upper end is above -0.1 * 3/5 - 0.05 * 2/5 (the 2.5% of resamples that
    # draw -0.05 most often)
    line = next(ln for ln in text.splitlines() if ln.startswith("| assembled - original"))
    assert "| -0.080 | [-0.100, -0.060] | 5 | better |" in line
    line = next(ln for ln in text.splitlines() if ln.startswith("| assembled - control"))
    assert line.endswith("| 5 | no clear difference |")  # -0.05, +0.05, -0.2, +0.05, -0.05
    assert "assembled - original: better on depth RMSE m." in text
    assert "| - |" in text or "| - " in text  # the empty rotation bin


def test_verdict_without_rooms_or_fine_tuned_features():
    res = _results()
    assert "fewer than 2 groups" in verdict(res)  # no per-room scores: no verdict rows
    for s in ("assembled",):
        del res["metrics"][s]
    assert "No fine-tuned features" in verdict(res)


def test_protocol_is_plain_words():
    res = _results()
    res["lr"] = {"original": {"seg": 0.003}, "assembled": {"seg": 0.0015}}
    res["config"]["eval"]["lrs"] = [0.003, 0.01, 0.03]
    text = protocol(res)
    assert "picked from 3e-3, 1e-2, 3e-2" in text
    assert "chosen: seg 3e-3 (original), 1.5e-3 (assembled)" in text
    assert "{" not in text and "[" not in text.split("rotation")[0]  # no dict or list reprs
    assert [fmt_lr(x) for x in (0.006666666666666, 0.1, 5e-4)] == ["6.7e-3", "1e-1", "5e-4"]


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
