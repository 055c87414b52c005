"""Training and scoring the probe heads for every feature set (`run_task`).

Per (probe, head, feature set): the learning rate is fixed (FiT3D's probes under
protocol=paper, Probe3D's DPT schedule) or picked from `eval.lrs` on validation views that are
neither train nor test (`eval.val_split`, else the last groups of the train split), then one
head per seed trains on all train views and is scored on the test split. Heads train on cached
features (`fit3d.eval.features`) or, for FiT3D's paper protocol, on augmented crops with
features recomputed each iteration (`fit3d.eval.paper`). Scores are computed per view and
totalled over the split and over each test group (`score`), so every headline metric is also
known per test room for the room-level verdicts (`fit3d.eval.verdict`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fit3d.config import Config
from fit3d.eval import data as D
from fit3d.eval import paper as P
from fit3d.eval.features import FEATURE_SETS, MapPlan, SplitFeatures, probe_input
from fit3d.eval.metrics import (
    ALIGNED_KEYS,
    DEPTH_KEYS,
    NORMAL_KEYS,
    aligned_depth_per_image,
    confusion_matrix,
    depth_per_image,
    mean_metrics,
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
from fit3d.eval.report import summarize
from fit3d.runs import autocast

SELECT = {"seg": ("miou", True), "depth": ("rmse", False), "normals": ("ang_rmse", False)}
"""Metric that picks the learning rate of each task (fast protocol) and its direction."""
PER_GROUP = {"seg": ("miou",), "depth": ("rmse",), "normals": ("within_30", "ang_rmse")}
"""Metrics of each task also kept per test group (`<metric>@<group>`): the verdict's."""
PER_GROUP_MAX = 64
"""Test groups (scenes) up to which metrics are also kept per group."""


INPUT_CACHE_BYTES = 1 << 30
"""Probe inputs and labels of one feature set kept in memory up to this many bytes (`Inputs`)."""


class Inputs:
    """One feature set's per-view probe inputs and labels, kept in memory while they fit in
    `budget` bytes: its learning-rate sweep and seeds read the same views ~5 times over. Views
    past the budget are read from the on-disk caches each time, so memory stays bounded whatever
    the number of views; `run_task` clears it between feature sets."""

    def __init__(self, budget: int = INPUT_CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.items: dict[tuple, tuple] = {}

    def get(self, key: tuple, make: Callable[[], tuple]) -> tuple:
        """The (input, label) of `key`, from memory or `make()` (then kept if it fits)."""
        if key in self.items:
            return self.items[key]
        item = make()
        size = sum(t.nbytes for x in item for t in (x if isinstance(x, list) else [x]))
        if self.used + size <= self.budget:
            self.items[key] = item
            self.used += size
        return item

    def clear(self) -> None:
        self.items.clear()
        self.used = 0


@dataclass
class Context:
    """Everything the probes of one run share."""

    cfg: Config
    device: torch.device
    backbones: dict
    notes: list[str]
    train: D.Split | None = None
    val: D.Split | None = None
    """Views that pick the learning rate (`eval.val_split`); None: the train split's last groups."""
    test: D.Split | None = None
    feats: dict[str, SplitFeatures] = field(default_factory=dict)
    """Cached features per split role (`train`, `val`, `test`)."""
    num_classes: int = 0
    min_depth: float = 1e-3
    max_depth: float = 10.0
    plan: MapPlan | None = None
    """Maps, image fit and normalisation of every feature pass (cached or live)."""
    inputs: Inputs = field(default_factory=Inputs)
    """The current feature set's probe inputs kept in memory (bounded)."""

    @property
    def amp(self):
        """Autocast of the probes' forward passes (None in fp32)."""
        ec = self.cfg.eval
        return autocast(self.device, ec.precision) if ec.precision != "fp32" else None

    @property
    def quarter(self) -> tuple[int, ...]:
        """Blocks the DPT heads read (one after each quarter of the network)."""
        return self.backbones["original"].quarter_blocks()

    def split(self, role: str) -> D.Split:
        return {"train": self.train, "val": self.val, "test": self.test}[role]


def group_keys(groups: list[str]) -> bool:
    """Whether per-group metrics are kept for a split with these view groups."""
    return 1 < len(set(groups)) <= PER_GROUP_MAX


def by_group(groups: list[str]) -> dict[str, list[int]]:
    """Group -> indices of its items, in first-seen group order."""
    out: dict[str, list[int]] = {}
    for n, g in enumerate(groups):
        out.setdefault(g, []).append(n)
    return out


# --- batches from the cache -----------------------------------------------------------------
def _stack(items: list) -> Tensor | list[Tensor]:
    if isinstance(items[0], list):
        return [torch.stack([it[k] for it in items]) for k in range(len(items[0]))]
    return torch.stack(items)


def _same_shape(feats: SplitFeatures, split: D.Split, positions: list[int]) -> list[list[int]]:
    """Positions grouped by (token grid, label size): each group stacks into one tensor."""
    out: dict[tuple, list[int]] = {}
    for n in positions:
        key = (feats.size(n), split.labels.size(n) if split.labels is not None else None)
        out.setdefault(key, []).append(n)
    return list(out.values())


def _micro(
    feats: SplitFeatures,
    split: D.Split,
    positions: list[int],
    parts,
    kind: str,
    task: str,
    quarter,
    inputs: Inputs,
) -> list[tuple]:
    def one(n: int) -> tuple:
        return probe_input(feats, n, parts, kind, quarter), D.label_batch(split, [n], task)[0]

    key = (split.role, tuple(parts), kind, task)
    out = []
    for same in _same_shape(feats, split, positions):
        items = [inputs.get((*key, n), lambda n=n: one(n)) for n in same]
        out.append((_stack([x for x, _ in items]), torch.stack([y for _, y in items])))
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
    inputs: Inputs,
    quarter=(),
) -> Iterator[list[tuple]]:
    """Endless optimiser steps of `batch` cached views (a seeded shuffle per epoch), read from
    the stores (or `inputs`) one micro-batch at a time."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = [positions[k] for k in torch.randperm(len(positions), generator=gen).tolist()]
        for chunk in D.chunked(order, batch):
            step = []
            for m in D.chunked(chunk, micro or batch):
                step += _micro(feats, split, m, parts, kind, task, quarter, inputs)
            yield step


# --- scoring --------------------------------------------------------------------------------
Predict = Callable[[list[int]], Iterator[tuple[Tensor, Tensor]]]
"""positions -> (prediction [B, ...], labels [B, ...]) micro-batches, in position order."""


@torch.no_grad()
def score(
    task: str,
    predict: Predict,
    split: D.Split,
    positions: list[int],
    num_classes: int,
    batch: int = 8,
    empty: str = "skip",
    aligned: bool = False,
) -> dict[str, float]:
    """Metrics of `predict` over the positions. With 2..PER_GROUP_MAX test groups, the metrics
    of `PER_GROUP[task]` are also given per group as `<metric>@<group>` (that group's views
    only). `empty`: what a view without valid ground truth adds (`fit3d.eval.metrics`);
    `aligned`: depth also gets Probe3D's scale-and-shift-aligned metrics."""
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
    if task == "seg":
        group_metrics = {g: seg_metrics(c) for g, c in conf_g.items()}
        out = seg_metrics(conf)
    else:
        keys = DEPTH_KEYS if task == "depth" else NORMAL_KEYS
        keys = keys + ALIGNED_KEYS if aligned else keys
        group_metrics = {g: mean_metrics(v, keys) for g, v in per_image.items()}
        out = mean_metrics([d for v in per_image.values() for d in v], keys)
    if group_keys(groups):
        for key in PER_GROUP[task]:
            out.update({f"{key}@{g}": m[key] for g, m in group_metrics.items()})
    return out


# --- heads on cached features ---------------------------------------------------------------
def _new_head(task: str, head: str, ctx: Context, x_example) -> torch.nn.Module:
    """A fresh head for inputs shaped like `x_example` (one view's probe input)."""
    ec = ctx.cfg.eval
    if head == "dpt":
        chans = [t.shape[0] for t in x_example]
        return DPTHead(chans, task, ec.dpt_hidden, ctx.max_depth, ctx.min_depth, code=ec.probe3d)
    c = x_example.shape[0]
    if task == "seg":
        return SegHead(c, ctx.num_classes)
    if task == "depth":  # its input ends with the original model's CLS token on every cell
        cls = ctx.backbones["original"].embed_dim
        return DepthHead(c, ctx.max_depth, ctx.min_depth, batch_norm=ec.protocol != "paper",
                         constant=cls)  # fmt: skip
    return NormalHead(c)


def _input_kind(task: str, head: str) -> str:
    return "dpt" if head == "dpt" else task


def fit_cached(
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
        ctx.inputs, ctx.quarter,
    )  # fmt: skip
    return train_head(
        module, batches, steps, lr, schedule, loss_fn(task, head, probe3d=ec.probe3d), ctx.device,
        wd, stride, amp=ctx.amp, desc=f"{task} {head} lr {lr:g} seed {seed}",
    )  # fmt: skip


def score_cached(
    task: str, head: str, parts, module, ctx: Context, role: str, positions: list[int]
) -> dict[str, float]:
    """Metrics of a head on cached features of `positions` of split `role`."""
    feats, split = ctx.feats[role], ctx.split(role)
    kind = _input_kind(task, head)

    def predict(chunk):
        for x, y in _micro(feats, split, chunk, parts, kind, task, ctx.quarter, ctx.inputs):
            x = [t.to(ctx.device).float() for t in x] if isinstance(x, list) else x.to(ctx.device)
            with ctx.amp or contextlib.nullcontext():
                out = module(x if isinstance(x, list) else x.float(), tuple(y.shape[1:3]))
            yield out, y

    empty, aligned = P.empty_rule(ctx.cfg.eval, task, head), task == "depth" and head == "dpt"
    return score(task, predict, split, positions, ctx.num_classes, empty=empty, aligned=aligned)


# --- FiT3D's paper protocol -----------------------------------------------------------------
def fit_paper(task: str, parts, ctx: Context, seed: int) -> torch.nn.Module:
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


def fit_probe3d_live(task: str, head: str, parts, ctx: Context, seed: int) -> torch.nn.Module:
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


def score_paper(task: str, parts, module, ctx: Context) -> dict[str, float]:
    """FiT3D's test-time inference: slide windows (segmentation) or flip averaging (depth)."""
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

    return score(task, predict, split, list(range(len(split))), ctx.num_classes, 1)


# --- one probe for every feature set --------------------------------------------------------
def width(task: str, feature_set: str, ctx: Context) -> int:
    """Channels of a linear probe's input for `feature_set`."""
    x = probe_input(ctx.feats["train"], 0, FEATURE_SETS[feature_set], task, ctx.quarter)
    return int(x.shape[0])


def _validation(ctx: Context) -> tuple[list[int], str, list[int]]:
    """(train positions the sweep fits on, role of the validation views, their positions)."""
    ec = ctx.cfg.eval
    if ctx.val is not None:
        return list(range(len(ctx.train))), "val", list(range(len(ctx.val)))
    fit, val = D.fit_val_views(ctx.train, ec.val_fraction)
    return fit, "train", val


def run_task(task: str, head: str, sets: list[str], ctx: Context) -> tuple[dict, dict]:
    """Train and score one probe for every feature set. Returns ({set: {key: summary}},
    {set: lr})."""
    ec = ctx.cfg.eval
    name = task if head == "linear" else f"{task}_dpt"
    missing = [
        r for r, s in (("train", ctx.train), ("test", ctx.test)) if s is None or task not in s.tasks
    ]
    if ctx.val is not None and task not in ctx.val.tasks:
        missing.append("val")
    if missing:
        ctx.notes.append(
            f"{' and '.join(missing)} split has no usable {task} labels: {name} probe skipped"
        )
        return {}, {}
    paper_linear = ec.protocol == "paper" and head == "linear" and task in ("seg", "depth")
    probe3d = head == "dpt" or (ec.protocol == "paper" and task == "normals")
    all_train = list(range(len(ctx.train)))
    test_pos = list(range(len(ctx.test)))
    fit, val_role, val = _validation(ctx)
    metrics, lrs = {}, {}
    key, higher = SELECT[task]
    for s in sets:
        t0 = time.perf_counter()
        parts = FEATURE_SETS[s]
        swept: dict[float, torch.nn.Module] = {}  # seed-0 heads on all train views, by lr
        if paper_linear:
            lrs[s] = 1e-3 if task == "seg" else 1e-4
        elif probe3d:
            lrs[s] = ec.dpt_lr
        else:
            sweep = len(ec.lrs) > 1 and (ec.sweep_each_set or s == sets[0]) and val
            scores = {}
            for lr in ec.lrs if sweep else ():
                m = fit_cached(task, head, parts, ctx, lr, ec.seeds[0], fit, False)
                got = score_cached(task, head, parts, m, ctx, val_role, val)[key]
                scores[lr] = got if higher else -got
                if fit == all_train:
                    swept[lr] = m
            if scores:
                lrs[s] = max(scores, key=scores.get)
            elif not ec.sweep_each_set and sets[0] in lrs:  # reused, scaled by width
                lrs[s] = lrs[sets[0]] * (width(task, sets[0], ctx) / width(task, s, ctx))
            else:
                lrs[s] = ec.lrs[0]
        per_seed: dict[str, list[float]] = {}
        for seed in ec.seeds:
            if paper_linear:
                module = fit_paper(task, parts, ctx, seed)
                m = score_paper(task, parts, module, ctx)
            elif probe3d and ec.protocol == "paper" and ec.probe3d_augment:
                module = fit_probe3d_live(task, head, parts, ctx, seed)
                m = score_cached(task, head, parts, module, ctx, "test", test_pos)
            else:
                module = swept.get(lrs[s]) if seed == ec.seeds[0] else None
                if module is None:
                    module = fit_cached(task, head, parts, ctx, lrs[s], seed, all_train, probe3d)
                m = score_cached(task, head, parts, module, ctx, "test", test_pos)
            for k, v in m.items():
                per_seed.setdefault(f"eval/{name}/{k}", []).append(v)
        metrics[s] = {k: summarize(v) for k, v in per_seed.items()}
        ctx.inputs.clear()  # the next set reads other inputs
        took = f" ({time.perf_counter() - t0:.0f} s)"
        print(f"  {name:11s} {s:11s} lr {lrs[s]:.3g}: " + short(metrics[s]) + took, flush=True)
    return metrics, lrs


def short(m: dict) -> str:
    """The headline values of one set's metrics, for a progress line."""
    keys = [k for k in m if "@" not in k and (
        k.split("/")[-1] in ("miou", "rmse", "absrel", "within_30", "ang_rmse") or "/corr/" in k
    )]  # fmt: skip
    return ", ".join(f"{k.split('/')[-1]} {m[k]['mean']:.4g}" for k in keys or m)
