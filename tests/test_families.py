"""Every ViT family the backbone adapter handles, through the real entry points: tiny random-weight
models (with registers, SigLIP-like, DINOv3-like Eva with RoPE and 4 registers, EVA-02-like) ->
lift -> finetune -> eval on a tiny non-square demo room, then the exported model against fit3d's
own fine-tuned backbone and the model card against the evaluator's report. The DINOv2-like
family runs the same way in tests/test_pipeline.py."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from _tiny_demo import TINY_DEMO

import fit3d
import stage1_lift.__main__ as lift_main
import stage2_finetune.__main__ as finetune_main
from fit3d.cli import parse_cli
from fit3d.eval.__main__ import main as eval_main
from fit3d.export import CARD_FILE, EXPORT_DIR
from fit3d.scenes import generate_demo_set

QUARTERS = [
    "eval.head=both",
    "eval.dpt_probes=[depth]",
    "eval.dpt_hidden=8",
    "eval.dpt_epochs=1",
]
"""Probe3D's DPT head on the four quarter blocks (for the DINOv3-like family)."""


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_demo_set(
        parse_cli(["--preset", "demo", f"scenes.root={root}", *TINY_DEMO], "test", "")
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "alias", ["test_tiny_reg", "test_tiny_siglip", "test_tiny_dinov3", "test_tiny_eva02"]
)
def test_family_through_every_stage(tmp_path: Path, scenes: Path, alias: str) -> None:
    args = [
        "--preset",
        "demo",
        f"run.out={tmp_path}",
        f"scenes.root={scenes}",
        *TINY_DEMO,
        f"backbone.name={alias}",
        "lift.steps=4",
        "lift.checkpoint_every=2",
        "finetune.max_steps=2",
        "finetune.val_views=1",
        "finetune.corr_pairs=1",
        "eval.probes=[depth,corr]",
        "eval.epochs=1",
        "eval.seeds=[0]",
        "eval.lrs=[0.01]",
        "eval.max_views=4",
        "eval.pairs_per_scene=2",
        "eval.pca_views=1",
        *(QUARTERS if alias == "test_tiny_dinov3" else []),
    ]
    assert lift_main.main(args) == 0
    assert finetune_main.main(args) == 0
    assert eval_main(args) == 0

    lift_meta = json.loads(next((tmp_path / "lift" / "default").glob("*/meta.json")).read_text())
    assert lift_meta["backbone"] == alias and lift_meta["steps"] == 4

    run = tmp_path / "finetune" / "default"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["backbone"] == alias and meta["steps"] == 2
    assert meta["export"] == str(run / EXPORT_DIR)
    # the exported folder, read by timm alone, gives fit3d's fine-tuned tokens at the run's size
    tuned = fit3d.load_backbone(str(run))
    model = timm.create_model(f"local-dir:{run / EXPORT_DIR}", pretrained=True).eval()
    image = torch.rand(84, 112, 3)
    ours = tuned.dense(image)  # [1, C, h, w]
    x = tuned.preprocess(image.permute(2, 0, 1)[None])
    with torch.no_grad():
        tokens = model.forward_features(x)[:, model.num_prefix_tokens :]  # [1, h*w, C]
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(ours.shape), ours)

    out = tmp_path / "eval" / "default"
    results = json.loads((out / "results.json").read_text())
    used = results["provenance"]["finetuned_weights"]
    assert used["sha256"] == hashlib.sha256((run / "backbone.safetensors").read_bytes()).hexdigest()
    assert results["feature_sets"] == ["original", "fine-tuned", "assembled", "control"]
    keys = ["eval/depth/rmse", "eval/corr/recall_10px"]
    keys += ["eval/depth_dpt/rmse"] if alias == "test_tiny_dinov3" else []
    for s in results["feature_sets"]:
        for key in keys:
            assert math.isfinite(results["metrics"][s][key]["mean"]), (s, key)
    # the model card carries the evaluator's table rows for this model
    card = (run / EXPORT_DIR / CARD_FILE).read_text()
    report = (out / "results.md").read_text().splitlines()
    rows = [r for r in report if r.startswith("| fine-tuned |")]  # one per probe table
    assert len(rows) == len(keys) and all(r in card for r in rows)
