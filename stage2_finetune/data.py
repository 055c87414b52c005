"""(scene, view) samples from a stage-1 run: image, rendered target at the token grid, mask.

Memory does not grow with the number of scenes: a `Scene` (cameras and file names only) is kept
for every scene, but lifted Gaussians are loaded on demand into a small LRU (`LiftedCache`), and
`EpochSampler` visits the scenes in groups no larger than that cache (scene order and view order
within a group shuffled every epoch), so each scene is read about once per epoch per loader
process instead of on almost every sample (FiT3D instead kept all scenes in memory, ~110 GB).

Sampling is a pure function of (seed, epoch, rank), flips included, so DDP ranks see disjoint
samples without Lightning's sampler replacement, and a run resumed mid-epoch from its checkpoint
continues with exactly the samples the uninterrupted run would have used.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fit3d.errors import UserError
from fit3d.gaussians import META_FILE, LiftedScene, list_lifted_scenes, load_lifted_scene
from fit3d.scenes import Scene, open_scene
from fit3d.targets import mask_to_tokens, render_token_target

_META_KEYS = ("scenes_root", "resolution", "backbone", "embed_dim")
GridFn = Callable[[int, int], tuple[int, int]]
"""(image height, width) -> (h, w) token grid of the backbone."""
Grids = dict[tuple[int, int], tuple[int, int]]
"""Token grid (h, w) per image size (H, W), precomputed so datasets stay plain data."""


@dataclass(frozen=True)
class LiftRun:
    """The finished scenes of one stage-1 run folder and their metadata."""

    path: Path
    scene_ids: list[str]
    metas: list[dict[str, Any]]

    def check_width(self, embed_dim: int) -> None:
        """UserError unless every scene was lifted with a backbone of width `embed_dim`."""
        for sid, meta in zip(self.scene_ids, self.metas, strict=True):
            if int(meta["embed_dim"]) != embed_dim:
                raise UserError(
                    f"{self.path / sid / META_FILE}: scene lifted with backbone "
                    f"'{meta['backbone']}' of width {meta['embed_dim']}, but the backbone being "
                    f"fine-tuned has width {embed_dim}"
                )


def read_lift_run(path: str | Path) -> LiftRun:
    """Read a stage-1 run folder's finished scenes; UserError if missing, empty or malformed."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"stage-1 run {path} not found (run `make lift` first)")
    ids = list_lifted_scenes(path)
    if not ids:
        raise UserError(f"stage-1 run {path} has no finished scene (no <scene>/{META_FILE})")
    metas = []
    for sid in ids:
        file = path / sid / META_FILE
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{file} is not readable JSON: {e}") from e
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise UserError(f"{file} lacks {missing} (not a stage-1 scene meta)")
        metas.append(meta)
    return LiftRun(path, ids, metas)


def open_run_scenes(run: LiftRun) -> list[Scene]:
    """Open (lazily, JSON only) the dataset scene behind every lifted scene of `run`."""
    return [
        open_scene(m["scenes_root"], sid, float(m["resolution"]))
        for sid, m in zip(run.scene_ids, run.metas, strict=True)
    ]


class LiftedCache:
    """LRU of lifted scenes (Gaussians + decoder) on one device, at most `size` in memory."""

    def __init__(self, run_dir: Path, size: int, device: str | torch.device = "cpu"):
        self.run_dir = Path(run_dir)
        self.size = max(1, size)
        self.device = torch.device(device)
        self.loads = 0
        self._items: OrderedDict[str, LiftedScene] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, scene_id: str) -> LiftedScene:
        if scene_id in self._items:
            self._items.move_to_end(scene_id)
            return self._items[scene_id]
        while len(self._items) >= self.size:
            self._items.popitem(last=False)
        item = load_lifted_scene(self.run_dir / scene_id, device=self.device)
        self._items[scene_id] = item
        self.loads += 1
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_items"] = OrderedDict()  # worker processes start with an empty cache
        return state


class FinetuneDataset(Dataset):
    """Items for keys `(pair index, flip)`: a (scene, view) pair, optionally flipped.

    Each item: `image` [3, H, W] in [0, 1], `target` [C, h, w] decoded rendered features at the
    token grid, `mask` [h, w] soft valid-pixel weights, `key` [3] long (scene index, view, flip).
    Image, target and mask are flipped together.
    """

    def __init__(
        self,
        run: LiftRun,
        scenes: list[Scene],
        pairs: list[tuple[int, int]],
        grids: Grids,
        cache_size: int = 4,
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ):
        self.run = run
        self.scenes = scenes
        self.pairs = pairs
        self.grids = grids
        self.backend = backend
        self.cache = LiftedCache(run.path, cache_size, device)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Tensor]:
        index, flip = key
        si, view = self.pairs[index]
        scene = self.scenes[si]
        H, W = scene.height(view), scene.width(view)
        grid = self.grids[(H, W)]
        lifted = self.cache.get(scene.scene_id)
        target = render_token_target(
            lifted, scene.viewmat(view), scene.K(view), W, H, grid, self.backend
        )  # [C, h, w]
        image = scene.load_image(view).permute(2, 0, 1).to(target.device)  # [3, H, W]
        valid = scene.load_mask(view)
        valid = torch.ones(H, W, dtype=torch.bool) if valid is None else valid
        mask = mask_to_tokens(valid[None].to(target.device), grid)[0]  # [h, w]
        if flip:
            image, target, mask = image.flip(-1), target.flip(-1), mask.flip(-1)
        key_t = torch.tensor([si, view, int(flip)], dtype=torch.long)
        return {"image": image, "target": target, "mask": mask, "key": key_t}


class EpochSampler(Sampler):
    """Deterministic per-(seed, epoch) order of `(pair index, flip)` keys for one DDP rank.

    `pair_scene[i]` is the scene index of pair i. With `shuffle`, scenes are shuffled and cut into
    groups of `group` scenes; the pairs of a group are shuffled together and groups follow one
    another. Each rank takes every `num_replicas`-th key of the common order, all ranks the same
    count (the remainder is dropped), so ranks never share a sample. Flips (p=0.5 when `flip`)
    come from the same seeded generator.
    """

    def __init__(
        self,
        pair_scene: list[int],
        group: int = 4,
        shuffle: bool = True,
        flip: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.pair_scene = torch.as_tensor(pair_scene, dtype=torch.long)
        self.group = max(1, group)
        self.shuffle, self.flip, self.seed = shuffle, flip, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, epoch: int, n: int) -> None:
        """Drop the first `n` keys of this rank's order the next time `epoch` is iterated."""
        self._skip[epoch] = n

    def __len__(self) -> int:
        return len(self.pair_scene) // self.num_replicas

    def order(self) -> tuple[Tensor, Tensor]:
        """(pair indices [M], flips [M] bool) of the whole epoch, common to all ranks."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.pair_scene)
        if not self.shuffle:
            idx = torch.arange(n)
        else:
            scenes = torch.unique(self.pair_scene)
            scenes = scenes[torch.randperm(len(scenes), generator=g)]
            parts = []
            for start in range(0, len(scenes), self.group):
                members = torch.isin(self.pair_scene, scenes[start : start + self.group])
                part = members.nonzero()[:, 0]
                parts.append(part[torch.randperm(len(part), generator=g)])
            idx = torch.cat(parts) if parts else torch.arange(0)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return idx, flips

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        idx, flips = self.order()
        mine = torch.arange(self.rank, len(self) * self.num_replicas, self.num_replicas)
        start = self._skip.pop(self.epoch, 0)
        for i in mine[start:].tolist():
            yield int(idx[i]), bool(flips[i])


class FinetuneDataModule(L.LightningDataModule):
    """Train pairs = train views of a stage-1 run's scenes; val pairs = held-out views.

    `val_run` (another stage-1 run, e.g. of held-out scenes) provides the validation scenes when
    given; otherwise the test views of the training scenes are used. At most `val_views` views per
    validation scene (0 = all). The render device is the training device when `num_workers` is 0
    (CUDA -> gsplat), else CPU inside the workers.
    """

    def __init__(
        self,
        run: LiftRun,
        grid_fn: GridFn,
        batch_size: int = 2,
        num_workers: int = 0,
        cache_size: int = 4,
        seed: int = 0,
        val_run: LiftRun | None = None,
        val_views: int = 2,
    ):
        super().__init__()
        self.run, self.val_run = run, val_run
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache_size, self.seed, self.val_views = cache_size, seed, val_views
        self.scenes = open_run_scenes(run)
        self.train_pairs = [(si, v) for si, s in enumerate(self.scenes) for v in s.train_views]
        if not self.train_pairs:
            raise UserError(f"stage-1 run {run.path}: its scenes have no train views")
        self.val_scenes = self.scenes if val_run is None else open_run_scenes(val_run)
        self.val_pairs = []
        for si, s in enumerate(self.val_scenes):
            views = s.test_views if val_run is None else (s.test_views or s.train_views)
            self.val_pairs += [(si, v) for v in (views[:val_views] if val_views > 0 else views)]
        views = [(self.scenes[si], v) for si, v in self.train_pairs]
        views += [(self.val_scenes[si], v) for si, v in self.val_pairs]
        sizes = {(s.height(v), s.width(v)) for s, v in views}
        self.grids: Grids = {size: grid_fn(*size) for size in sorted(sizes)}
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._device = torch.device("cpu")

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.num_workers == 0:
            self._device = self.trainer.strategy.root_device

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataset(self) -> FinetuneDataset:
        return FinetuneDataset(
            self.run, self.scenes, self.train_pairs, self.grids, self.cache_size, self._device
        )

    def val_dataset(self) -> FinetuneDataset:
        run = self.run if self.val_run is None else self.val_run
        return FinetuneDataset(
            run, self.val_scenes, self.val_pairs, self.grids, self.cache_size, self._device
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = EpochSampler(
            [si for si, _ in self.train_pairs], self.cache_size, True, True, self.seed, world, rank
        )
        epoch, consumed = self._position
        sampler.skip_once(epoch, consumed * self.batch_size)
        return self._loader(self.train_dataset(), sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        pair_scene = [si for si, _ in self.val_pairs]
        sampler = EpochSampler(pair_scene, 1, False, False, self.seed, world, rank)
        return self._loader(self.val_dataset(), sampler, drop_last=False)

    def _loader(self, dataset: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            epoch, consumed = self._position
            now = self.trainer.current_epoch
            self._position = (now, consumed + 1 if now == epoch else 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._position[0], "consumed": self._position[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position = (int(state["epoch"]), int(state["consumed"]))
