"""What the evaluator reads: the configured dataset's train and test splits (through
`fit3d.datasets.open_dataset`, the only way in) and their ground truth, checked once and stored in
a `ViewStore` so probes stream labels instead of holding them.

One code path for every dataset: `eval.dataset` empty means the scene set of `scenes` (`demo` or
`scannetpp`, opened with the scene options: root, resolution, split files, `eval.max_views` per
scene); any other name is opened at `eval.dataset_root` (with the `eval.nyu_*` options of the NYU
readers). Ground truth is stored as the probes use it: segmentation uint8 (255 = ignore), depth
float32 metres with pixels outside the protocol's range (min_depth, gt_max_depth or max_depth) set
to 0, normals float32 [H, W, 4]: xyz (0 = none) and whether the pixel counts (channel 3; by
`eval.normals_valid`: depth > 0 as Probe3D, or a non-zero normal). The set's `eval_mask` (pixels
outside it count nowhere) applies to its `mask_tasks`; a test-time crop (`mask_is_crop`: Eigen's,
Garg's) applies to the test split only unless `eval.crop_train_labels`, as the originals train
on every labelled pixel. A split whose depth or normals hold NaN or infinite values loses that
task, with one line naming the first such view; the other tasks run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from fit3d.config import Config
from fit3d.datasets import DATASETS, EvalSet, open_dataset
from fit3d.datasets.base import evenly_spaced
from fit3d.errors import UserError
from fit3d.eval.cache import ViewStore, fill, keys_digest

SCENE_SETS = ("demo", "scannetpp")
"""Datasets opened from the `scenes` section (posed scene folders)."""
DEFAULT_TEST_SPLIT = {
    "nyuv2": "test",
    "kitti": "test",
    "scannet1500": "test",
    "nyu_normals": "test",
}
"""Datasets scored on `test` (no val split, or the papers score there); others use `val`."""
DEFAULT_TRAIN_SPLIT = {"nyu_normals": "trainval", "navi": "trainval"}
"""Datasets whose probes train on another split than `train` (Probe3D trains on `trainval`)."""
NO_TRAIN_SPLIT = ("scannet1500",)
"""Datasets without a train split (correspondence only)."""
LABELS_VERSION = 2
"""Bumped when the stored ground-truth encoding changes (invalidates label stores)."""


@dataclass
class Split:
    """One split as the evaluator sees it: the set, the chosen views and their stored labels."""

    role: str  # "train" or "test"
    ds: EvalSet
    views: list[int]  # indices into ds
    labels: ViewStore | None = None
    tasks: set[str] = field(default_factory=set)  # ground truth usable after checks

    def __len__(self) -> int:
        return len(self.views)

    @cached_property
    def keys(self) -> list[str]:
        """Key of each chosen view (computed once: the views are fixed)."""
        return [self.ds.info(i).key for i in self.views]

    @cached_property
    def groups(self) -> list[str]:
        """Group (scene) of each chosen view (computed once: the probes ask ~2500 times)."""
        return [self.ds.info(i).group for i in self.views]


def dataset_name(cfg: Config) -> str:
    """The dataset evaluated: `eval.dataset`, else `scenes.name`."""
    return cfg.eval.dataset or cfg.scenes.name


def _open(cfg: Config, split: str) -> EvalSet:
    """Open one split of the configured dataset (see the module docstring)."""
    name = dataset_name(cfg)
    if name not in DATASETS:
        raise UserError(f"unknown eval.dataset {name!r} (known: {', '.join(DATASETS)})")
    if name in SCENE_SETS:
        sc = cfg.scenes
        if cfg.eval.dataset_root:
            root = Path(cfg.eval.dataset_root).expanduser()
        else:
            from dataclasses import replace

            from fit3d.scenes import scenes_root

            root = scenes_root(replace(cfg, scenes=replace(sc, name=name)))
        return open_dataset(
            name,
            root,
            split,
            resolution=sc.resolution,
            max_views=cfg.eval.max_views,
            max_scenes=sc.max_scenes,
            train_split=sc.train_split,
            val_split=sc.val_split,
        )
    if not cfg.eval.dataset_root:
        raise UserError(
            f"eval.dataset={name} needs eval.dataset_root=PATH (its official layout: "
            f"`fit3d.datasets.{DATASETS[name][0]}` and the README's Datasets section)"
        )
    root = Path(cfg.eval.dataset_root).expanduser()
    return open_dataset(name, root, split, **dataset_options(cfg, name))


def dataset_options(cfg: Config, name: str) -> dict:
    """Reader options the config sets for dataset `name` (`eval.nyu_depth`,
    `eval.nyu_center_crop`)."""
    return {
        "nyuv2": {"depth": cfg.eval.nyu_depth},
        "nyu_normals": {"center_crop": cfg.eval.nyu_center_crop},
    }.get(name, {})


def open_splits(cfg: Config) -> tuple[Split | None, Split | None, Split]:
    """(train, val, test) splits of the configured dataset: train is None for test-only
    datasets, val None unless `eval.val_split` names one (the views that pick learning rates).
    Every root and split file is validated here, before any long work."""
    name = dataset_name(cfg)
    test_split = cfg.eval.test_split or DEFAULT_TEST_SPLIT.get(name, "val")
    default_train = "" if name in NO_TRAIN_SPLIT else DEFAULT_TRAIN_SPLIT.get(name, "train")
    train_split = cfg.eval.train_split or default_train
    val_split = cfg.eval.val_split if train_split else ""
    per_scene = name in SCENE_SETS  # the scene reader already keeps max_views per scene
    out: list[Split | None] = []
    for role, split in (("train", train_split), ("val", val_split), ("test", test_split)):
        if not split:
            out.append(None)
            continue
        ds = _open(cfg, split)
        views = list(range(len(ds))) if per_scene else evenly_spaced(len(ds), cfg.eval.max_views)
        if not views:
            raise UserError(f"dataset {name} split {split!r} has no views")
        out.append(Split(role, ds, views))
    roles = {s.role: s.ds.split for s in out if s is not None}
    if len(set(roles.values())) < len(roles):
        raise UserError(f"eval splits must differ (train, val, test): {roles}")
    return out[0], out[1], out[2]  # type: ignore[return-value]


def depth_range(cfg: Config, ds: EvalSet) -> tuple[float, float]:
    """(min_depth, max_depth) in metres of the depth bins: `eval.max_depth`, else the dataset's,
    else 10."""
    return float(ds.min_depth), float(cfg.eval.max_depth or ds.max_depth or 10.0)


def gt_depth_range(cfg: Config, ds: EvalSet) -> tuple[float, float]:
    """(lo, hi): ground-truth depth counts where lo < depth < hi (metres): `eval.max_depth`,
    else the dataset's `gt_max_depth`, else the bins' range (`depth_range`)."""
    lo, hi = depth_range(cfg, ds)
    return lo, float(cfg.eval.max_depth or ds.gt_max_depth or hi)


def image_norm(cfg: Config, ds: EvalSet) -> str:
    """Input normalisation of the evaluated images (`eval.image_norm`; `auto` = the dataset's)."""
    return ds.image_norm if cfg.eval.image_norm == "auto" else cfg.eval.image_norm


def _label_spec(tasks: set[str]) -> dict:
    spec = {}
    if "seg" in tasks:
        spec["seg"] = ("uint8", ("h", "w"))
    if "depth" in tasks:
        spec["depth"] = ("float32", ("h", "w"))
    if "normals" in tasks:
        spec["normals"] = ("float32", ("h", "w", 4))
    return spec


def normals_label(normals: torch.Tensor, depth: torch.Tensor | None, valid_by: str) -> torch.Tensor:
    """Stored normals [H, W, 4]: xyz [H, W, 3] (0 = none) and 1 where the pixel counts: depth > 0
    (`valid_by="depth"`, Probe3D, if the set has depth) or a non-zero normal (`"normal"`)."""
    if valid_by == "depth" and depth is not None:
        counts = depth > 0
    else:
        counts = normals.square().sum(-1) > 0.25
    return torch.cat([normals, counts[..., None].to(normals.dtype)], -1)


def store_labels(
    cfg: Config, split: Split, folder: Path, notes: list[str], batch: int = 16
) -> None:
    """Read every chosen view's ground truth once, check it, and keep it in `split.labels`.

    Sets `split.tasks` to the tasks whose ground truth is present and finite in every view;
    each task dropped is one line in `notes`.
    """
    ds = split.ds
    tasks = set(ds.tasks) & {"seg", "depth", "normals"}
    notes.extend(getattr(ds, "notes", []))
    lo, hi = gt_depth_range(cfg, ds)
    crop = split.role == "test" or cfg.eval.crop_train_labels or not ds.mask_is_crop
    mask_tasks = ds.mask_tasks if crop else frozenset()
    options = f"resolution={cfg.scenes.resolution}" if ds.name in SCENE_SETS else ""
    options += "".join(f" {k}={v}" for k, v in dataset_options(cfg, ds.name).items())
    identity = {
        "labels_version": LABELS_VERSION,
        "dataset": ds.name,
        "root": str(getattr(ds, "root", "")),
        "split": ds.split,
        "keys_sha256": keys_digest(split.keys),
        "depth_range": [lo, hi],
        "mask_tasks": sorted(mask_tasks),
        "normals_valid": cfg.eval.normals_valid,
        "options": options,
    }
    spec = _label_spec(tasks)
    if not spec:
        split.tasks = set(ds.tasks) & {"corr"}
        return
    store = ViewStore(folder, spec, identity, len(split))
    if store.note:
        notes.append(store.note)
    bad: dict[str, str] = dict(_read_bad(folder))

    def make(idx: list[int]) -> list[dict[str, torch.Tensor]]:
        recs = []
        for n in idx:
            s = ds[split.views[n]]
            rec = {}
            masks = {t: s.eval_mask if t in mask_tasks else None for t in spec}
            if "seg" in spec:
                seg, mask = s.seg.clone(), masks["seg"]
                if mask is not None:
                    seg[~mask] = 255
                rec["seg"] = seg.clamp(0, 255).to(torch.uint8)
            depth = None
            if s.depth is not None and ("depth" in spec or "normals" in spec):
                d = s.depth.float()
                finite = torch.isfinite(d)
                if not finite.all() and "depth" not in bad and "depth" in spec:
                    bad["depth"] = f"{s.key}: {int((~finite).sum())} NaN/inf depth pixels"
                depth = torch.where(finite & (d > lo) & (d < hi), d, torch.zeros_like(d))
            if "depth" in spec:
                mask = masks["depth"]
                rec["depth"] = depth if mask is None else depth * mask
            if "normals" in spec:
                nm = s.normals.float()
                finite = torch.isfinite(nm).all(-1)
                if not finite.all() and "normals" not in bad:
                    bad["normals"] = f"{s.key}: {int((~finite).sum())} NaN/inf normal pixels"
                nm = torch.where(finite[..., None], nm, torch.zeros_like(nm))
                nm = normals_label(nm, depth, cfg.eval.normals_valid)
                if masks["normals"] is not None:
                    nm = nm * masks["normals"][..., None]
                rec["normals"] = nm
            recs.append(rec)
        _write_bad(folder, bad)
        return recs

    if not store.complete:
        with tqdm(
            total=len(split), initial=store.done, desc=f"labels ({split.role})", unit="view",
            disable=None,
        ) as bar:  # fmt: skip
            fill(store, make, batch, bar.update)
    split.labels = store
    split.tasks = set(tasks)
    if "depth" in ds.tasks and "corr" in ds.tasks:
        split.tasks.add("corr")
    for task, why in sorted(bad.items()):
        dropped = {"depth": "depth and corr probes", "normals": "normals probe"}[task]
        notes.append(f"{ds.name} {ds.split}: {why}; {dropped} skipped (fix or zero those pixels)")
        split.tasks.discard(task)
        if task == "depth":
            split.tasks.discard("corr")


def _read_bad(folder: Path) -> list[tuple[str, str]]:
    path = folder / "problems.txt"
    if not path.is_file():
        return []
    return [tuple(ln.split("\t", 1)) for ln in path.read_text().splitlines() if "\t" in ln]


def _write_bad(folder: Path, bad: dict[str, str]) -> None:
    """Problems found so far, kept beside the store so a resumed pass still reports them."""
    from fit3d.io import atomic_path

    with atomic_path(folder / "problems.txt") as tmp:
        tmp.write_text("".join(f"{k}\t{v}\n" for k, v in sorted(bad.items())))


def label_batch(split: Split, idx: list[int], task: str) -> list[torch.Tensor]:
    """Stored ground truth of `task` for the chosen views `idx` (positions in split.views)."""
    assert split.labels is not None
    return [split.labels.read(n, (task,))[task] for n in idx]


def fit_val_views(split: Split, fraction: float) -> tuple[list[int], list[int]]:
    """(fit, val) positions of the train split for picking a learning rate: the last
    max(1, fraction * groups) groups validate; with one group, every round(1/fraction)-th view."""
    groups = split.groups
    order = list(dict.fromkeys(groups))
    n = len(groups)
    if len(order) == 1:
        k = min(max(round(1 / max(fraction, 1e-6)), 2), max(n, 2))
        return [i for i in range(n) if i % k != k - 1], [i for i in range(n) if i % k == k - 1]
    n_val = min(max(round(fraction * len(order)), 1), len(order) - 1)
    held = set(order[len(order) - n_val :])
    return [i for i in range(n) if groups[i] not in held], [
        i for i in range(n) if groups[i] in held
    ]


def chunked(seq: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of at most `size` items."""
    return [seq[i : i + size] for i in range(0, len(seq), max(size, 1))]


def steps_per_epoch(n: int, batch: int) -> int:
    return max(math.ceil(n / max(batch, 1)), 1)
