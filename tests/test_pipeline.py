"""End-to-end smoke run through the real entry points: tiny generated scenes -> lift -> finetune ->
eval. Proves the stages join up (file formats, config keys, provenance); quality is measured by the
demo, not here."""

import json

import pytest

import stage1_lift.__main__ as lift_main
import stage2_finetune.__main__ as finetune_main
from fit3d.eval.__main__ import main as eval_main
from fit3d.scenes.demo.__main__ import main as demo_main


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path) -> None:
    common = [
        f"run.out={tmp_path}",
        "backbone.name=test_tiny",
        "scenes.demo_train=1",
        "scenes.demo_val=1",
        "scenes.demo_views=8",
        "scenes.demo_width=112",
        "scenes.demo_height=84",
        "lift.steps=30",
        "lift.checkpoint_every=10",
        "finetune.max_steps=3",
        "finetune.val_views=1",
        "finetune.corr_pairs=1",
        "eval.epochs=1",
        "eval.seeds=[0]",
        "eval.lrs=[0.01]",
        "eval.max_views=4",
        "eval.pairs_per_scene=2",
    ]
    assert demo_main(["--preset", "demo", *common]) == 0
    assert lift_main.main(["--preset", "demo", *common]) == 0
    assert finetune_main.main(["--preset", "demo", *common]) == 0
    assert eval_main(["--preset", "demo", *common]) == 0

    lift_dir = tmp_path / "lift" / "default"
    summary = json.loads((lift_dir / "summary.json").read_text())
    scene_metas = [json.loads(p.read_text()) for p in lift_dir.glob("*/meta.json")]
    assert len(scene_metas) == 1 and scene_metas[0]["backbone"] == "test_tiny"
    assert summary and scene_metas[0]["steps"] == 30

    ft_meta = json.loads((tmp_path / "finetune" / "default" / "meta.json").read_text())
    assert (tmp_path / "finetune" / "default" / "backbone.safetensors").is_file()
    assert ft_meta["steps"] == 3

    results = json.loads((tmp_path / "eval" / "default" / "results.json").read_text())
    text = json.dumps(results)
    for feature_set in ("original", "fine-tuned", "assembled", "control"):
        assert feature_set in text
    for metric in ("miou", "rmse", "recall"):
        assert metric in text.lower()
    assert (tmp_path / "eval" / "default" / "results.md").is_file()
