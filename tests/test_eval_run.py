"""End-to-end `python -m fit3d.eval` on a tiny generated demo with the tiny random ViT."""

import json
import shutil

import pytest
import torch

from fit3d.backbones import Backbone
from fit3d.cli import parse_cli
from fit3d.eval.__main__ import main
from fit3d.eval.features import extract
from fit3d.io import write_safetensors
from fit3d.scenes import generate_demo_set

TINY = [
    "--preset",
    "demo",
    "backbone.name=test_tiny",
    "scenes.demo_train=2",
    "scenes.demo_val=1",
    "scenes.demo_views=6",
    "scenes.demo_width=112",
    "scenes.demo_height=84",
    "eval.epochs=2",
    "eval.batch_size=4",
    "eval.lrs=[0.01,0.1]",
    "eval.seeds=[0,1]",
    "eval.pairs_per_scene=3",
    "eval.min_overlap=0.1",
    "eval.pca_views=2",
]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A run.out folder holding the tiny demo set (generated once for the module)."""
    out = tmp_path_factory.mktemp("eval_out")
    torch.set_num_threads(1)  # tiny tensors: thread hand-off costs more than it saves
    generate_demo_set(parse_cli([*TINY, f"run.out={out}"], "test", ""))
    assert main([*TINY, f"run.out={out}", "eval.probes=[corr]", "eval.finetune_run="]) == 0
    return out


def _results(out, name):
    return json.loads((out / "eval" / name / "results.json").read_text())


def test_missing_finetune_run_gives_original_and_control(demo_out, capsys):
    args = [*TINY, f"run.out={demo_out}", "run.name=nofit", "eval.finetune_run=absent"]
    assert main(args) == 0
    res = _results(demo_out, "nofit")
    assert res["feature_sets"] == ["original", "control"]
    assert any("no fine-tuned backbone" in n for n in res["notes"])
    assert "no fine-tuned backbone" in capsys.readouterr().err
    for key in (
        "eval/seg/miou",
        "eval/depth/rmse",
        "eval/normals/ang_rmse",
        "eval/corr/recall_10px",
    ):
        assert key in res["metrics"]["original"], key
        assert len(res["metrics"]["original"][key]["values"]) == (1 if "corr" in key else 2)
    # original ++ original has the same cosine similarities (up to float ties in the ranking)
    assert res["metrics"]["control"]["eval/corr/recall_10px"]["mean"] == pytest.approx(
        res["metrics"]["original"]["eval/corr/recall_10px"]["mean"], abs=0.02
    )
    out = demo_out / "eval" / "nofit"
    for f in ("results.md", "results.png", "pca.png", "config.yaml"):
        assert (out / f).is_file(), f


def test_four_feature_sets_and_bad_inputs(demo_out, tmp_path):
    good = tmp_path / "ft.safetensors"
    write_safetensors(good, Backbone("test_tiny", "random").model.state_dict())
    args = [*TINY, f"run.out={demo_out}", "run.name=fit", f"eval.finetuned_weights={good}"]
    assert main([*args, "eval.probes=[seg,corr]"]) == 0
    res = _results(demo_out, "fit")
    assert res["feature_sets"] == ["original", "fine-tuned", "assembled", "control"]
    assert res["provenance"]["finetuned_weights"]["sha256"]
    assert "eval/seg/miou" in res["metrics"]["assembled"]

    wrong = tmp_path / "wrong.safetensors"  # every tensor twice as wide as the tiny ViT's
    sd = {
        k: torch.zeros(v.shape[0] * 8, *v.shape[1:])
        for k, v in Backbone("test_tiny", "random").model.state_dict().items()
    }
    write_safetensors(wrong, sd)
    args = [*TINY, f"run.out={demo_out}", "run.name=wrong", f"eval.finetuned_weights={wrong}"]
    assert main([*args, "eval.probes=[corr]"]) == 0
    res = _results(demo_out, "wrong")
    assert res["feature_sets"] == ["original", "control"]
    assert any("does not fit" in n for n in res["notes"])


def test_heldout_without_labels_skips_only_that_probe(demo_out, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(demo_out / "scenes" / "demo", root)
    val = (root / "splits" / "nvs_sem_val.txt").read_text().split()[0]
    shutil.rmtree(root / "data" / val / "dslr" / "gt_semantics")
    args = [*TINY, f"run.out={demo_out}", "run.name=nolabels", f"scenes.root={root}"]
    assert main([*args, "eval.probes=[seg,corr]", "eval.finetune_run="]) == 0
    res = _results(demo_out, "nolabels")
    assert any("held-out scenes have no seg labels" in n for n in res["notes"])
    assert "eval/seg/miou" not in res["metrics"]["original"]
    assert "eval/corr/recall_10px" in res["metrics"]["original"]


def test_extract_matches_backbone_accessors():
    bb = Backbone("test_tiny", "random")
    images = torch.rand(2, 70, 98, 3)
    out = extract(bb, images)
    x = bb.preprocess(images.permute(0, 3, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(out["norm"], bb(x))
        torch.testing.assert_close(out["raw"], bb.features(x, blocks=(-1,)).blocks[0])
        torch.testing.assert_close(out["cls"], bb.features(x, cls=True).cls)
