"""(scene, view) samples from a stage-1 run: image, rendered target at the token grid, mask.

Order (docs/method.md, "Stage 2: fine-tuning"). Every epoch is one uniform random permutation of
all train (scene, view) pairs of all scenes, as FiT3D samples them, with a flip bit (p=0.5) per
position; both are a pure function of (seed, epoch). DDP rank r takes positions r, r+N, r+2N, ...
of that common order, so ranks see disjoint samples and optimizer step k of any number of ranks
consumes positions [kG, (k+1)G) of it (G = the global batch). A run resumed mid-epoch skips what
its checkpoint says it consumed and continues with exactly the samples of the uninterrupted run.

Memory. A target needs its scene's Gaussians (~0.5 GB for a ScanNet++ scene; FiT3D held all of
them, ~110 GB), so targets are not rendered in sample order. `ShuffledSampler` cuts its rank's
share of the order into windows of `window` samples and, before yielding the first sample of a
window, has `TargetStore` render the whole window scene by scene: each scene of the window is
loaded once (the one left in memory by the previous window first), its views rendered and written
as float32 records (target [C, h, w], then mask [h, w]) to one file on disk, then dropped. Items
read their record back by (file, offset). Resident memory is one lifted scene plus the per-scene
cameras and file names; disk holds two windows (the current one and the previous, which loader
workers may still be reading), C*h*w*4 bytes per sample (3.9 MB for ViT-S at 876x584). Scene loads
per epoch are about windows x scenes, so the window trades disk for loads; it never changes the
order. Validation and held-out items are rendered on demand (`LiftedCache`, scene-ordered).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fit3d.correspond import render_depth, scaled_intrinsics
from fit3d.errors import UserError
from fit3d.gaussians import META_FILE, LiftedScene, list_lifted_scenes, load_lifted_scene
from fit3d.geometry import relative_rotation
from fit3d.io import atomic_path
from fit3d.scenes import Scene, open_scene
from fit3d.targets import mask_to_tokens, render_token_target

_META_KEYS = ("scenes_root", "resolution", "backbone", "embed_dim")
DEPTH_SCALE = 0.25
"""Resolution of the depth rendered for an equivariance objective's correspondences, as a
fraction of the image's (correspondences at 1/4-resolution pixels)."""
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


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(scale * height), round(scale * width)), at least 1 each."""
    return max(1, round(scale * height)), max(1, round(scale * width))


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

    def resident(self) -> set[str]:
        """Ids of the scenes in memory."""
        return set(self._items)

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


class Sample(NamedTuple):
    """Key of one training item: a pair index, its flip and where its target record lies."""

    pair: int
    """Index into the dataset's (scene, view) pairs."""
    flip: bool
    """Flip image, target and mask horizontally."""
    file: str = ""
    """`TargetStore` file holding the record ('' = render on demand)."""
    offset: int = 0
    """Byte offset of the record in `file`."""
    corner: tuple[float, float] = (-1.0, -1.0)
    """Where a training crop starts, as fractions in [0, 1) of the free rows and columns of the
    token grid (`FinetuneDataset.crop`); negative = no crop."""


class FinetuneDataset(Dataset):
    """Items for keys `Sample` or `(pair index, flip)`: a (scene, view) pair, optionally flipped.

    Each item: `image` [3, H', W'] in [0, 1], `target` [C, h, w] decoded rendered features at the
    token grid, `mask` [h, w] soft valid-pixel weights, `key` [3] long (scene index, view, flip).
    Image, target and mask are flipped together. A key with a `file` reads its target and mask
    from that `TargetStore` record (on CPU); otherwise they are rendered now on `device`. With
    `image_scale` s < 1 the image is resized (antialiased) to H' x W' = round(sH) x round(sW)
    and the grid is that size's (`grids` maps the scene's H x W to it); the target is still
    rendered at H x W and downsampled to the grid.
    """

    def __init__(
        self,
        run: LiftRun,
        scenes: list[Scene],
        pairs: list[tuple[int, int]],
        grids: Grids,
        cache_size: int = 1,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        image_scale: float = 1.0,
        crop: float = 1.0,
        patch: int = 14,
        with_depth: bool = False,
    ):
        self.run = run
        self.scenes = scenes
        self.pairs = pairs
        self.grids = grids
        self.backend = backend
        self.image_scale = image_scale
        self.crop, self.patch = crop, patch
        self.with_depth = with_depth
        self.cache = LiftedCache(run.path, cache_size, device)

    def __len__(self) -> int:
        return len(self.pairs)

    def _grid(self, index: int) -> tuple[int, int]:
        si, view = self.pairs[index]
        scene = self.scenes[si]
        return self.grids[(scene.height(view), scene.width(view))]

    def depth_size(self, index: int) -> tuple[int, int]:
        """(rows, columns) of pair `index`'s rendered depth (`DEPTH_SCALE` of the image)."""
        si, view = self.pairs[index]
        scene = self.scenes[si]
        return scaled_size(scene.height(view), scene.width(view), DEPTH_SCALE)

    def record_size(self, index: int) -> int:
        """float32 values in the record of pair `index`: C*h*w (target) + h*w (mask), + the
        depth's rows x columns `with_depth`."""
        h, w = self._grid(index)
        n = (int(self.run.metas[self.pairs[index][0]]["embed_dim"]) + 1) * h * w
        if self.with_depth:
            n += int(np.prod(self.depth_size(index)))
        return n

    def render(self, index: int) -> tuple[Tensor, Tensor]:
        """Unflipped target [C, h, w] and token mask [h, w] of pair `index`, on the cache's
        device."""
        si, view = self.pairs[index]
        scene = self.scenes[si]
        H, W = scene.height(view), scene.width(view)
        grid = self.grids[(H, W)]
        lifted = self.cache.get(scene.scene_id)
        target = render_token_target(
            lifted, scene.viewmat(view), scene.K(view), W, H, grid, self.backend
        )  # [C, h, w]
        valid = scene.load_mask(view)
        valid = torch.ones(H, W, dtype=torch.bool) if valid is None else valid
        mask = mask_to_tokens(valid[None].to(target.device), grid)[0]  # [h, w]
        return target, mask

    def depth_K(self, index: int) -> Tensor:
        """Intrinsics [3, 3] of pair `index`'s rendered depth grid (pixel centres kept)."""
        si, view = self.pairs[index]
        scene = self.scenes[si]
        h4, w4 = self.depth_size(index)
        return scaled_intrinsics(
            scene.K(view).float(), scene.width(view), scene.height(view), w4, h4
        )

    def render_depth(self, index: int) -> Tensor:
        """Expected depth [h4, w4] of pair `index` rendered from its scene's Gaussians (0 where
        nothing solid is seen), unflipped and uncropped, on the cache's device."""
        si, view = self.pairs[index]
        scene = self.scenes[si]
        lifted = self.cache.get(scene.scene_id)
        return render_depth(
            lifted, scene.viewmat(view), scene.K(view), scene.width(view), scene.height(view),
            DEPTH_SCALE, backend=self.backend,
        )  # fmt: skip

    def read(self, index: int, file: str, offset: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Target [C, h, w], mask [h, w] and (`with_depth`) depth [h4, w4] of pair `index`
        from its `TargetStore` record."""
        h, w = self._grid(index)
        n = self.record_size(index)
        flat = torch.from_numpy(np.fromfile(file, dtype=np.float32, count=n, offset=offset))
        if flat.numel() != n:
            raise RuntimeError(f"{file}: record at byte {offset} is truncated")
        depth = None
        if self.with_depth:
            h4, w4 = self.depth_size(index)
            flat, depth = flat[: n - h4 * w4], flat[n - h4 * w4 :].view(h4, w4)
        m = flat.numel()
        return flat[: m - h * w].view(-1, h, w), flat[m - h * w :].view(h, w), depth

    def __getitem__(self, key: Sample | tuple[int, bool]) -> dict[str, Tensor]:
        key = Sample(*key)
        si, view = self.pairs[key.pair]
        if key.file:
            target, mask, depth = self.read(key.pair, key.file, key.offset)
        else:
            target, mask = self.render(key.pair)
            depth = self.render_depth(key.pair) if self.with_depth else None
        image = self.scenes[si].load_image(view).permute(2, 0, 1).to(target.device)  # [3, H, W]
        if self.image_scale != 1.0:
            size = scaled_size(image.shape[1], image.shape[2], self.image_scale)
            image = F.interpolate(image[None], size, mode="bilinear", antialias=True)[0]
        grid = torch.tensor(target.shape[1:], dtype=torch.long)  # whole token grid (h, w)
        if key.flip:
            image, target, mask = image.flip(-1), target.flip(-1), mask.flip(-1)
        origin = (0, 0)
        if self.crop < 1.0 and key.corner[0] >= 0:
            image, target, mask, origin = self._crop(image, target, mask, key.corner)
        key_t = torch.tensor([si, view, int(key.flip)], dtype=torch.long)
        item = {"image": image, "target": target, "mask": mask, "key": key_t}
        if self.with_depth:  # what the equivariance term needs to match this view to another
            item |= {
                "depth": depth.to(target.device),
                "depth_K": self.depth_K(key.pair),
                "viewmat": self.scenes[si].viewmat(view).float(),
                "grid": grid,
                "origin": torch.tensor(origin, dtype=torch.long),
            }
        return item

    def _crop(
        self, image: Tensor, target: Tensor, mask: Tensor, corner: tuple[float, float]
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """A token-aligned crop of `crop` x the grid's rows and columns, starting `corner` of the
        way into the free rows and columns: the target [C, h, w] and mask [h, w] keep those
        tokens, the image [3, H, W] (resized to h*patch x w*patch first, as the backbone would)
        the pixels under them. Also returns the crop's first (row, column) token."""
        h, w = target.shape[1:]
        ch, cw = max(1, round(self.crop * h)), max(1, round(self.crop * w))
        oy = min(int(corner[0] * (h - ch + 1)), h - ch)
        ox = min(int(corner[1] * (w - cw + 1)), w - cw)
        p = self.patch
        if tuple(image.shape[1:]) != (h * p, w * p):
            image = F.interpolate(image[None], (h * p, w * p), mode="bilinear", antialias=True)[0]
        image = image[:, oy * p : (oy + ch) * p, ox * p : (ox + cw) * p]
        target, mask = target[:, oy : oy + ch, ox : ox + cw], mask[oy : oy + ch, ox : ox + cw]
        return image, target, mask, (oy, ox)


class TargetStore:
    """Targets and masks of a window of upcoming samples, rendered scene by scene into one file.

    `folder` (emptied first; default: a new temporary folder) holds the files; it is removed by
    `close()` or when the store is garbage-collected. `loads` counts lifted-scene loads and
    `rendered` rendered views, over the store's life.
    """

    def __init__(self, dataset: FinetuneDataset, folder: str | Path | None = None):
        self.dataset = dataset
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="fit3d-targets-"))
        else:
            self.folder = Path(folder)
            shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's leftovers
            self.folder.mkdir(parents=True)
        self.rendered = 0
        self._files: list[Path] = []
        self._last: dict[int, int] = {}  # pair -> byte offset in the last file
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @property
    def loads(self) -> int:
        return self.dataset.cache.loads

    def prepare(self, name: str, pairs: Sequence[int]) -> tuple[str, list[int]]:
        """Render `pairs` (indices into the dataset's pairs) into `<folder>/<name>.f32`.

        Each scene among them is loaded once, the one already in memory first. Returns the file
        and every pair's byte offset in it. Files from before the previous call are deleted
        (loader workers may still read the previous one). When the last file already holds every
        one of `pairs` (a window that spans the whole train set: every epoch renders the same
        views), it is returned again and nothing is rendered.
        """
        if self._files and all(p in self._last for p in pairs):
            return str(self._files[-1]), [self._last[p] for p in pairs]
        unique = list(dict.fromkeys(pairs))  # a view twice in a window (view pairs) once
        by_scene: dict[int, list[int]] = {}
        for p in unique:
            by_scene.setdefault(self.dataset.pairs[p][0], []).append(p)
        resident = self.dataset.cache.resident()
        scenes = sorted(
            by_scene, key=lambda s: (self.dataset.scenes[s].scene_id not in resident, s)
        )
        at: dict[int, int] = {}
        file = self.folder / f"{name}.f32"
        bar = tqdm(
            total=len(unique), desc="stage 2 targets", unit="view", leave=False, disable=None
        )
        with bar, atomic_path(file) as tmp, tmp.open("wb") as fh:
            for si in scenes:
                for p in by_scene[si]:
                    target, mask = self.dataset.render(p)
                    parts = [target.flatten(), mask.flatten()]
                    if self.dataset.with_depth:
                        parts.append(self.dataset.render_depth(p).flatten())
                    at[p] = fh.tell()
                    fh.write(torch.cat(parts).float().cpu().numpy().tobytes())
                    self.rendered += 1
                    bar.update()
        for old in self._files[:-1]:
            old.unlink(missing_ok=True)
        self._files = [*self._files[-1:], file]
        self._last = at
        return str(file), [at[p] for p in pairs]

    def close(self) -> None:
        """Delete the folder and everything in it."""
        self._cleanup()


class ShuffledSampler(Sampler):
    """Per-(seed, epoch) order of `Sample` keys for one DDP rank (module docstring).

    With `shuffle`, the common order is a uniform random permutation of the `num_pairs` pairs;
    each rank takes every `num_replicas`-th position, all ranks the same count (the remainder is
    dropped). Flips (p=0.5 when `flip`) come from the same seeded generator, one per position.
    With a `store`, every `window` keys of this rank are rendered ahead into one store file.

    With `partners` (pair index -> the pair indices it may be matched with: other views of its
    scene), the order is made of view pairs instead: the first num_pairs // 2 entries of the
    permutation, each followed by a partner drawn uniformly from its list (same generator), so an
    epoch has as many samples as without; ranks take every `num_replicas`-th view pair (both of
    its samples, consecutively), so a batch of an even size holds whole view pairs.
    """

    def __init__(
        self,
        num_pairs: int,
        shuffle: bool = True,
        flip: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        store: TargetStore | None = None,
        window: int = 4096,
        crop: bool = False,
        partners: list[list[int]] | None = None,
    ):
        self.num_pairs = num_pairs
        self.partners = partners
        self.shuffle, self.flip, self.seed, self.crop = shuffle, flip, seed, crop
        self.num_replicas, self.rank = num_replicas, rank
        self.store, self.window = store, max(1, window)
        self.epoch = 0
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, epoch: int, n: int) -> None:
        """Drop the first `n` keys of this rank's order the next time `epoch` is iterated."""
        self._skip[epoch] = n

    def __len__(self) -> int:
        if self.partners is not None:
            return 2 * (self.num_pairs // 2 // self.num_replicas)
        return self.num_pairs // self.num_replicas

    def order(self) -> tuple[Tensor, Tensor]:
        """(pair indices [M], flips [M] bool) of the whole epoch, common to all ranks."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.num_pairs
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.partners is not None:  # [first, its partner, first, its partner, ...]
            firsts = idx[: n // 2]
            draws = torch.rand(len(firsts), generator=g)
            second = [
                self.partners[a][int(u * len(self.partners[a]))]
                for a, u in zip(firsts.tolist(), draws.tolist(), strict=True)
            ]
            idx = torch.stack([firsts, torch.tensor(second, dtype=torch.long)], 1).flatten()
        m = len(idx)
        flips = torch.rand(m, generator=g) < 0.5 if self.flip else torch.zeros(m, dtype=torch.bool)
        return idx, flips

    def positions(self) -> Tensor:
        """This rank's positions [len(self)] in the common order."""
        if self.partners is None:
            return torch.arange(self.rank, len(self) * self.num_replicas, self.num_replicas)
        units = torch.arange(self.rank, len(self) // 2 * self.num_replicas, self.num_replicas)
        return torch.stack([2 * units, 2 * units + 1], 1).flatten()

    def corners(self) -> Tensor:
        """Crop corners [M, 2] in [0, 1) of the whole epoch's positions (with `crop`), from a
        generator of their own: the order and the flips are those of an uncropped run."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919_000)
        return torch.rand(self.num_pairs, 2, generator=g)

    def __iter__(self) -> Iterator[Sample]:
        idx, flips = self.order()
        mine = self.positions()
        corners = self.corners()[mine].tolist() if self.crop else [(-1.0, -1.0)] * len(mine)
        keys = list(zip(idx[mine].tolist(), flips[mine].tolist(), map(tuple, corners), strict=True))
        start = self._skip.pop(self.epoch, 0)
        for k in range(start // self.window, -(-len(keys) // self.window)):
            part = keys[max(k * self.window, start) : (k + 1) * self.window]
            if self.store is None:
                yield from (Sample(p, f, corner=c) for p, f, c in part)
                continue
            file, offsets = self.store.prepare(f"e{self.epoch}_w{k}", [p for p, _, _ in part])
            yield from (
                Sample(p, f, file, o, c) for (p, f, c), o in zip(part, offsets, strict=True)
            )


def partner_lists(
    scenes: list[Scene], pairs: list[tuple[int, int]], max_angle: float
) -> list[list[int]]:
    """For each (scene, view) pair, the indices of the other pairs of its scene whose camera is
    within `max_angle` degrees of relative rotation (the nearest one when none is; itself when
    its scene has no other view): what a view may be matched with."""
    by_scene: dict[int, list[int]] = {}
    for i, (si, _) in enumerate(pairs):
        by_scene.setdefault(si, []).append(i)
    out: list[list[int]] = []
    for i, (si, v) in enumerate(pairs):
        vm = scenes[si].viewmat(v)
        others = [j for j in by_scene[si] if j != i]
        if not others:
            out.append([i])
            continue
        angles = [relative_rotation(vm, scenes[si].viewmat(pairs[j][1])) for j in others]
        near = [j for j, a in zip(others, angles, strict=True) if a <= max_angle]
        out.append(near or [others[int(np.argmin(angles))]])
    return out


class FinetuneDataModule(L.LightningDataModule):
    """Train pairs = train views of a stage-1 run's scenes; val pairs = held-out views.

    `batch_size`: training samples per rank per optimizer step (its share of the global batch);
    `val_batch_size` (default `batch_size`): validation images per batch. `window`: samples per
    `TargetStore` file; `target_dir`: where rank r keeps them (`<target_dir>/rank<r>`, removed at
    teardown; default a temporary folder). `val_run` (another stage-1 run, e.g. of held-out
    scenes) provides the validation scenes when given; otherwise the test views of the training
    scenes are used. At most `val_views` views per validation scene (0 = all). Training targets
    are rendered on the training device (CUDA -> gsplat) in the main process; loader workers only
    read images and target records (and render validation items, on CPU). `view_pairs` (a
    maximum relative rotation, degrees; None = off): train on view pairs (`ShuffledSampler`'s
    `partners`, `partner_lists`), each item with its rendered depth and camera.
    """

    def __init__(
        self,
        run: LiftRun,
        grid_fn: GridFn,
        batch_size: int = 2,
        num_workers: int = 0,
        window: int = 4096,
        seed: int = 0,
        val_run: LiftRun | None = None,
        val_views: int = 2,
        target_dir: str | Path | None = None,
        val_batch_size: int | None = None,
        all_views: bool = False,
        image_scale: float = 1.0,
        crop: float = 1.0,
        patch: int = 14,
        view_pairs: float | None = None,
    ):
        super().__init__()
        self.image_scale, self.crop, self.patch = image_scale, crop, patch
        self.view_pairs = view_pairs
        self.run, self.val_run = run, val_run
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.window, self.seed, self.val_views = window, seed, val_views
        self.target_dir = Path(target_dir) if target_dir is not None else None
        self.scenes = open_run_scenes(run)
        # all_views (`finetune.views=all`): FiT3D's train_samples_all.txt, test frames included
        self.train_pairs = [
            (si, v)
            for si, s in enumerate(self.scenes)
            for v in (
                sorted(set(s.train_views) | set(s.test_views)) if all_views else s.train_views
            )
        ]
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
        self.grids: Grids = {
            size: grid_fn(*scaled_size(*size, image_scale)) for size in sorted(sizes)
        }
        self.partners = None if view_pairs is None else partner_lists(
            self.scenes, self.train_pairs, view_pairs
        )  # fmt: skip
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._device = torch.device("cpu")
        self.stores: list[TargetStore] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self._device = self.trainer.strategy.root_device

    def teardown(self, stage: str) -> None:
        for store in self.stores:
            store.close()
        self.stores.clear()
        if self.target_dir is not None:
            try:
                self.target_dir.rmdir()  # once every rank has removed its folder
            except OSError:
                pass

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataset(self) -> FinetuneDataset:
        return FinetuneDataset(
            self.run, self.scenes, self.train_pairs, self.grids, 1, self._device,
            image_scale=self.image_scale, crop=self.crop, patch=self.patch,
            with_depth=self.partners is not None,
        )  # fmt: skip

    def val_dataset(self, device: str | torch.device | None = None) -> FinetuneDataset:
        """Validation items, rendered on demand on `device` (default: the training device)."""
        run = self.run if self.val_run is None else self.val_run
        device = self._device if device is None else device
        return FinetuneDataset(
            run, self.val_scenes, self.val_pairs, self.grids, 1, device,
            image_scale=self.image_scale,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        dataset = self.train_dataset()
        folder = self.target_dir / f"rank{rank}" if self.target_dir is not None else None
        store = TargetStore(dataset, folder)
        self.stores.append(store)
        sampler = ShuffledSampler(
            len(self.train_pairs), True, True, self.seed, world, rank, store, self.window,
            crop=self.crop < 1.0, partners=self.partners,
        )  # fmt: skip
        epoch, consumed = self._position
        sampler.skip_once(epoch, consumed * self.batch_size)
        return self._loader(dataset, sampler, self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = ShuffledSampler(len(self.val_pairs), False, False, self.seed, world, rank)
        # loader workers render validation items themselves, on CPU (no CUDA in forked workers)
        dataset = self.val_dataset("cpu" if self.num_workers > 0 else None)
        return self._loader(dataset, sampler, self.val_batch_size, drop_last=False)

    def _loader(
        self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
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
