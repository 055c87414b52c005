"""End-to-end smoke run through the real entry points: tiny generated scenes -> lift -> finetune ->
eval. Proves the stages join up (file formats, config keys, provenance); quality is measured by the
demo, not here."""

import hashlib
import json
import math

import pytest
from _tiny_demo import TINY_DEMO

import stage1_lift.__main__ as lift_main
import stage2_finetune.__main__ as finetune_main
from fit3d.cli import parse_cli
from fit3d.eval.__main__ import main as eval_main
from fit3d.scenes import generate_demo_set

HEADLINE = {
    "eval/seg/miou": (0.0, 1.0),
    "eval/depth/rmse": (0.0, 100.0),
    "eval/normals/ang_rmse": (0.0, 180.0),
    "eval/corr/recall_10px": (0.0, 1.0),
}
"""Headline metric of each probe and the range its value must lie in (one probe seed here)."""


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path) -> None:
    common = [
        f"run.out={tmp_path}",
        "backbone.name=test_tiny",
        *TINY_DEMO,
        "lift.steps=30",
        "lift.checkpoint_every=10",
        "finetune.max_steps=3",
        "finetune.val_views=1",
        "finetune.corr_pairs=1",
        "eval.epochs=1",
        "eval.probes=[seg,depth,normals,corr]",  # the demo's default leaves normals out
        "eval.seeds=[0]",
        "eval.lrs=[0.01]",
        "eval.max_views=4",
        "eval.pairs_per_scene=2",
    ]
    generate_demo_set(parse_cli(["--preset", "demo", *common], "test", ""))
    assert lift_main.main(["--preset", "demo", *common]) == 0
    assert finetune_main.main(["--preset", "demo", *common]) == 0
    assert eval_main(["--preset", "demo", *common]) == 0

    lift_dir = tmp_path / "lift" / "default"
    summary = json.loads((lift_dir / "summary.json").read_text())
    scene_metas = [json.loads(p.read_text()) for p in lift_dir.glob("*/meta.json")]
    assert len(scene_metas) == 1 and scene_metas[0]["backbone"] == "test_tiny"
    assert summary["done"] == 1 and scene_metas[0]["steps"] == 30

    ft_dir = tmp_path / "finetune" / "default"
    ft_meta = json.loads((ft_dir / "meta.json").read_text())
    assert (ft_dir / "backbone.safetensors").is_file()
    assert ft_meta["steps"] == 3

    results = json.loads((tmp_path / "eval" / "default" / "results.json").read_text())
    # the evaluator read the fine-tuned weights stage 2 wrote (checked by content, not name)
    used = results["provenance"]["finetuned_weights"]
    sha = hashlib.sha256((ft_dir / "backbone.safetensors").read_bytes()).hexdigest()
    assert used["source"] == "file" and used["sha256"] == sha
    # every feature set was evaluated (none dropped for a missing backbone) by every probe
    sets = ["original", "fine-tuned", "assembled", "control"]
    assert results["feature_sets"] == sets and sorted(results["metrics"]) == sorted(sets)
    for s in sets:
        for key, (lo, hi) in HEADLINE.items():
            stat = results["metrics"][s].get(key)
            assert stat is not None, (s, key)
            assert len(stat["values"]) == 1 and math.isfinite(stat["mean"]), (s, key, stat)
            assert lo <= stat["mean"] <= hi, (s, key, stat)
    assert (tmp_path / "eval" / "default" / "results.md").is_file()
    # scored on the test rooms (never lifted), lr picked on the val room, probes trained on the
    # train and probe rooms; every comparison has a verdict over the 2 test rooms
    prov = results["provenance"]
    assert prov["test_scenes"] == ["demo_t0_00", "demo_t0_01"]
    assert prov["val_scenes"] == ["demo_001"] and prov["train_scenes"] == ["demo_000", "demo_p00"]
    got = {(v["a"], v["b"], v["key"]) for v in results["verdicts"]}
    for a, b in (("fine-tuned", "original"), ("assembled", "original"), ("assembled", "control")):
        assert (a, b, "eval/seg/miou") in got and (a, b, "eval/corr/recall_10px") in got
    assert all(v["rooms"] == 2 for v in results["verdicts"] if "rot" not in v["key"])
