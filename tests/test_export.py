"""fit3d.export: the timm / Hugging Face model folder (loads in one line with timm and gives the
same tokens as fit3d's backbone), its model card and card refresh, `fit3d.load_backbone`, and the
README's "Use the features in your code" snippet."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fit3d
from fit3d.backbones import Backbone
from fit3d.errors import UserError
from fit3d.export import CARD_FILE, EXPORT_DIR, WEIGHTS_FILE, refresh_card, write_export
from fit3d.io import sha256_file, write_json, write_safetensors
from fit3d.runs import BACKBONE_FILE, META_FILE

ROOT = Path(__file__).resolve().parents[1]


def _tuned(alias: str) -> Backbone:
    """A tiny backbone with every weight moved off its init, as a fine-tuned one would be."""
    bb = Backbone(alias)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bb


def _fake_run(folder: Path, bb: Backbone) -> dict:
    """A stage-2 run folder as `stage2_finetune.train` leaves it (weights, export, meta.json),
    with the meta fields the model card reads."""
    write_safetensors(folder / BACKBONE_FILE, bb.timm_state_dict())
    meta = {
        "backbone": bb.alias,
        "timm_name": bb.timm_name,
        "embed_dim": bb.embed_dim,
        "weights_sha256": sha256_file(folder / BACKBONE_FILE),
        "train_scenes": 6,
        "train_views": 210,
        "steps": 315,
        "epochs": 3.0,
        "batch": {"global_batch": 2},
        "optimizer": {"lr": 3e-5, "weight_decay": 1e-4, "grad_clip": 0.1},
        "heldout": {"masked_l1": {"views": 5, "original": 0.4561, "finetuned": 0.4172}},
    }
    meta["export"] = str(write_export(folder / EXPORT_DIR, bb, meta, folder / BACKBONE_FILE))
    write_json(folder / META_FILE, meta)
    return meta


@pytest.mark.parametrize("alias", ["test_tiny_dinov3", "test_tiny_siglip", "test_tiny_eva02"])
def test_timm_local_dir_gives_fit3d_tokens(tmp_path: Path, alias: str) -> None:
    """`timm.create_model("local-dir:...", pretrained=True)`, which knows nothing of fit3d, gives
    the fine-tuned backbone's tokens at the demo's non-square size and another one."""
    bb = _tuned(alias)
    _fake_run(tmp_path, bb)
    folder = tmp_path / EXPORT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", WEIGHTS_FILE]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == (1.0, "squash", "bilinear")
    p = bb.patch_size
    for h, w in ((224 // p, 336 // p), (3, 5)):
        x = torch.randn(2, 3, h * p, w * p)
        with torch.no_grad():
            tokens = model.forward_features(x)[:, model.num_prefix_tokens :]  # [B, h*w, C]
            ours = bb(x)  # [B, C, h, w]
        torch.testing.assert_close(tokens.transpose(1, 2).reshape(ours.shape), ours)
    # what stage 2 saves and what it exports are the same tensors
    from safetensors.torch import load_file

    a, b = load_file(str(folder / WEIGHTS_FILE)), load_file(str(tmp_path / BACKBONE_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_card_and_its_evaluation_refresh(tmp_path: Path) -> None:
    bb = _tuned("test_tiny_dinov3")
    meta = _fake_run(tmp_path, bb)
    card = tmp_path / EXPORT_DIR / CARD_FILE
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: timm\n")
    assert "license: other\nlicense_name: dinov3-license" in text  # the base model's licence
    wanted = ["vit_small_patch16_dinov3", "315 optimizer steps", "6 scenes, 210 views"]
    wanted += ["0.4561", "0.4172", meta["weights_sha256"], "No evaluation yet"]
    for want in wanted:
        assert want in text, want
    tables = "## Verdict\n\n![intervals](forest.png)\n\n### Depth (linear)\n\n"
    tables += "| features | RMSE m |\n|---|---|\n| fine-tuned | 0.7313 |"
    results = {
        "protocol": "fast",
        "dataset": {"name": "demo"},
        "config": {"run": {"name": "default"}},
        "provenance": {
            "finetuned_weights": {"sha256": meta["weights_sha256"]},
            "views": {"train": 8, "test": 4},
            "test_scenes": ["demo_006"],
        },
    }
    assert refresh_card(tmp_path, results, tables)
    text = card.read_text()
    assert "| fine-tuned | 0.7313 |" in text and "\n##### Depth (linear)\n" in text
    assert "\n#### Verdict\n" in text and "forest.png" not in text  # under the card's headings
    assert "No evaluation yet" not in text and "demo_006" in text
    # the same eval run again replaces its table; another eval run adds one
    assert refresh_card(tmp_path, results, tables.replace("0.7313", "0.7001"))
    results2 = json.loads(json.dumps(results))
    results2["config"]["run"]["name"] = "nyu"
    assert refresh_card(tmp_path, results2, tables.replace("0.7313", "0.6500"))
    text = card.read_text()
    assert "0.7313" not in text and "0.7001" in text and "0.6500" in text
    assert text.index("0.6500") < text.index("## Use")
    # numbers of other weights never reach this card
    other = json.loads(json.dumps(results))
    other["provenance"]["finetuned_weights"]["sha256"] = "0" * 64
    assert not refresh_card(tmp_path, other, "| fine-tuned | 0.1 |")
    assert "0.1 |" not in card.read_text()
    assert not refresh_card(tmp_path / "nowhere", results, tables)


def test_load_backbone_from_names_runs_and_exports(tmp_path: Path) -> None:
    bb = _tuned("test_tiny_reg")
    _fake_run(tmp_path, bb)
    x = torch.rand(40, 60, 3)
    want = bb.dense(x)
    for source in (tmp_path, tmp_path / EXPORT_DIR, str(tmp_path)):
        got = fit3d.load_backbone(str(source))
        assert not got.training
        torch.testing.assert_close(got.dense(x), want)
    assert fit3d.load_backbone("test_tiny").weights_info.source == "random"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a finished stage-2 run"):
        fit3d.load_backbone(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="drop weights="):
        fit3d.load_backbone(str(tmp_path), weights="random")


def test_export_replaces_an_older_folder_whole(tmp_path: Path) -> None:
    """A second export (a finished rerun) replaces the folder; no temp folders stay behind."""
    folder = tmp_path / EXPORT_DIR
    first, second = _tuned("test_tiny"), _tuned("test_tiny")
    write_export(folder, first, {"weights_sha256": "a"})
    (folder / "stale.txt").write_text("from the first export")
    write_export(folder, second, {"weights_sha256": "b"})
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXPORT_DIR]
    assert json.loads((folder / "config.json").read_text())["fit3d"]["weights_sha256"] == "b"


def test_import_fit3d_stays_light() -> None:
    """`import fit3d` loads neither torch nor timm; the public names come on first use."""
    import subprocess
    import sys

    code = (
        "import sys, fit3d; assert callable(fit3d.load_backbone); "
        "heavy = {'torch', 'timm'} & set(sys.modules); assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    assert fit3d.Backbone is Backbone


def _readme_snippet() -> str:
    """The python block of the README section "Use the features in your code"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the features in your code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ten lines, as written, from an image file to original / fine-tuned /
    assembled features (the `dinov2` alias swapped for the tiny random DINOv2 of the tests)."""
    code = _readme_snippet()
    assert 'fit3d.load_backbone("dinov2")' in code and "outputs/finetune/default" in code
    assert len(code.strip().splitlines()) <= 14
    run = tmp_path / "outputs" / "finetune" / "default"
    tuned = _tuned("test_tiny")
    _fake_run(run, tuned)
    image = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace('"dinov2"', '"test_tiny"'), scope)  # noqa: S102 - the README's own code
    f_orig, f_tuned, assembled = scope["f_orig"], scope["f_tuned"], scope["assembled"]
    assert f_orig.shape == f_tuned.shape == (1, 48, 6, 9)
    assert torch.equal(assembled, torch.cat([f_orig, f_tuned], 1))
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "photo.jpg")) / 255).float()
    torch.testing.assert_close(f_tuned, tuned.dense(pixels))
