"""The evaluator's run: before/after report of FiT3D features (`python -m fit3d.eval`).

Feature sets (docs/method.md, "Evaluation: linear probes (FiT3D)"): `original` (the base backbone),
`fine-tuned` (stage 2's `<run.out>/finetune/<eval.finetune_run>/backbone.safetensors`), `assembled`
(original ++ fine-tuned, FiT3D's default) and `control` (original ++ original). Frozen features of
every view are extracted once per backbone and cached under `<run.out>/eval/<run.name>/features/`.

Probes train on the train scenes' views and are scored on the held-out (val) scenes. The learning
rate is picked per (probe, feature set) from `eval.lrs` on a validation split made of some train
scenes (never held-out views); then one probe per seed in `eval.seeds` trains on all train views.
Correspondence is zero-shot (Probe3D) on covisible view pairs of the held-out scenes.
Writes `results.json`, `results.md`, `results.png`, `pca.png` and `config.yaml`; prints the tables.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fit3d.config import Config, to_dict
from fit3d.errors import UserError
from fit3d.eval.correspondence import pair_errors
from fit3d.eval.features import (
    FEATURE_SETS,
    Labels,
    compose,
    concat_labels,
    depth_input,
    load_labels,
    scene_features,
)
from fit3d.eval.html import write_html
from fit3d.eval.metrics import correspondence_recall
from fit3d.eval.probes import TASKS, Task, evaluate_probe, train_probe
from fit3d.eval.report import pca_panel, summarize, write_report
from fit3d.geometry import select_pairs
from fit3d.runs import (
    BACKBONE_FILE,
    META_FILE,
    build_backbone,
    provenance,
    read_meta,
    run_dir,
    write_config,
)
from fit3d.scenes import open_scene, resolve_scenes

PROBES = (*TASKS, "corr")


@dataclass
class Split:
    """Cached features and labels of the chosen views of some scenes, stacked in scene order."""

    scene_ids: list[str]
    counts: list[int]  # views per scene
    feats: dict[str, dict[str, Tensor]]  # backbone tag -> {"norm", "raw", "cls"}
    labels: Labels
    num_classes: int | None


def _spaced(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n) (all if k <= 0 or k >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _load_split(cfg: Config, split: str, backbones: dict, cache: Path) -> Split:
    """Open the split's scenes, extract (or reuse) features of every backbone, load labels."""
    root, ids, resolution = resolve_scenes(cfg, split)
    parts: dict[str, list[dict[str, Tensor]]] = {tag: [] for tag in backbones}
    labels, counts, classes = [], [], None
    for sid in tqdm(ids, desc=f"features ({split})", unit="scene", file=sys.stdout):
        scene = open_scene(root, sid, resolution)
        views = _spaced(len(scene), cfg.eval.max_views)
        for tag, bb in backbones.items():
            parts[tag].append(scene_features(bb, scene, views, cache / tag / f"{sid}.safetensors"))
        labels.append(load_labels(scene, views))
        counts.append(len(views))
        classes = classes or scene.classes
    feats = {tag: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} for tag, ps in parts.items()}
    return Split(ids, counts, feats, concat_labels(labels), len(classes) if classes else None)


def _finetuned(cfg: Config, original, notes: list[str]) -> tuple[object | None, dict]:
    """The fine-tuned backbone (or None with a note saying why) and its stage-2 meta.json."""
    ec = cfg.eval
    if ec.finetuned_weights:
        path = Path(ec.finetuned_weights)
    elif ec.finetune_run:
        path = run_dir(cfg, "finetune", ec.finetune_run) / BACKBONE_FILE
    else:
        notes.append("no fine-tuned run set (eval.finetune_run=''): original and control only")
        return None, {}
    if not path.is_file():
        notes.append(
            f"no fine-tuned backbone at {path} (run stage 2 first, or set eval.finetune_run / "
            "eval.finetuned_weights): evaluating original and control only"
        )
        return None, {}
    meta_path = path.parent / META_FILE
    meta = read_meta(meta_path) if meta_path.is_file() else {}
    if not meta and not ec.finetuned_weights:
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


def _val_split(counts: list[int], fraction: float) -> tuple[Tensor, Tensor]:
    """(fit, val) view indices of the train split: the last max(1, fraction * n) train scenes
    validate (with a single train scene, every round(1 / fraction)-th view)."""
    total = sum(counts)
    if len(counts) == 1:
        idx = torch.arange(total)
        k = min(max(round(1 / max(fraction, 1e-6)), 2), max(total, 2))
        return idx[idx % k != k - 1], idx[idx % k == k - 1]
    n_val = min(max(round(fraction * len(counts)), 1), len(counts) - 1)
    start = sum(counts[: len(counts) - n_val])
    return torch.arange(start), torch.arange(start, total)


def _probe_input(task: Task, feats: dict[str, dict[str, Tensor]], parts: tuple[str, ...]) -> Tensor:
    """Probe input: seg -> final-norm features; depth -> pre-norm ++ original CLS; normals ->
    pre-norm features."""
    if task.name == "seg":
        return compose(feats, parts, "norm")
    if task.name == "depth":
        return depth_input(feats, parts)
    return compose(feats, parts, "raw")


def _run_probe(
    task: Task, sets: list[str], train: Split, test: Split, cfg: Config, notes: list[str]
) -> tuple[dict, dict]:
    """Sweep the learning rate on the validation split (per feature set; with
    eval.sweep_each_set=false only on the first, reused for the rest), then train one probe per
    seed on all train views and score it on the test views.
    Returns ({set: {key: summary}}, {set: lr})."""
    ec = cfg.eval
    y_tr, y_te = getattr(train.labels, task.name), getattr(test.labels, task.name)
    if y_tr is None or y_te is None:
        which = "train" if y_tr is None else "held-out"
        notes.append(f"{which} scenes have no {task.name} labels: {task.name} probe skipped")
        return {}, {}
    num_classes = train.num_classes or int(
        max(y[y != 255].max() if (y != 255).any() else 0 for y in (y_tr, y_te)) + 1
    )
    kwargs = {"num_classes": num_classes, "max_depth": ec.max_depth}
    fit, val = _val_split(train.counts, ec.val_fraction)
    metrics, lrs = {}, {}
    for s in sets:
        x_tr = _probe_input(task, train.feats, FEATURE_SETS[s])
        x_te = _probe_input(task, test.feats, FEATURE_SETS[s])
        scores = {}
        sweep = len(ec.lrs) > 1 and (ec.sweep_each_set or s == sets[0])
        for lr in ec.lrs if sweep else ():
            torch.manual_seed(ec.seeds[0])
            head = task.head(x_tr.shape[1], **kwargs)
            head = train_probe(
                head,
                task,
                x_tr[fit],
                y_tr[fit],
                lr,
                ec.epochs,
                ec.batch_size,
                ec.seeds[0],
                ec.label_stride,
            )
            m = evaluate_probe(head, task, x_tr[val], y_tr[val], num_classes=num_classes)
            scores[lr] = m[task.select] if task.higher_is_better else -m[task.select]
        lrs[s] = max(scores, key=scores.get) if scores else lrs.get(sets[0], ec.lrs[0])
        per_seed: dict[str, list[float]] = {}
        for seed in ec.seeds:
            torch.manual_seed(seed)
            head = task.head(x_tr.shape[1], **kwargs)
            head = train_probe(
                head, task, x_tr, y_tr, lrs[s], ec.epochs, ec.batch_size, seed, ec.label_stride
            )
            m = evaluate_probe(head, task, x_te, y_te, num_classes=num_classes)
            for k, v in m.items():
                per_seed.setdefault(f"eval/{task.name}/{k}", []).append(v)
        metrics[s] = {k: summarize(v) for k, v in per_seed.items()}
        print(f"  {task.name:8s} {s:11s} lr {lrs[s]:g}: " + _short(metrics[s]), flush=True)
    return metrics, lrs


def _short(m: dict) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v['mean']:.4g}" for k, v in m.items())


def _run_corr(sets: list[str], test: Split, cfg: Config, notes: list[str]) -> dict:
    """Zero-shot correspondence recall of every feature set on covisible held-out view pairs."""
    lab = test.labels
    if lab.depth is None:
        notes.append("held-out scenes have no depth: correspondence probe skipped")
        return {}
    pairs, start = [], 0
    for n in test.counts:
        sl = slice(start, start + n)
        found = select_pairs(
            list(lab.depth[sl]),
            lab.Ks[sl],
            lab.viewmats[sl],
            cfg.eval.pairs_per_scene,
            cfg.eval.min_overlap,
            cfg.run.seed,
        )
        pairs += [(start + i, start + j, rot) for i, j, rot in found]
        start += n
    if not pairs:
        notes.append(f"no held-out view pair overlaps >= {cfg.eval.min_overlap}: corr skipped")
        return {}
    rots = torch.tensor([r for _, _, r in pairs])
    out = {}
    for s in sets:
        f = compose(test.feats, FEATURE_SETS[s], "norm")
        errors = [
            pair_errors(
                f[i],
                f[j],
                lab.depth[i],
                lab.Ks[i],
                lab.Ks[j],
                lab.viewmats[i],
                lab.viewmats[j],
                lab.sizes[j],
                cfg.eval.top_k,
            )
            for i, j, _ in pairs
        ]
        rec = correspondence_recall(errors, rots)
        out[s] = {f"eval/corr/{k}": summarize([v]) for k, v in rec.items()}
        print(f"  corr     {s:11s} ({len(pairs)} pairs): " + _short(out[s]), flush=True)
    return out


def _pca(path: Path, sets: list[str], test: Split, cfg: Config) -> None:
    """pca.png of the first view of up to `eval.pca_views` held-out scenes (cycling if fewer)."""
    root, ids, resolution = resolve_scenes(cfg, "val")
    starts = [sum(test.counts[:k]) for k in range(len(test.counts))]
    picks = [(k % len(ids), k // len(ids)) for k in range(cfg.eval.pca_views)]
    images, index = [], []
    for scene_k, offset in picks:
        if offset >= test.counts[scene_k]:
            continue
        scene = open_scene(root, ids[scene_k], resolution)
        views = _spaced(len(scene), cfg.eval.max_views)
        step = max(len(views) // 2, 1)
        images.append(scene.load_image(views[(offset * step) % len(views)]))
        index.append(starts[scene_k] + (offset * step) % len(views))
    maps = {s: [compose(test.feats, FEATURE_SETS[s], "norm")[i] for i in index] for s in sets}
    pca_panel(path, images, maps)


def run(cfg: Config) -> dict:
    """Evaluate the configured feature sets; writes the report into `<run.out>/eval/<run.name>/`
    and returns the results dict (what results.json holds)."""
    ec = cfg.eval
    unknown = [p for p in ec.probes if p not in PROBES]
    if unknown:
        raise UserError(f"unknown eval.probes {unknown} (known: {list(PROBES)})")
    unknown = [s for s in ec.feature_sets if s not in FEATURE_SETS]
    if unknown:
        raise UserError(f"unknown eval.feature_sets {unknown} (known: {list(FEATURE_SETS)})")
    if not ec.seeds or not ec.lrs:
        raise UserError("eval.seeds and eval.lrs must not be empty")
    t0, c0 = time.time(), time.process_time()
    out_dir = run_dir(cfg, "eval")
    write_config(cfg, out_dir)
    torch.manual_seed(cfg.run.seed)
    notes: list[str] = []

    original = build_backbone(cfg)
    finetuned, ft_meta = _finetuned(cfg, original, notes)
    backbones = {"original": original} | ({"finetuned": finetuned} if finetuned else {})
    sets = [s for s in ec.feature_sets if all(p in backbones for p in FEATURE_SETS[s])]
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)

    cache = out_dir / "features"
    train = _load_split(cfg, "train", backbones, cache)
    test = _load_split(cfg, "val", backbones, cache)
    print(
        f"eval: {len(train.scene_ids)} train scenes ({sum(train.counts)} views), "
        f"{len(test.scene_ids)} held-out scenes ({sum(test.counts)} views), sets {sets}",
        flush=True,
    )
    metrics: dict[str, dict] = {s: {} for s in sets}
    lrs: dict[str, dict] = {s: {} for s in sets}
    n_notes = len(notes)
    for probe in ec.probes:
        if probe == "corr":
            found = _run_corr(sets, test, cfg, notes)
        else:
            found, chosen = _run_probe(TASKS[probe], sets, train, test, cfg, notes)
            for s, lr in chosen.items():
                lrs[s][probe] = lr
        for s, m in found.items():
            metrics[s].update(m)
    for n in notes[n_notes:]:
        print(f"warning: {n}", file=sys.stderr)
    if ec.pca_views > 0:
        _pca(out_dir / "pca.png", sets, test, cfg)

    results = {
        "feature_sets": sets,
        "metrics": metrics,
        "lr": lrs,
        "notes": notes,
        "provenance": {
            **provenance(original, weights_key="original_weights"),
            "finetuned_weights": finetuned.weights_info.to_dict() if finetuned else None,
            "finetune_meta": ft_meta,
            "train_scenes": train.scene_ids,
            "test_scenes": test.scene_ids,
            "views": {"train": sum(train.counts), "test": sum(test.counts)},
            "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        },
        "config": to_dict(cfg),
    }
    text = write_report(out_dir, results)
    write_html(out_dir, results, [p for p in ("results.png", "pca.png") if (out_dir / p).is_file()])
    print(text)
    prov = results["provenance"]
    print(f"eval: report in {out_dir} ({prov['seconds']:.0f} s, {prov['cpu_seconds']:.0f} CPU s)")
    return results
