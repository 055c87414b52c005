"""End-to-end `python -m fit3d.eval` with the tiny random ViT: the demo (fast protocol, linear
and DPT heads), a ScanNet++-layout tree under protocol=paper through the real entry point,
NYUv2 through `eval.dataset`, and bad input (not a weights file, a cache of another backbone,
a split with a scene that has no labels, depth with NaNs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from fit3d.backbones import Backbone
from fit3d.cli import parse_cli
from fit3d.datasets import DATASETS
from fit3d.datasets.scenes import ScenesSet
from fit3d.eval.__main__ import main
from fit3d.eval.features import MapPlan, extract
from fit3d.io import write_safetensors
from fit3d.runs import resolve_precision
from fit3d.scenes import generate_demo_set

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--preset",
    "demo",
    "backbone.name=test_tiny",
    "scenes.demo_train=2",
    "scenes.demo_val=1",
    "scenes.demo_views=6",
    "scenes.demo_width=112",
    "scenes.demo_height=84",
    "scenes.demo_probe=1",
    "scenes.demo_probe_views=3",
    "scenes.demo_test=2",
    "scenes.demo_test_views=3",
    "eval.epochs=2",
    "eval.batch_size=4",
    "eval.lrs=[0.01,0.1]",
    "eval.seeds=[0,1]",
    "eval.pairs_per_scene=3",
    "eval.min_overlap=0.1",
    "eval.pca_views=2",
    "eval.dpt_hidden=8",
    "eval.dpt_epochs=1",
    "eval.head=linear",
    "eval.probes=[seg,depth,normals,corr]",  # every probe (the demo preset leaves normals out)
]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A run.out folder holding the tiny demo set (generated once for the module)."""
    out = tmp_path_factory.mktemp("eval_out")
    torch.set_num_threads(1)  # tiny tensors: thread hand-off costs more than it saves
    generate_demo_set(parse_cli([*TINY, f"run.out={out}"], "test", ""))
    return out


def _results(out, name):
    return json.loads((out / "eval" / name / "results.json").read_text())


def _weights(path: Path, seed: int) -> Path:
    """A tiny-ViT weights file (so the backbone has a sha256 and its features are cached)."""
    torch.manual_seed(seed)
    write_safetensors(path, Backbone("test_tiny", "random").model.state_dict())
    return path


def test_demo_linear_and_dpt_heads_original_and_control(demo_out, capsys):
    args = [*TINY, f"run.out={demo_out}", "run.name=nofit", "eval.finetune_run=absent"]
    assert main([*args, "eval.head=both", "eval.dpt_probes=[normals]"]) == 0
    res = _results(demo_out, "nofit")
    assert res["feature_sets"] == ["original", "control"] and res["protocol"] == "fast"
    # the demo preset's eval.precision=auto is recorded as what ran on this device
    assert res["config"]["eval"]["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert any("no fine-tuned backbone" in n for n in res["notes"])
    assert "no fine-tuned backbone" in capsys.readouterr().err
    for key in (
        "eval/seg/miou",
        "eval/depth/rmse",
        "eval/depth/delta3",
        "eval/depth/sqrel",
        "eval/normals/ang_rmse",
        "eval/normals_dpt/within_30",
        "eval/corr/recall_10px",
    ):
        assert key in res["metrics"]["original"], key
        assert len(res["metrics"]["original"][key]["values"]) == (1 if "corr" in key else 2)
    assert "eval/depth_dpt/rmse" not in res["metrics"]["original"]  # dpt_probes: normals only
    # original ++ original has original's cosines, computed once: every recall is the same
    corr = {
        s: {k: v for k, v in res["metrics"][s].items() if "/corr/" in k} for s in res["metrics"]
    }
    assert corr["control"] == corr["original"] and corr["original"]
    out = demo_out / "eval" / "nofit"
    for f in ("results.md", "results.png", "pca.png", "config.yaml", "results.html"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert "Protocol: fast" in md and "How protocol=fast differs from protocol=paper" in md
    assert "- the learning rate is picked from eval.lrs" in md
    assert "1/4-resolution pixels" in md


def test_four_feature_sets_and_weights_that_do_not_load(demo_out, tmp_path, capsys):
    good = _weights(tmp_path / "ft.safetensors", 1)
    args = [*TINY, f"run.out={demo_out}", "run.name=fit", f"eval.finetuned_weights={good}"]
    assert main([*args, "eval.probes=[seg,corr]", "eval.lrs=[0.1]"]) == 0
    res = _results(demo_out, "fit")
    assert res["feature_sets"] == ["original", "fine-tuned", "assembled", "control"]
    assert res["provenance"]["finetuned_weights"]["sha256"]
    assert "eval/seg/miou" in res["metrics"]["assembled"]

    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("this is not a weights file\n")
    wrong = tmp_path / "wrong.safetensors"  # every tensor 8x as wide as the tiny ViT's
    sd = {
        k: torch.zeros(v.shape[0] * 8, *v.shape[1:])
        for k, v in Backbone("test_tiny", "random").model.state_dict().items()
    }
    write_safetensors(wrong, sd)
    for bad, why in ((not_weights, "cannot read weights file"), (wrong, "does not fit")):
        t0 = time.time()
        code = main([*TINY, f"run.out={tmp_path}", f"eval.finetuned_weights={bad}"])
        assert code == 2 and time.time() - t0 < 30  # before any dataset or feature work
        assert why in capsys.readouterr().err
        assert not (tmp_path / "eval").exists()  # nothing half-written
    # the one line the user sees
    proc = subprocess.run(
        [sys.executable, "-m", "fit3d.eval", *TINY, f"run.out={tmp_path}",
         f"eval.finetuned_weights={not_weights}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot read weights file" in proc.stderr


def test_lr_swept_once_and_scaled_by_width(demo_out, tmp_path, monkeypatch):
    """eval.sweep_each_set=false: the lr sweep runs on the first set only; every other set gets
    that lr times C_first / C (assembled and control are twice as wide for seg, 3/2 for depth,
    whose input carries the original's CLS token). The sweep fits seed 0 on all train views and
    scores the val rooms (eval.val_split), so the chosen lr's head is original's seed-0 head:
    2 + 1 + 2 x 3 fits per probe instead of 4 x 4."""
    import fit3d.eval.fitting as F

    fits = []
    fit = F.fit_cached
    monkeypatch.setattr(F, "fit_cached", lambda *a: fits.append(a[0]) or fit(*a))
    good = _weights(tmp_path / "ft.safetensors", 1)
    args = [*TINY, f"run.out={demo_out}", "run.name=sweep1", f"eval.finetuned_weights={good}"]
    assert main([*args, "eval.probes=[seg,depth]", "eval.sweep_each_set=false"]) == 0
    lr = _results(demo_out, "sweep1")["lr"]
    for task, wide in (("seg", 2.0), ("depth", 1.5)):
        first = lr["original"][task]
        assert first in (0.01, 0.1)
        assert lr["fine-tuned"][task] == first
        assert lr["assembled"][task] == pytest.approx(first / wide)
        assert lr["control"][task] == pytest.approx(first / wide)
        assert fits.count(task) == 2 + 1 + 2 * 3


def test_cache_of_another_backbone_is_one_line_and_recomputed(demo_out, tmp_path):
    cache = tmp_path / "cache"
    a, b = _weights(tmp_path / "a.safetensors", 2), _weights(tmp_path / "b.safetensors", 3)
    args = [*TINY, f"run.out={demo_out}", "eval.finetune_run=", f"eval.cache_dir={cache}",
            "eval.probes=[corr]", "eval.pca_views=0"]  # fmt: skip
    assert main([*args, "run.name=cache_a", f"backbone.weights={a}"]) == 0
    assert main([*args, "run.name=cache_b", f"backbone.weights={b}"]) == 0
    notes = _results(demo_out, "cache_b")["notes"]
    stale = [n for n in notes if "was written with other settings" in n]
    # train, val and test stores
    assert len(stale) == 3 and all("weights_sha256" in n for n in stale)
    assert main([*args, "run.name=cache_b2", f"backbone.weights={b}"]) == 0  # now reused
    assert not any("other settings" in n for n in _results(demo_out, "cache_b2")["notes"])
    r_b, r_b2 = _results(demo_out, "cache_b"), _results(demo_out, "cache_b2")
    assert r_b["metrics"] == r_b2["metrics"]


def test_a_scene_without_labels_skips_only_that_probe(demo_out, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(demo_out / "scenes" / "demo", root)
    lacking = (root / "splits" / "nvs_sem_train.txt").read_text().split()[1]
    shutil.rmtree(root / "data" / lacking / "dslr" / "gt_semantics")
    args = [*TINY, f"run.out={demo_out}", "run.name=nolabels", f"scenes.root={root}"]
    assert main([*args, "eval.probes=[seg,corr]", "eval.finetune_run="]) == 0
    res = _results(demo_out, "nolabels")
    said = [n for n in res["notes"] if lacking in n]
    assert len(said) == 1 and "expected seg labels" in said[0]
    assert any("no usable seg labels: seg probe skipped" in n for n in res["notes"])
    assert "eval/seg/miou" not in res["metrics"]["original"]
    assert "eval/corr/recall_10px" in res["metrics"]["original"]


def _write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """MATLAB v7.3 (HDF5, 512-byte header, arrays stored in reversed axis order)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(v.transpose(tuple(range(v.ndim))[::-1])))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116))


def test_nyuv2_through_eval_dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nyu"
    root.mkdir()
    n = 4
    images = rng.integers(0, 256, (480, 640, 3, n), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (480, 640, n)).astype(np.float32)
    labels = np.zeros((480, 640, n), np.uint16)
    labels[:240] = 5  # raw 5 -> NYU-40 1 (wall); raw 11 -> 2 (floor)
    labels[240:] = 11
    arrays = {"images": images, "depths": depths, "rawDepths": depths, "labels": labels}
    _write_mat73(root / "nyu_depth_v2_labeled.mat", arrays)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [3]]),
                                           "testNdxs": np.array([[2], [4]])})  # fmt: skip
    map_class = np.full((1, 894), 40, dtype=np.float64)
    map_class[0, 4], map_class[0, 10] = 1, 2
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": map_class})
    args = [
        "backbone.name=test_tiny",
        f"run.out={tmp_path}",
        "eval.dataset=nyuv2",
        f"eval.dataset_root={root}",
        "eval.finetune_run=",
        "eval.epochs=1",
        "eval.lrs=[0.1]",
        "eval.seeds=[0]",
        "eval.pca_views=0",
        "eval.label_stride=8",
    ]
    assert main(args) == 0
    res = _results(tmp_path, "default")
    assert res["dataset"] == {
        "name": "nyuv2", "train_split": "train", "val_split": None, "test_split": "test"
    }  # fmt: skip
    assert res["provenance"]["views"] == {"train": 2, "val": 0, "test": 2}
    m = res["metrics"]["original"]
    assert "eval/seg/miou" in m and "eval/depth/rmse" in m
    assert any("no usable normals labels" in n for n in res["notes"])
    assert main([*args, "eval.dataset_root="]) == 2  # a dataset needs its root: one line


class _NaNDepth(ScenesSet):
    """The demo scene set with NaNs planted in one view's depth (a reader that passes them on)."""

    def _load(self, i):
        s = super()._load(i)
        if i == 2 and self.split == "test":
            s.depth[5:9, 10:20] = float("nan")
        return s


def test_a_depth_map_with_nans_skips_depth_and_corr_only(demo_out, monkeypatch):
    module = types.ModuleType("fit3d.datasets._nan_test")
    module.NaNDemo = _NaNDepth
    monkeypatch.setitem(sys.modules, "fit3d.datasets._nan_test", module)
    monkeypatch.setitem(DATASETS, "nan_demo", ("_nan_test", "NaNDemo"))
    root = demo_out / "scenes" / "demo"
    args = [*TINY, f"run.out={demo_out}", "run.name=nan", "eval.dataset=nan_demo",
            f"eval.dataset_root={root}", "eval.finetune_run=", "eval.lrs=[0.1]",
            "eval.probes=[seg,depth,normals,corr]"]  # fmt: skip
    assert main(args) == 0
    res = _results(demo_out, "nan")
    said = [n for n in res["notes"] if "NaN" in n]
    assert len(said) == 1 and "40 NaN/inf depth pixels" in said[0]
    assert "depth and corr probes skipped" in said[0]
    m = res["metrics"]["original"]
    assert "eval/seg/miou" in m and "eval/normals/ang_rmse" in m  # the other probes still run
    assert "eval/depth/rmse" not in m and "eval/corr/recall_10px" not in m


@pytest.mark.slow
def test_scannetpp_layout_paper_protocol_end_to_end(demo_out, tmp_path):
    """Acceptance: a tiny ScanNet++-layout tree with depth, normals and semantic labels (the
    generator writes the demo rooms in that layout), `python -m fit3d.eval --preset scannetpp`
    under protocol=paper with its schedules shortened by overrides."""
    root = demo_out / "scenes" / "demo"
    args = [
        "--preset", "scannetpp", f"scenes.root={root}", "scenes.resolution=1.0",
        "backbone.name=test_tiny", f"run.out={tmp_path}", "eval.finetune_run=",
        "eval.protocol=paper", "eval.head=both", "eval.dpt_hidden=8", "eval.dpt_epochs=1",
        "eval.num_workers=0", "eval.seeds=[0]", "eval.paper_batch_size=4",
        "eval.micro_batch=2", "eval.seg_iters=2", "eval.seg_warmup=1", "eval.seg_crop=56",
        "eval.seg_scale=[112,56]", "eval.depth_iters=2", "eval.depth_warmup=1",
        "eval.depth_crop=[56,84]", "eval.sigloss_warmup=1", "eval.pairs_per_scene=2",
        "eval.min_overlap=0.1", "eval.pca_views=1",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "fit3d.eval", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = _results(tmp_path, "default")
    assert res["protocol"] == "paper" and res["dataset"]["name"] == "scannetpp"
    m = res["metrics"]["original"]
    for key in ("eval/seg/miou", "eval/seg/aacc", "eval/depth/rmse", "eval/depth/delta3",
                "eval/depth/rmse_log", "eval/depth_dpt/rmse", "eval/normals/within_30",
                "eval/normals_dpt/ang_rmse", "eval/corr/recall_10px"):  # fmt: skip
        assert key in m and m[key]["mean"] is not None, key
    assert res["config"]["eval"]["protocol"] == "paper"
    assert "Protocol: paper" in (tmp_path / "eval" / "default" / "results.md").read_text()
    # the published pipeline's quirks, reproduced and listed (eval.fixes=false by default)
    assert len(res["as_published"]) == 4 and res["fixes"][0].startswith("Probe3D 2025")
    assert "As published" in (tmp_path / "eval" / "default" / "results.md").read_text()
    assert "eval/depth_dpt/aligned_rmse" in m  # Probe3D's scale-and-shift-aligned metrics
    assert (tmp_path / "eval" / "default" / "results.html").is_file()


def test_extract_matches_backbone_accessors():
    bb = Backbone("test_tiny", "random")
    images = torch.rand(2, 70, 98, 3)
    plan = MapPlan(final=True, blocks=(0, 1))
    out = extract(bb, images, plan)
    x = bb.preprocess(images.permute(0, 3, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(out["maps"][:, 0], bb(x))
        torch.testing.assert_close(out["maps"][:, 2], bb.features(x, blocks=(-1,)).blocks[0])
        torch.testing.assert_close(out["maps"][:, 1], bb.features(x, blocks=(0,)).blocks[0])
        torch.testing.assert_close(out["cls"], bb.features(x, cls=True).cls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_bf16_autocast(demo_out):
    args = [*TINY, f"run.out={demo_out}", "run.name=cuda", "run.device=cuda",
            "eval.precision=bf16", "eval.finetune_run=", "eval.probes=[seg,corr]"]  # fmt: skip
    assert main(args) == 0
    res = _results(demo_out, "cuda")
    assert res["provenance"]["device"].startswith("cuda")
    assert res["metrics"]["original"]["eval/seg/miou"]["mean"] is not None


def test_headline_metric_per_test_group_equals_that_group_alone():
    """`_score` keeps `<metric>@<group>` equal to scoring that group's views alone (predictions
    arrive in uneven micro-batches; a view without valid depth adds nothing to its group)."""
    from fit3d.eval.correspondence import recall_by_group as _recall
    from fit3d.eval.fitting import score as _score
    from fit3d.eval.metrics import confusion_matrix, depth_metrics, seg_metrics

    gen = torch.Generator().manual_seed(0)
    groups = ["a", "b", "a", "c", "b", "a", "c"]
    split = types.SimpleNamespace(groups=groups)
    gt = torch.rand(7, 5, 6, generator=gen) * 4 + 0.5  # [V, H, W] metres
    gt[3] = 0  # no valid pixel in this view of group c
    pred = gt * (1 + 0.3 * torch.rand(7, 5, 6, generator=gen))
    seg_gt = torch.randint(0, 4, (7, 5, 6), generator=gen)
    logits = torch.randn(7, 4, 5, 6, generator=gen)

    def predict_from(x, y):
        def predict(chunk):  # micro-batches of 2, 1, 2, ... views, in chunk order
            i = 0
            while i < len(chunk):
                n = chunk[i : i + 1 + (i % 2 == 0)]
                yield x[n], y[n]
                i += len(n)

        return predict

    views = list(range(7))
    got = _score("depth", predict_from(pred, gt), split, views, 4, batch=3)
    seg = _score("seg", predict_from(logits, seg_gt), split, views, 4, batch=3)
    for g in "abc":
        mine = [n for n in views if groups[n] == g]
        assert got[f"rmse@{g}"] == pytest.approx(depth_metrics(pred[mine], gt[mine])["rmse"])
        conf = confusion_matrix(logits[mine].argmax(1), seg_gt[mine], 4)
        assert seg[f"miou@{g}"] == pytest.approx(seg_metrics(conf)["miou"])
    assert got["rmse"] == pytest.approx(depth_metrics(pred, gt)["rmse"])
    assert got["rmse@c"] == pytest.approx(depth_metrics(pred[6:], gt[6:])["rmse"])
    one = types.SimpleNamespace(groups=["a"] * 7)  # one group: nothing per group
    assert not [k for k in _score("depth", predict_from(pred, gt), one, views, 4) if "@" in k]
    # correspondence: group x's pairs all within 10 px, y's all beyond
    errors = [torch.full((5,), 2.0), torch.full((5,), 30.0), torch.full((5,), 3.0)]
    rec = _recall(errors, torch.tensor([5.0, 40.0, 70.0]), ["x", "y", "x"])
    assert (rec["recall_10px@x"], rec["recall_10px@y"]) == (1.0, 0.0)
    assert rec["recall_10px"] == pytest.approx(2 / 3)
