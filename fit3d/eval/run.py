"""The evaluator's run: before/after report of FiT3D features (`python -m fit3d.eval`).

Feature sets (docs/method.md, "Evaluation: linear probes (FiT3D)"): `original` (the base backbone),
`fine-tuned` (stage 2's `<run.out>/finetune/<eval.finetune_run>/backbone.safetensors`, a file, or
FiT3D's released model `fit3d:<name>`), `assembled` (original ++ fine-tuned, FiT3D's default)
and `control` (original ++ original).

One code path for every dataset (`fit3d.eval.data`): inputs are checked first (weights, dataset
roots, ground truth), then frozen features of every view are extracted once per backbone into an
on-disk cache (`fit3d.eval.features`), then the probes stream from it: memory does not grow with
the number of views. Probes train on the train split and are scored on the test split:
- protocol=fast: linear heads on cached features; the learning rate is picked per (probe, feature
  set) from `eval.lrs` on a validation part of the train split, then one head per seed trains on
  all train views;
- protocol=paper: FiT3D's segmentation and depth probes exactly as its configs state
  (`fit3d.eval.paper`);
- `eval.head=dpt`: Probe3D's DPT head for depth and normals (Probe3D's schedule), in both;
- correspondence is zero-shot, computed as Probe3D computes it (`fit3d.eval.correspondence`).
Writes `results.json`, `results.md`, `results.png`, `pca.png`, `results.html` and `config.yaml`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fit3d.config import Config, to_dict, validate
from fit3d.errors import UserError
from fit3d.eval import data as D
from fit3d.eval import paper as P
from fit3d.eval.correspondence import run_corr
from fit3d.eval.features import FEATURE_SETS, MapPlan, SplitFeatures, feature_store, fill_features
from fit3d.eval.fitting import Context, by_group, run_task
from fit3d.eval.html import write_html
from fit3d.eval.report import pca_panel, write_report
from fit3d.eval.verdict import verdicts
from fit3d.export import refresh_card
from fit3d.runs import (
    BACKBONE_FILE,
    META_FILE,
    build_backbone,
    eval_cache_dir,
    provenance,
    read_meta,
    resolve_device,
    resolve_precision,
    run_dir,
    write_config,
)


# --- inputs ---------------------------------------------------------------------------------
def _finetuned(cfg: Config, original, notes: list[str]) -> tuple[object | None, dict]:
    """The fine-tuned backbone and its stage-2 meta.json. An explicit `eval.finetuned_weights`
    that does not load is a UserError (before any work); a missing stage-2 run is a note."""
    ec = cfg.eval
    if ec.finetuned_weights:  # a file or fit3d:<name>; anything that does not load stops here
        tuned = build_backbone(cfg, weights=ec.finetuned_weights)
        meta_path = Path(tuned.weights_info.path).parent / META_FILE
        return tuned, read_meta(meta_path) if meta_path.is_file() else {}
    if not ec.finetune_run:
        notes.append("no fine-tuned run set (eval.finetune_run=''): original and control only")
        return None, {}
    path = run_dir(cfg, "finetune", ec.finetune_run) / BACKBONE_FILE
    if not path.is_file():
        notes.append(
            f"no fine-tuned backbone at {path} (run stage 2 first, or set eval.finetune_run / "
            "eval.finetuned_weights): evaluating original and control only"
        )
        return None, {}
    meta_path = path.parent / META_FILE
    meta = read_meta(meta_path) if meta_path.is_file() else {}
    if not meta:
        notes.append(f"{path.parent} has no meta.json: stage 2 may not have finished")
    try:
        tuned = build_backbone(cfg, weights=str(path))
    except UserError as e:
        notes.append(f"{e}: evaluating original and control only")
        return None, meta
    base_sha = (meta.get("base_weights") or {}).get("sha256")
    if base_sha and base_sha != original.weights_info.sha256:
        notes.append(
            f"{path} was fine-tuned from weights sha256 {base_sha[:12]}, but the original here is "
            f"{original.weights_info.sha256[:12] or 'unhashed'}: the comparison mixes bases"
        )
    return tuned, meta


def _heads(cfg: Config) -> tuple[str, ...]:
    return {"linear": ("linear",), "dpt": ("dpt",), "both": ("linear", "dpt")}[cfg.eval.head]


def _plan(cfg: Config, backbone, need_final: bool, norm: str = "imagenet") -> MapPlan:
    """Maps every probe of this run reads from the cache (`norm`: the input normalisation)."""
    ec = cfg.eval
    n = backbone.num_blocks
    blocks = {n - 1}
    dpt = "dpt" in _heads(cfg) and {"depth", "normals"} & set(ec.probes) & set(ec.dpt_probes)
    if dpt:
        blocks |= set(backbone.quarter_blocks())
    if "corr" in ec.probes:
        blocks.add(ec.corr_block % n)
    return MapPlan(
        final=need_final,
        blocks=tuple(sorted(blocks)),
        block_cls=bool(dpt) and ec.dpt_input == "dense-cls",
        fit=ec.fit,
        norm=norm,
    )


def _pca(path: Path, sets: list[str], ctx: Context) -> None:
    """pca.png: the middle view of up to `eval.pca_views` test groups (cycling if fewer)."""
    split, feats = ctx.test, ctx.feats["test"]
    groups = split.groups
    members = list(by_group(groups).values())
    picks = []
    for k in range(ctx.cfg.eval.pca_views):
        views = members[k % len(members)]
        step = max(len(views) // 2, 1)
        n = views[((k // len(members)) * step) % len(views)]
        if n not in picks:
            picks.append(n)
    images = [split.ds[split.views[n]].image for n in picks]
    maps = {s: [feats.maps(n, FEATURE_SETS[s], "final").float() for n in picks] for s in sets}
    pca_panel(path, images, maps)


# --- the run --------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Evaluate the configured feature sets; writes the report into `<run.out>/eval/<run.name>/`
    and returns the results dict (what results.json holds)."""
    validate(cfg)  # the config's ranges, for callers that built `cfg` themselves
    P.check_options(cfg.eval)
    ec = cfg.eval
    t0, c0 = time.time(), time.process_time()
    device = resolve_device(cfg.run.device)
    # `auto` -> what this device runs (config.yaml, the cache keys and the report say which)
    cfg = replace(cfg, eval=replace(ec, precision=resolve_precision(ec.precision, device)))
    ec = cfg.eval
    torch.manual_seed(cfg.run.seed)
    notes: list[str] = []

    original = build_backbone(cfg).to(device)
    finetuned, ft_meta = _finetuned(cfg, original, notes)
    if finetuned is not None:
        finetuned.to(device)
    backbones = {"original": original} | ({"finetuned": finetuned} if finetuned else {})
    sets = [s for s in ec.feature_sets if all(p in backbones for p in FEATURE_SETS[s])]
    train, val, test = D.open_splits(cfg)  # roots and split files checked here
    splits = [s for s in (train, val, test) if s is not None]

    out_dir = run_dir(cfg, "eval")
    write_config(cfg, out_dir)
    cache = eval_cache_dir(cfg, out_dir)
    ctx = Context(cfg, device, backbones, notes, train=train, val=val, test=test)
    name = D.dataset_name(cfg)
    for split in splits:
        D.store_labels(cfg, split, cache / "labels" / f"{name}_{split.ds.split}", notes)
    ctx.num_classes = test.ds.num_classes or (train.ds.num_classes if train else 0)
    ctx.min_depth, ctx.max_depth = D.depth_range(cfg, test.ds)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    n_notes = len(notes)
    if train is not None and ec.batch_size > len(train):
        notes.append(
            f"eval.batch_size={ec.batch_size} (global) is more than the {len(train)} train views: "
            f"each step uses {len(train)}"
        )

    paper = ec.protocol == "paper"
    cached_probes = {"corr"} | ({"normals"} if paper else {"seg", "depth", "normals"})
    if "dpt" in _heads(cfg):
        cached_probes |= {"depth", "normals"} & set(ec.dpt_probes)
    need_cache = {p for p in ec.probes if p in cached_probes} or ec.pca_views > 0
    need_final = "seg" in ec.probes and not paper or ec.pca_views > 0
    plan = _plan(cfg, original, need_final, D.image_norm(cfg, test.ds))
    ctx.plan = plan
    options = f"resolution={cfg.scenes.resolution}" if name in D.SCENE_SETS else ""
    options += "".join(f" {k}={v}" for k, v in D.dataset_options(cfg, name).items())
    for split in (s for s in splits if need_cache):
        stores = {}
        for role, bb in backbones.items():
            folder = cache / "features" / role / f"{name}_{split.ds.split}"
            stores[role] = feature_store(folder, bb, plan, split, options, ec.precision, notes)
            fill_features(
                stores[role], bb, plan, split, device, ec.precision, ec.extract_batch,
                ec.num_workers, f"features {role} ({split.role})",
            )  # fmt: skip
        ctx.feats[split.role] = SplitFeatures(stores, plan)
    print(
        f"eval ({ec.protocol} protocol, {name}): {len(train) if train else 0} train views, "
        f"{len(val) if val else 0} validation views, {len(test)} test views, sets {sets}, "
        f"device {device}, precision {ec.precision}; "
        f"labels and features ready after {time.time() - t0:.0f} s",
        flush=True,
    )

    metrics: dict[str, dict] = {s: {} for s in sets}
    lrs: dict[str, dict] = {s: {} for s in sets}
    for probe in ec.probes:
        if probe == "corr":
            found = run_corr(sets, ctx)
            for s, m in found.items():
                metrics[s].update(m)
            continue
        if train is None:
            notes.append(f"dataset {name} has no train split: {probe} probe skipped")
            continue
        heads = _heads(cfg) if probe in ec.dpt_probes and probe != "seg" else ("linear",)
        for head in heads:
            found, chosen = run_task(probe, head, sets, ctx)
            label = probe if head == "linear" else f"{probe}_dpt"
            for s, lr in chosen.items():
                lrs[s][label] = lr
            for s, m in found.items():
                metrics[s].update(m)
    for n in notes[n_notes:]:
        print(f"warning: {n}", file=sys.stderr)
    if ec.pca_views > 0 and "test" in ctx.feats:
        _pca(out_dir / "pca.png", sets, ctx)

    results = {
        "feature_sets": sets,
        "metrics": metrics,
        "lr": lrs,
        "notes": notes,
        "protocol": ec.protocol,
        "as_published": P.as_published(ec, ec.probes, "dpt" in _heads(cfg)),
        "fixes": P.fixes_applied(ec, ec.probes, "dpt" in _heads(cfg)),
        "dataset": {
            "name": name,
            "train_split": train.ds.split if train else None,
            "val_split": val.ds.split if val else None,
            "test_split": test.ds.split,
        },  # fmt: skip
        "verdicts": [v.to_dict() for v in verdicts(metrics)],
        "paper": _paper_numbers(test.ds, cfg.backbone.name, sets),
        "provenance": {
            **provenance(original, weights_key="original_weights"),
            "finetuned_weights": finetuned.weights_info.to_dict() if finetuned else None,
            "finetune_meta": ft_meta,
            "train_scenes": list(dict.fromkeys(train.groups)) if train else [],
            "val_scenes": list(dict.fromkeys(val.groups)) if val else [],
            "test_scenes": list(dict.fromkeys(test.groups)),
            "views": {
                "train": len(train) if train else 0,
                "val": len(val) if val else 0,
                "test": len(test),
            },  # fmt: skip
            "device": str(device),
            "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        },
        "config": to_dict(cfg),
    }
    text = write_report(out_dir, results)
    if ec.finetune_run:  # the exported model's card shows these numbers (if they are its own)
        refresh_card(run_dir(cfg, "finetune", ec.finetune_run), results, text)
    write_html(out_dir, results, [p for p in ("results.png", "pca.png") if (out_dir / p).is_file()])
    print(text)
    prov = results["provenance"]
    print(f"eval: report in {out_dir} ({prov['seconds']:.0f} s, {prov['cpu_seconds']:.0f} CPU s)")
    return results


def _paper_numbers(ds, alias: str, sets: list[str]) -> dict:
    """Published numbers for this dataset and backbone: {"original": {key: v}, "assembled":
    {key: v}} (FiT3D's before/after; NaN-free), empty when the paper has none."""
    import math

    table = (ds.paper or {}).get(alias, {})
    out: dict[str, dict[str, float]] = {}
    for key, (before, after) in table.items():
        out.setdefault("original", {})[key] = before
        if not math.isnan(after):
            out.setdefault("assembled", {})[key] = after
    return out
