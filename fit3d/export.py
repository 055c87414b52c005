"""Sharing a fine-tuned backbone: a timm / Hugging Face model folder with its model card, and
`load_backbone`, fit3d's public way to a backbone's dense features in other code.

Stage 2 writes `<run>/timm_model/` (`EXPORT_DIR`) next to `backbone.safetensors`:
- `config.json`: timm's model config (architecture, the arguments it was built with, and the
  preprocessing fit3d trained with: ImageNet mean/std, bilinear, the whole image, no crop), plus a
  `fit3d` block (alias, base weights, the run's weights sha256) that `load_backbone` reads;
- `model.safetensors`: the plain timm state dict (the same tensors as `backbone.safetensors`);
- `README.md`: a model card (Hugging Face front matter; backbone, data, steps, stage 2's held-out
  checks, and one evaluation table per evaluator run on these weights, which `fit3d.eval`
  refreshes through `refresh_card`).
`timm.create_model("local-dir:<folder>", pretrained=True)` loads it; `huggingface-cli upload
<user>/<repo> <folder>` publishes it as it is, after which `hf-hub:<user>/<repo>` loads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

EXPORT_DIR = "timm_model"
"""A fine-tune run's exported model folder."""
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FIT3D_KEY = "fit3d"
"""The block of config.json that fit3d writes (timm ignores it)."""
DATA_CONFIG = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "squash",
}
"""The preprocessing recorded in config.json (`fit3d.backbones`: ImageNet mean/std, resize of the
whole image without a crop)."""
_HUB_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "other")
"""Licence ids of timm's pretrained configs that the Hugging Face hub knows as they are."""
_EVAL_BEGIN, _EVAL_END = "<!-- fit3d-eval-begin {} -->", "<!-- fit3d-eval-end {} -->"
_NO_EVAL = "No evaluation yet: `python -m fit3d.eval` on this run adds its tables here."


def export_dir(finetune_run: str | Path) -> Path:
    """The exported model folder of a stage-2 run."""
    return Path(finetune_run) / EXPORT_DIR


def timm_config(backbone: Any, info: dict[str, Any]) -> dict[str, Any]:
    """timm's config.json for `backbone` (a `fit3d.backbones.Backbone`): the architecture, the
    arguments it is built with (`model_args`, applied by `timm.create_model`), the source
    checkpoint's facts (tag, licence, input size) with fit3d's preprocessing, and `info` under
    `fit3d`. Written here rather than by timm's `save_for_hf`, whose arguments and output changed
    across timm 1.0.x; the format is what timm's hub and `local-dir:` loaders read."""
    src = dict(backbone.model.pretrained_cfg)
    keep = ("tag", "input_size", "min_input_size", "first_conv", "classifier", "license")
    cfg = {k: src[k] for k in keep if src.get(k) is not None}
    cfg |= {**DATA_CONFIG, "num_classes": 0, "fixed_input_size": False, "custom_load": False}
    return {
        "architecture": src["architecture"],
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": backbone.model.global_pool,
        "model_args": {"num_classes": 0, "dynamic_img_size": True, **backbone.create_kwargs},
        "pretrained_cfg": cfg,
        FIT3D_KEY: info,
    }


def write_export(
    folder: str | Path, backbone: Any, meta: dict[str, Any], weights_file: str | Path = ""
) -> Path:
    """Write `backbone` (a `fit3d.backbones.Backbone`) as a timm model folder with a model card
    built from the stage-2 `meta`. `weights_file`: a file already holding
    `backbone.timm_state_dict()` (stage 2's backbone.safetensors), hard-linked (else copied) as
    model.safetensors instead of written again. The folder appears complete or not at all (built
    beside it, then renamed). Returns the folder."""
    from fit3d.io import write_json, write_safetensors

    folder = Path(folder)
    part, old = folder.with_name(f".{folder.name}.part"), folder.with_name(f".{folder.name}.old")
    for stale in (part, old):
        shutil.rmtree(stale, ignore_errors=True)
    part.mkdir(parents=True)
    info = {
        "backbone": backbone.alias,
        "timm_name": backbone.timm_name,
        "base_weights": backbone.weights_info.to_dict(),
        "weights_sha256": meta.get("weights_sha256", ""),
    }
    if weights_file:
        try:
            os.link(weights_file, part / WEIGHTS_FILE)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(weights_file, part / WEIGHTS_FILE)
    else:
        write_safetensors(part / WEIGHTS_FILE, backbone.timm_state_dict(), {"format": "pt"})
    config = timm_config(backbone, info)
    write_json(part / "config.json", config)
    license_ = config["pretrained_cfg"].get("license") or "other"
    (part / CARD_FILE).write_text(model_card(info, meta, license_))
    if folder.exists():
        folder.rename(old)
    part.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) else "-"


def model_card(info: dict[str, Any], meta: dict[str, Any], license_: str) -> str:
    """README.md of an exported model: front matter, details, held-out checks, evaluation, use."""
    base = info["base_weights"]
    hub = f"timm/{info['timm_name']}" if base.get("source") == "timm" else ""
    front = ["---", "library_name: timm"]
    if license_ in _HUB_LICENSES:
        front.append(f"license: {license_}")
    else:  # a model-specific licence (DINOv3's): the hub's form for one
        front += ["license: other", f"license_name: {license_}"]
    front += ["pipeline_tag: image-feature-extraction", "tags:", "- timm", "- fit3d"]
    front += [f"base_model: {hub}"] if hub else []
    front.append("---")
    batch, opt = meta.get("batch") or {}, meta.get("optimizer") or {}
    precision = ((meta.get("config") or {}).get("finetune") or {}).get("precision", "-")
    lines = [
        *front,
        f"# {info['backbone']} ({info['timm_name']}), 3D-aware fine-tuned with fit3d",
        "",
        "The ViT's dense features fine-tuned towards multi-view-consistent features lifted into "
        "3D Gaussians (FiT3D's method, Yue et al., ECCV 2024), with fit3d. Use the patch tokens "
        "of the last block after the final norm; FiT3D concatenates them with the original "
        "model's (`assembled` features).",
        "",
        "## Model details",
        f"- Backbone: `{info['backbone']}` = timm `{info['timm_name']}`, width "
        f"{meta.get('embed_dim', '-')}",
        f"- Base weights: {base.get('source', '-')} `{Path(base.get('path') or '-').name}` "
        f"(sha256 {base.get('sha256') or '-'})",
        f"- Fine-tuning data: {meta.get('train_scenes', '-')} scenes, "
        f"{meta.get('train_views', '-')} views (lift run `{meta.get('lift_run', '-')}`)",
        f"- Steps: {meta.get('steps', '-')} optimizer steps ({meta.get('epochs', '-')} epochs), "
        f"global batch {batch.get('global_batch', '-')}, AdamW lr {opt.get('lr', '-')}, weight "
        f"decay {opt.get('weight_decay', '-')}, gradient clip {opt.get('grad_clip', '-')}, "
        f"precision {precision}, {meta.get('world_size', '-')} device(s), "
        f"{meta.get('seconds', '-')} s",
        f"- Weights sha256: {info['weights_sha256'] or '-'}; fit3d commit "
        f"{meta.get('git_commit', '-')}",
        "- Preprocessing: RGB in [0, 1], the whole image resized (bilinear, no crop) to a "
        "multiple of the patch size, ImageNet mean/std (config.json)",
        "",
        "## Held-out checks (stage 2)",
        "",
        *_heldout_table(meta.get("heldout") or {}),
        "",
        "## Evaluation",
        "",
        _NO_EVAL,
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        "",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()',
        "# or hf-hub:<user>/<repo> once uploaded; x: [B, 3, H, W], H and W multiples of the patch",
        "tokens = model.forward_features(x)  # [B, prefix + h*w, C], final norm applied",
        "patches = tokens[:, model.num_prefix_tokens :]  # [B, h*w, C] dense features",
        "```",
        "",
        'With fit3d: `fit3d.load_backbone("<this folder>").dense(image)` -> [1, C, h, w] for '
        "an image [H, W, 3] in [0, 1].",
        "",
    ]
    return "\n".join(lines)


def _heldout_table(heldout: dict[str, Any]) -> list[str]:
    """Markdown rows: masked L1 to the lifted targets and correspondence cosine, before/after."""
    l1 = heldout.get("masked_l1") or {}
    corr = heldout.get("correspondence_cosine")
    rows = ["| | original | fine-tuned |", "|---|---|---|"]
    rows.append(
        f"| masked L1 to lifted features, {l1.get('views', '-')} held-out views (lower is "
        f"better) | {_fmt(l1.get('original'))} | {_fmt(l1.get('finetuned'))} |"
    )
    if isinstance(corr, dict):
        o, f = corr.get("original") or {}, corr.get("finetuned") or {}
        rows.append(
            f"| token cosine at {corr.get('matches', '-')} ground-truth correspondences "
            f"(higher is better) | {_fmt(o.get('match'))} | {_fmt(f.get('match'))} |"
        )
        rows.append(
            f"| token cosine over all token pairs (reference) | {_fmt(o.get('any'))} | "
            f"{_fmt(f.get('any'))} |"
        )
    elif corr:
        rows += ["", f"Correspondence check: {corr}"]
    return rows


def refresh_card(finetune_run: str | Path, results: dict[str, Any], tables: str) -> bool:
    """Put an evaluator run's `tables` (its results.md tables) into the model card of
    `finetune_run`'s export, replacing that evaluator run's earlier tables. Only when the export
    exists and holds the weights evaluated as `fine-tuned` (same sha256); returns whether the card
    changed."""
    from fit3d.io import atomic_path

    folder = export_dir(finetune_run)
    card, config = folder / CARD_FILE, folder / "config.json"
    if not card.is_file() or not config.is_file():
        return False
    ours = json.loads(config.read_text()).get(FIT3D_KEY, {}).get("weights_sha256")
    evaluated = (results.get("provenance") or {}).get("finetuned_weights") or {}
    if not ours or evaluated.get("sha256") != ours:
        return False
    key = str((results.get("config") or {}).get("run", {}).get("name", "default"))
    data = results.get("dataset") or {}
    prov = results.get("provenance") or {}
    views = prov.get("views") or {}
    body = (
        f"### {data.get('name', '?')}, {results.get('protocol', '?')} protocol (eval run "
        f"`{key}`)\n\n{views.get('train', 0)} train / {views.get('test', 0)} test views, test "
        f"scenes {', '.join(prov.get('test_scenes') or []) or '-'}. Feature sets: `original` "
        "(the base model), `fine-tuned` (this model), `assembled` (both, concatenated), "
        "`control` (the base model twice).\n\n" + _nested(tables)
    )
    begin, end = _EVAL_BEGIN.format(key), _EVAL_END.format(key)
    block = f"{begin}\n{body}\n{end}"
    text = card.read_text()
    old = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if old.search(text):
        text = old.sub(lambda _: block, text)
    elif _NO_EVAL in text:
        text = text.replace(_NO_EVAL, block)
    else:
        text = text.replace("\n## Use\n", f"\n{block}\n\n## Use\n")
    with atomic_path(card) as tmp:
        tmp.write_text(text)
    return True


def _nested(report: str) -> str:
    """An evaluator report's markdown placed under a card's `###` heading: headings two levels
    down, pictures left out (they stay in the eval run's folder)."""
    text = re.sub(r"^!\[.*\]\(.*\)\n?", "", report.strip(), flags=re.M)
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text, flags=re.M)


def load_backbone(source: str = "dinov2", weights: str | None = None):
    """A `fit3d.backbones.Backbone` in eval mode on the CPU: fit3d's public entry to features.

    `source`: a backbone alias or timm name (its original weights, or `weights`: a file,
    `fit3d:<name>` or `random`); or a folder: a finished stage-2 run (`outputs/finetune/<run>`)
    or a model folder stage 2 exported -> the fine-tuned model. Anything else is a `UserError`.
    """
    from fit3d.backbones import Backbone
    from fit3d.errors import UserError
    from fit3d.runs import BACKBONE_FILE, META_FILE, read_meta

    folder = Path(source).expanduser()
    if not folder.is_dir():
        return Backbone(source, weights)
    if weights:
        raise UserError(f"{folder} is a model folder with its own weights: drop weights=")
    if (folder / BACKBONE_FILE).is_file() and (folder / META_FILE).is_file():
        meta = read_meta(folder / META_FILE)
        return Backbone(meta["backbone"], str(folder / BACKBONE_FILE))
    config = folder / "config.json"
    info = read_meta(config).get(FIT3D_KEY) if config.is_file() else None
    if info:
        return Backbone(info["backbone"], str(folder / WEIGHTS_FILE))
    raise UserError(
        f"{folder} is neither a finished stage-2 run ({META_FILE} + {BACKBONE_FILE}) nor a model "
        f"folder stage 2 exported (<run>/{EXPORT_DIR})"
    )
