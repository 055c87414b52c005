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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fit3d.config import Config, to_dict
from fit3d.errors import UserError
from fit3d.eval import data as D
from fit3d.eval import paper as P
from fit3d.eval.correspondence import navi_pair_errors, pair_errors
from fit3d.eval.features import (
    FEATURE_SETS,
    MapPlan,
    SplitFeatures,
    feature_store,
    fill_features,
    probe_input,
)
from fit3d.eval.html import write_html
from fit3d.eval.metrics import (
    ALIGNED_KEYS,
    DEPTH_KEYS,
    NORMAL_KEYS,
    aligned_depth_per_image,
    confusion_matrix,
    correspondence_recall,
    depth_per_image,
    mean_metrics,
    navi_recall,
    normal_per_image,
    seg_metrics,
)
from fit3d.eval.probes import (
    DepthHead,
    DPTHead,
    NormalHead,
    SegHead,
    fast_schedule,
    loss_fn,
    mmcv_cosine,
    mmcv_poly,
    one_cycle_beta1,
    probe3d_schedule,
    train_head,
)
from fit3d.eval.report import pca_panel, summarize, write_report
from fit3d.geometry import relative_rotation, select_pairs
from fit3d.runs import (
    BACKBONE_FILE,
    META_FILE,
    PRECISIONS,
    autocast,
    build_backbone,
    eval_cache_dir,
    provenance,
    read_meta,
    resolve_device,
    resolve_precision,
    run_dir,
    write_config,
)

PROBES = ("seg", "depth", "normals", "corr")
PROTOCOLS = ("fast", "paper")
HEADS = ("linear", "dpt", "both")
SELECT = {"seg": ("miou", True), "depth": ("rmse", False), "normals": ("ang_rmse", False)}
"""Metric that picks the learning rate of each task (fast protocol) and its direction."""


# --- inputs ---------------------------------------------------------------------------------
def _check(cfg: Config) -> None:
    """Config values that would only fail later: a one-line UserError now."""
    ec = cfg.eval
    for key, value, known in (
        ("probes", ec.probes, PROBES),
        ("feature_sets", ec.feature_sets, tuple(FEATURE_SETS)),
    ):
        bad = [v for v in value if v not in known]
        if bad:
            raise UserError(f"unknown eval.{key} {bad} (known: {list(known)})")
    for key, value, known in (
        ("protocol", ec.protocol, PROTOCOLS),
        ("head", ec.head, HEADS),
        ("precision", ec.precision, PRECISIONS),
    ):
        if value not in known:
            raise UserError(f"eval.{key} must be one of {list(known)}, got {value!r}")
    if not ec.seeds or not ec.lrs:
        raise UserError("eval.seeds and eval.lrs must not be empty")
    for key in ("batch_size", "paper_batch_size", "extract_batch", "label_stride"):
        if getattr(ec, key) < 1:
            raise UserError(f"eval.{key} must be >= 1, got {getattr(ec, key)}")
    for key in ("batch_size", "paper_batch_size"):
        if ec.micro_batch and getattr(ec, key) % ec.micro_batch:
            raise UserError(
                f"eval.{key}={getattr(ec, key)} (a global batch) is not a multiple of "
                f"eval.micro_batch={ec.micro_batch}: the global batch cannot be honoured"
            )
    if ec.depth_crop and len(ec.depth_crop) != 2:
        raise UserError(f"eval.depth_crop must be [h, w], got {list(ec.depth_crop)}")
    P.check_options(ec)


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


# --- batches from the cache -----------------------------------------------------------------
def _stack(items: list) -> Tensor | list[Tensor]:
    if isinstance(items[0], list):
        return [torch.stack([it[k] for it in items]) for k in range(len(items[0]))]
    return torch.stack(items)


def _groups(feats: SplitFeatures, split: D.Split, positions: list[int]) -> list[list[int]]:
    """Positions grouped by (token grid, label size): each group stacks into one tensor."""
    groups: dict[tuple, list[int]] = {}
    for n in positions:
        key = (feats.size(n), split.labels.size(n) if split.labels is not None else None)
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _micro(
    feats: SplitFeatures, split: D.Split, positions: list[int], parts, kind: str, task: str, quarter
) -> list[tuple]:
    out = []
    for group in _groups(feats, split, positions):
        x = _stack([probe_input(feats, n, parts, kind, quarter) for n in group])
        y = torch.stack(D.label_batch(split, group, task))
        out.append((x, y))
    return out


def cached_batches(
    feats: SplitFeatures,
    split: D.Split,
    positions: list[int],
    parts,
    kind: str,
    task: str,
    batch: int,
    micro: int,
    seed: int,
    quarter=(),
) -> Iterator[list[tuple]]:
    """Endless optimiser steps of `batch` cached views (a seeded shuffle per epoch), read from
    the stores one micro-batch at a time."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = [positions[k] for k in torch.randperm(len(positions), generator=gen).tolist()]
        for chunk in D.chunked(order, batch):
            step = []
            for m in D.chunked(chunk, micro or batch):
                step += _micro(feats, split, m, parts, kind, task, quarter)
            yield step


PER_GROUP_MAX = 64
"""Test groups (scenes) up to which each probe's headline metric is also kept per group."""


def _group_keys(groups: list[str]) -> bool:
    """Whether per-group metrics are kept for a split with these view groups."""
    return 1 < len(set(groups)) <= PER_GROUP_MAX


def _by_group(groups: list[str]) -> dict[str, list[int]]:
    """Group -> indices of its items, in first-seen group order."""
    out: dict[str, list[int]] = {}
    for n, g in enumerate(groups):
        out.setdefault(g, []).append(n)
    return out


@torch.no_grad()
def _score(
    task: str,
    predict,
    split: D.Split,
    positions: list[int],
    num_classes: int,
    device: torch.device,
    batch: int = 8,
    empty: str = "skip",
    aligned: bool = False,
) -> dict[str, float]:
    """Metrics of `predict(group) -> (prediction [B, H, W(, 3)], labels)` over the positions,
    in position order. With 2..PER_GROUP_MAX test groups, the probe's headline metric (`SELECT`)
    is also given per group as `<metric>@<group>` (over that group's views only). `empty`: what
    a view without valid ground truth adds (`fit3d.eval.metrics`); `aligned`: depth also gets
    Probe3D's scale-and-shift-aligned metrics."""
    groups = [split.groups[n] for n in positions]
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf_g = {g: torch.zeros_like(conf) for g in groups}
    per_image: dict[str, list[dict]] = {g: [] for g in groups}  # none from a view w/o valid GT
    k = 0  # position of the next prediction
    for chunk in D.chunked(positions, batch):
        for pred, y in predict(chunk):
            if task == "seg":
                # class last: a CPU argmax over dim 1 of [B, K, H, W] took 3x as long
                pred = pred.permute(0, 2, 3, 1).contiguous().argmax(-1).cpu()  # [B, H, W]
            else:
                pred = (pred if task == "depth" else pred[..., :3]).float().cpu()
            for b, g in enumerate(groups[k : k + len(pred)]):  # per view, for its group
                if task == "seg":
                    c = confusion_matrix(pred[b : b + 1], y[b : b + 1], num_classes)
                    conf += c
                    conf_g[g] += c
                else:
                    per_view = depth_per_image if task == "depth" else normal_per_image
                    got = per_view(pred[b : b + 1], y[b : b + 1].float(), empty=empty)
                    if aligned and got:
                        got[0] |= aligned_depth_per_image(pred[b : b + 1], y[b : b + 1].float())[0]
                    per_image[g] += got
            k += len(pred)
    key = SELECT[task][0]
    if task == "seg":
        group_metrics = {g: seg_metrics(c) for g, c in conf_g.items()}
        out = seg_metrics(conf)
    else:
        keys = DEPTH_KEYS if task == "depth" else NORMAL_KEYS
        keys = keys + ALIGNED_KEYS if aligned else keys
        group_metrics = {g: mean_metrics(v, keys) for g, v in per_image.items()}
        out = mean_metrics([d for v in per_image.values() for d in v], keys)
    if _group_keys(groups):
        out.update({f"{key}@{g}": m[key] for g, m in group_metrics.items()})
    return out


class Context:
    """Everything the probes share in one run."""

    def __init__(self, cfg: Config, device: torch.device, backbones: dict, notes: list[str]):
        self.cfg, self.device, self.backbones, self.notes = cfg, device, backbones, notes
        self.amp = autocast(device, cfg.eval.precision) if cfg.eval.precision != "fp32" else None
        self.train: D.Split | None = None
        self.test: D.Split
        self.feats: dict[str, SplitFeatures] = {}
        self.quarter: tuple[int, ...] = backbones["original"].quarter_blocks()
        self.num_classes = 0
        self.max_depth = 10.0
        self.min_depth = 1e-3
        self.plan: MapPlan | None = None  # fit and normalisation of every feature pass


def _new_head(task: str, head: str, ctx: Context, x_example) -> torch.nn.Module:
    """A fresh head for inputs shaped like `x_example` (one view's probe input)."""
    ec = ctx.cfg.eval
    paper = ec.protocol == "paper"
    if head == "dpt":
        chans = [t.shape[0] for t in x_example]
        return DPTHead(chans, task, ec.dpt_hidden, ctx.max_depth, ctx.min_depth, code=ec.probe3d)
    c = x_example.shape[0]
    if task == "seg":
        return SegHead(c, ctx.num_classes)
    if task == "depth":
        return DepthHead(c, ctx.max_depth, ctx.min_depth, batch_norm=not paper)
    return NormalHead(c)


def _input_kind(task: str, head: str) -> str:
    return "dpt" if head == "dpt" else task


def _fit_cached(
    task: str, head: str, parts, ctx: Context, lr: float, seed: int, positions: list[int],
    probe3d: bool,
) -> torch.nn.Module:  # fmt: skip
    """Train one head on cached features of `positions` of the train split."""
    ec = ctx.cfg.eval
    feats, split = ctx.feats["train"], ctx.train
    kind = _input_kind(task, head)
    epochs = ec.dpt_epochs if probe3d else ec.epochs
    steps = epochs * D.steps_per_epoch(len(positions), ec.batch_size)
    if probe3d:  # Probe3D: AdamW (wd 0.01), 1.5 of 10 epochs warm-up, cosine
        schedule, wd, stride = probe3d_schedule(steps, 0.15 * steps), 0.01, 1
    else:
        schedule, wd, stride = fast_schedule(steps), 1e-4, ec.label_stride
    torch.manual_seed(seed)
    module = _new_head(task, head, ctx, probe_input(feats, positions[0], parts, kind, ctx.quarter))
    batches = cached_batches(
        feats, split, positions, parts, kind, task, ec.batch_size, ec.micro_batch, seed,
        ctx.quarter,
    )  # fmt: skip
    return train_head(
        module, batches, steps, lr, schedule, loss_fn(task, head, probe3d=ec.probe3d), ctx.device,
        wd, stride, amp=ctx.amp, desc=f"{task} {head} lr {lr:g} seed {seed}",
    )  # fmt: skip


def _score_cached(task: str, head: str, parts, module, ctx: Context, role: str, positions) -> dict:
    feats, split = ctx.feats[role], ctx.train if role == "train" else ctx.test
    kind = _input_kind(task, head)

    def predict(chunk):
        for x, y in _micro(feats, split, chunk, parts, kind, task, ctx.quarter):
            x = [t.to(ctx.device).float() for t in x] if isinstance(x, list) else x.to(ctx.device)
            with ctx.amp or _null():
                out = module(x if isinstance(x, list) else x.float(), tuple(y.shape[1:3]))
            yield out, y

    empty, aligned = P.empty_rule(ctx.cfg.eval, task, head), task == "depth" and head == "dpt"
    return _score(
        task, predict, split, positions, ctx.num_classes, ctx.device, empty=empty, aligned=aligned
    )


def _null():
    import contextlib

    return contextlib.nullcontext()


def _fit_paper(task: str, parts, ctx: Context, seed: int) -> torch.nn.Module:
    """FiT3D's segmentation or depth probe, features recomputed on augmented crops."""
    ec = ctx.cfg.eval
    split = ctx.train
    batch = ec.paper_batch_size
    if batch > len(split):
        ctx.notes.append(
            f"eval.paper_batch_size={batch} (global) is more than the {len(split)} train views: "
            f"each {task} step uses {len(split)}"
        )
    if task == "seg":
        iters = P.scaled_iters(ec.seg_iters, batch)
        warm = P.scaled_iters(ec.seg_warmup, batch) if ec.seg_warmup else 0
        schedule, lr, wd, clip, beta1 = mmcv_poly(iters, warm), 1e-3, 1e-4, 0.0, None
    else:
        iters = P.scaled_iters(ec.depth_iters, batch)
        warm = P.scaled_iters(ec.depth_warmup, batch) if ec.depth_warmup else 0
        schedule, lr, wd, clip = mmcv_cosine(iters, warm), 1e-4, 0.01, 35.0
        beta1 = one_cycle_beta1(iters)
    crop = tuple(ec.depth_crop) or P.DEPTH_CROP.get(split.ds.name, (416, 544))
    views = P.AugmentedViews(
        split, task, seed, ec.seg_crop, ec.seg_scale, crop, gamma_on_255=not ec.fixes
    )
    torch.manual_seed(seed)
    first = views[0][0][None].to(ctx.device)
    example = P.live_features(ctx.backbones, parts, first, task, ec.precision, ctx.plan)[0]
    module = _new_head(task, "linear", ctx, example)
    batches = P.augmented_batches(
        views, ctx.backbones, parts, batch, ec.micro_batch or batch, ctx.device, ec.precision,
        ec.num_workers, plan=ctx.plan,
    )  # fmt: skip
    warmup = P.scaled_iters(ec.sigloss_warmup, batch) if ec.sigloss_warmup else 0
    loss = loss_fn(task, "linear", warmup, as_published=not ec.fixes, gpu_batch=ec.paper_gpu_batch)
    return train_head(
        module, batches, iters, lr, schedule, loss, ctx.device, wd,
        1, clip, beta1, ctx.amp, desc=f"{task} paper seed {seed}",
    )  # fmt: skip


def _fit_probe3d_live(task: str, head: str, parts, ctx: Context, seed: int) -> torch.nn.Module:
    """A Probe3D probe (normals, or a DPT head) trained as Probe3D trains it: on augmented images
    (`fit3d.eval.paper`, Probe3D augmentation) with features recomputed, its schedule."""
    ec = ctx.cfg.eval
    split = ctx.train
    kind = _input_kind(task, head)
    steps = ec.dpt_epochs * D.steps_per_epoch(len(split), ec.batch_size)
    views = P.AugmentedViews(split, task, seed, ec.seg_crop, ec.seg_scale, (), probe3d=True)
    torch.manual_seed(seed)
    first = views[0][0][None].to(ctx.device)
    example = P.live_features(
        ctx.backbones, parts, first, kind, ec.precision, ctx.plan, ctx.quarter
    )  # fmt: skip
    example = [t[0] for t in example] if isinstance(example, list) else example[0]
    module = _new_head(task, head, ctx, example)
    batches = P.augmented_batches(
        views, ctx.backbones, parts, ec.batch_size, ec.micro_batch or ec.batch_size, ctx.device,
        ec.precision, ec.num_workers, kind, ctx.plan, ctx.quarter,
    )  # fmt: skip
    return train_head(
        module, batches, steps, ec.dpt_lr, probe3d_schedule(steps, 0.15 * steps),
        loss_fn(task, head, probe3d=ec.probe3d), ctx.device, 0.01, 1, amp=ctx.amp,
        desc=f"{task} {head} probe3d seed {seed}",
    )  # fmt: skip


def _score_paper(task: str, parts, module, ctx: Context) -> dict:
    ec = ctx.cfg.eval
    split = ctx.test

    def predict(chunk):
        for n in chunk:
            s = split.ds[split.views[n]]
            y = D.label_batch(split, [n], task)[0]
            image = s.image.to(ctx.device)
            if task == "seg":
                img = P.seg_test_image(image, tuple(ec.seg_scale))
                logits = P.slide_logits(
                    module, ctx.backbones, parts, img, ec.seg_crop, P.SEG_STRIDE, ec.precision,
                    ctx.plan,
                )  # fmt: skip
                logits = torch.nn.functional.interpolate(
                    logits[None], size=tuple(y.shape), mode="bilinear", align_corners=False
                )
                yield logits, y[None]
            else:
                pred = P.flip_depth(module, ctx.backbones, parts, image, tuple(y.shape),
                                    ec.precision, ctx.plan)  # fmt: skip
                yield pred[None], y[None]

    return _score(task, predict, split, list(range(len(split))), ctx.num_classes, ctx.device, 1)


def _run_task(task: str, head: str, sets: list[str], ctx: Context) -> tuple[dict, dict]:
    """Train and score one probe for every feature set. Returns ({set: {key: summary}},
    {set: lr})."""
    ec = ctx.cfg.eval
    name = task if head == "linear" else f"{task}_dpt"
    need = "seg" if task == "seg" else task
    missing = [
        r for r, s in (("train", ctx.train), ("test", ctx.test)) if s is None or need not in s.tasks
    ]
    if missing:
        ctx.notes.append(
            f"{' and '.join(missing)} split has no usable {need} labels: {name} probe skipped"
        )
        return {}, {}
    paper_linear = ec.protocol == "paper" and head == "linear" and task in ("seg", "depth")
    probe3d = head == "dpt" or (ec.protocol == "paper" and task == "normals")
    all_train = list(range(len(ctx.train)))
    test_pos = list(range(len(ctx.test)))
    fit, val = D.fit_val_views(ctx.train, ec.val_fraction)
    metrics, lrs = {}, {}
    key, higher = SELECT[task]
    for s in sets:
        t0 = time.perf_counter()
        parts = FEATURE_SETS[s]
        if paper_linear:
            lrs[s] = 1e-3 if task == "seg" else 1e-4
        elif probe3d:
            lrs[s] = ec.dpt_lr
        else:
            sweep = len(ec.lrs) > 1 and (ec.sweep_each_set or s == sets[0]) and val
            scores = {}
            for lr in ec.lrs if sweep else ():
                m = _fit_cached(task, head, parts, ctx, lr, ec.seeds[0], fit, False)
                got = _score_cached(task, head, parts, m, ctx, "train", val)[key]
                scores[lr] = got if higher else -got
            if scores:
                lrs[s] = max(scores, key=scores.get)
            elif not ec.sweep_each_set and sets[0] in lrs:  # reused, scaled by width
                lrs[s] = lrs[sets[0]] * _width(task, sets[0], ctx) / _width(task, s, ctx)
            else:
                lrs[s] = ec.lrs[0]
        per_seed: dict[str, list[float]] = {}
        for seed in ec.seeds:
            if paper_linear:
                module = _fit_paper(task, parts, ctx, seed)
                m = _score_paper(task, parts, module, ctx)
            elif probe3d and ec.protocol == "paper" and ec.probe3d_augment:
                module = _fit_probe3d_live(task, head, parts, ctx, seed)
                m = _score_cached(task, head, parts, module, ctx, "test", test_pos)
            else:
                module = _fit_cached(task, head, parts, ctx, lrs[s], seed, all_train, probe3d)
                m = _score_cached(task, head, parts, module, ctx, "test", test_pos)
            for k, v in m.items():
                per_seed.setdefault(f"eval/{name}/{k}", []).append(v)
        metrics[s] = {k: summarize(v) for k, v in per_seed.items()}
        took = f" ({time.perf_counter() - t0:.0f} s)"
        print(f"  {name:11s} {s:11s} lr {lrs[s]:g}: " + _short(metrics[s]) + took, flush=True)
    return metrics, lrs


def _width(task: str, feature_set: str, ctx: Context) -> int:
    """Channels of a linear probe's input for `feature_set`."""
    x = probe_input(ctx.feats["train"], 0, FEATURE_SETS[feature_set], task, ctx.quarter)
    return int(x.shape[0])


def _short(m: dict) -> str:
    keys = [k for k in m if "@" not in k and (
        k.split("/")[-1] in ("miou", "rmse", "absrel", "within_30", "ang_rmse") or "/corr/" in k
    )]  # fmt: skip
    return ", ".join(f"{k.split('/')[-1]} {m[k]['mean']:.4g}" for k in keys or m)


# --- correspondence ---------------------------------------------------------------------------
def _pairs(ctx: Context) -> list[tuple[int, int, float]]:
    """(position i, position j, rotation deg) of the test split's correspondence pairs: the
    dataset's fixed pairs, else covisible pairs picked per group (`fit3d.geometry`)."""
    ec, split = ctx.cfg.eval, ctx.test
    pos = {v: n for n, v in enumerate(split.views)}
    infos = [split.ds.info(v) for v in split.views]
    fixed = split.ds.pairs()
    if fixed:
        out = [(pos[i], pos[j]) for i, j in fixed if i in pos and j in pos]
        return [(i, j, relative_rotation(infos[i].viewmat, infos[j].viewmat)) for i, j in out]
    pairs = []
    for members in _by_group([info.group for info in infos]).values():
        depths, Ks = [], []
        for n in members:  # 1/4-resolution depth: pair selection needs no more
            d = D.label_batch(split, [n], "depth")[0]
            small = torch.nn.functional.interpolate(d[None, None], scale_factor=0.25)[0, 0]
            K = infos[n].K.double().clone()
            K[:2] *= 0.25
            depths.append(small)
            Ks.append(K)
        found = select_pairs(
            depths, Ks, [infos[n].viewmat for n in members], ec.pairs_per_scene, ec.min_overlap,
            ctx.cfg.run.seed,
        )  # fmt: skip
        pairs += [(members[i], members[j], rot) for i, j, rot in found]
    return pairs


def _recall(errors: list[Tensor], rots: Tensor, groups: list[str]) -> dict[str, float]:
    """`correspondence_recall` of the pairs, plus `recall_10px@<group>` over each group's pairs
    (with 2..PER_GROUP_MAX groups). errors: [M_i] per pair; rots: [P] degrees; groups: [P]."""
    out = correspondence_recall(errors, rots)
    if _group_keys(groups):
        for g, ns in _by_group(groups).items():
            got = correspondence_recall([errors[n] for n in ns], rots[ns])
            out[f"recall_10px@{g}"] = got["recall_10px"]
    return out


def _navi_recall(
    err3d: list[Tensor], err2d: list[Tensor], rots: Tensor, groups: list[str]
) -> dict[str, float]:
    """`navi_recall` of the pairs, plus `recall_2cm@<group>` (with 2..PER_GROUP_MAX groups)."""
    out = navi_recall(err3d, err2d, rots)
    if _group_keys(groups):
        for g, ns in _by_group(groups).items():
            got = navi_recall([err3d[n] for n in ns], [err2d[n] for n in ns], rots[ns])
            out[f"recall_2cm@{g}"] = got["recall_2cm"]
    return out


def _K(split: D.Split, n: int, infos: list) -> Tensor:
    """Intrinsics of view n: its ViewInfo's, else (sets that compute K per crop, e.g. NAVI) the
    sample's."""
    K = infos[n].K
    return K if K is not None else split.ds[split.views[n]].K


def _run_corr(sets: list[str], ctx: Context) -> dict:
    """Zero-shot correspondence recall of every feature set on the test split's pairs."""
    ec, split = ctx.cfg.eval, ctx.test
    if "corr" not in split.tasks:
        ctx.notes.append("test split has no usable depth and poses: corr probe skipped")
        return {}
    pairs = _pairs(ctx)
    if not pairs:
        ctx.notes.append(f"no test view pair overlaps >= {ec.min_overlap}: corr skipped")
        return {}
    infos = [split.ds.info(v) for v in split.views]
    rots = torch.tensor([r for _, _, r in pairs])
    block = f"block{ec.corr_block % ctx.backbones['original'].num_blocks}"
    feats = ctx.feats["test"]
    by_set = {s: tuple(FEATURE_SETS[s]) for s in sets}
    parts = list(dict.fromkeys(p for ps in by_set.values() for p in ps))
    errors: dict[str, list] = {s: [] for s in sets}
    navi = P.corr_protocol(ec, split.ds.name) == "navi"
    for i, j, _ in tqdm(pairs, desc="corr", leave=False, disable=None):
        d0, d1 = D.label_batch(split, [i], "depth")[0], D.label_batch(split, [j], "depth")[0]
        found = (navi_pair_errors if navi else pair_errors)(
            {p: feats.maps(i, (p,), block) for p in parts},
            {p: feats.maps(j, (p,), block) for p in parts},
            by_set, d0, d1, _K(split, i, infos), _K(split, j, infos), infos[i].viewmat,
            infos[j].viewmat, ec.top_k,
        )  # fmt: skip
        for s in sets:
            errors[s].append(found[s])
    pair_groups = [infos[i].group for i, _, _ in pairs]
    out = {}
    for s in sets:
        if navi:
            err3d, err2d = [e[0] for e in errors[s]], [e[1] for e in errors[s]]
            rec = _navi_recall(err3d, err2d, rots, pair_groups)
        else:
            rec = _recall(errors[s], rots, pair_groups)
        out[s] = {f"eval/corr/{k}": summarize([v]) for k, v in rec.items()}
        print(f"  corr        {s:11s} ({len(pairs)} pairs): " + _short(out[s]), flush=True)
    return out


def _pca(path: Path, sets: list[str], ctx: Context) -> None:
    """pca.png: the middle view of up to `eval.pca_views` test groups (cycling if fewer)."""
    split, feats = ctx.test, ctx.feats["test"]
    groups = split.groups
    members = list(_by_group(groups).values())
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
    _check(cfg)
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
    train, test = D.open_splits(cfg)  # roots and split files checked here

    out_dir = run_dir(cfg, "eval")
    write_config(cfg, out_dir)
    cache = eval_cache_dir(cfg, out_dir)
    ctx = Context(cfg, device, backbones, notes)
    ctx.train, ctx.test = train, test
    name = D.dataset_name(cfg)
    for split in (s for s in (train, test) if s is not None):
        D.store_labels(cfg, split, cache / "labels" / f"{name}_{split.ds.split}", notes)
    ctx.num_classes = test.ds.num_classes or (train.ds.num_classes if train else 0)
    ctx.min_depth, ctx.max_depth = D.depth_range(cfg, test.ds)
    norm = D.image_norm(cfg, test.ds)
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
    plan = _plan(cfg, original, need_final, norm)
    ctx.plan = plan
    options = f"resolution={cfg.scenes.resolution}" if name in D.SCENE_SETS else ""
    options += "".join(f" {k}={v}" for k, v in D.dataset_options(cfg, name).items())
    for split in (s for s in (train, test) if s is not None and need_cache):
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
        f"{len(test)} test views, sets {sets}, device {device}, precision {ec.precision}; "
        f"labels and features ready after {time.time() - t0:.0f} s",
        flush=True,
    )

    metrics: dict[str, dict] = {s: {} for s in sets}
    lrs: dict[str, dict] = {s: {} for s in sets}
    for probe in ec.probes:
        if probe == "corr":
            found = _run_corr(sets, ctx)
            for s, m in found.items():
                metrics[s].update(m)
            continue
        if train is None:
            notes.append(f"dataset {name} has no train split: {probe} probe skipped")
            continue
        heads = _heads(cfg) if probe in ec.dpt_probes and probe != "seg" else ("linear",)
        for head in heads:
            found, chosen = _run_task(probe, head, sets, ctx)
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
            "test_split": test.ds.split,
        },  # fmt: skip
        "paper": _paper_numbers(test.ds, cfg.backbone.name, sets),
        "provenance": {
            **provenance(original, weights_key="original_weights"),
            "finetuned_weights": finetuned.weights_info.to_dict() if finetuned else None,
            "finetune_meta": ft_meta,
            "train_scenes": list(dict.fromkeys(train.groups)) if train else [],
            "test_scenes": list(dict.fromkeys(test.groups)),
            "views": {"train": len(train) if train else 0, "test": len(test)},
            "device": str(device),
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
