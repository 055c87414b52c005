"""Stage 2 data: the i.i.d. sample order, the windowed target store, items and loaders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fit3d.render import rasterization
from stage2_finetune.data import (
    FinetuneDataModule,
    LiftedCache,
    Sample,
    ShuffledSampler,
    read_lift_run,
)
from stage2_finetune.synthetic import HEIGHT, WIDTH, write_lift_run, write_scenes


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """`<out>/scenes` with 3 scenes (4 train views each) and `<out>/lift/default` of them."""
    out = tmp_path_factory.mktemp("stage2_data")
    ids = ["s0", "s1", "s2"]
    write_scenes(out / "scenes", ids)
    write_lift_run(out / "lift" / "default", out / "scenes", ids)
    return out


def _grid(h: int, w: int) -> tuple[int, int]:
    return h // 14, w // 14


# --- the order ----------------------------------------------------------------------------------
def longest_run(seq: np.ndarray) -> int:
    """Length of the longest block of equal consecutive values."""
    ends = np.flatnonzero(np.diff(seq) != 0)
    return int(np.diff(np.concatenate([[-1], ends, [len(seq) - 1]])).max())


def repeats(seq: np.ndarray) -> int:
    """Consecutive positions holding the same value."""
    return int((seq[1:] == seq[:-1]).sum())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_view_once_per_epoch_ranks_disjoint_deterministic(world):
    n = 35
    ranks = [ShuffledSampler(n, seed=3, num_replicas=world, rank=r) for r in range(world)]
    keys = [list(s) for s in ranks]
    assert all(len(k) == n // world == len(s) for k, s in zip(keys, ranks, strict=True))
    pairs = [p for k in keys for p, *_ in k]
    assert len(set(pairs)) == len(pairs)  # disjoint ranks, no repeats
    if world == 1:
        assert sorted(pairs) == list(range(n))  # every view exactly once
    # rank r holds positions r, r + world, ... of the one common order (flips included)
    idx, flips = ranks[0].order()
    for r, k in enumerate(keys):
        pos = list(range(r, world * (n // world), world))
        assert [(p, f) for p, f, *_ in k] == list(
            zip(idx[pos].tolist(), flips[pos].tolist(), strict=True)
        )
    assert keys == [list(s) for s in ranks]  # deterministic
    assert 0.25 < float(flips.float().mean()) < 0.75
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != keys[0]


def test_skip_once_resumes_the_same_keys_mid_window():
    sampler = ShuffledSampler(40, seed=1, window=8)
    full = list(sampler)
    sampler.skip_once(0, 13)
    assert list(sampler) == full[13:]
    assert list(sampler) == full  # the skip applies once


def test_scene_sequence_is_as_mixed_as_an_iid_permutation():
    """The scene of consecutive samples: no run longer, and no more repeats, than a uniform random
    permutation of the same multiset of scenes gives (its 99.9th percentiles, by simulation),
    while the blocked order the sampler replaced (groups of 4 scenes) fails the repeat bound."""
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 31, size=40)  # 40 scenes with 5-30 train views
    scene_of = np.repeat(np.arange(40), counts)  # [V] scene of each pair
    sims = [rng.permutation(scene_of) for _ in range(4000)]
    run_bound = np.quantile([longest_run(s) for s in sims], 0.999, method="higher")
    lo, hi = np.quantile([repeats(s) for s in sims], [0.0005, 0.9995])
    sampler = ShuffledSampler(len(scene_of), seed=0)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seq = scene_of[[p for p, *_ in sampler]]
        assert np.array_equal(np.bincount(seq), counts)  # every view once
        assert longest_run(seq) <= run_bound
        assert lo <= repeats(seq) <= hi
    blocked = []
    for a in range(0, 40, 4):
        members = np.flatnonzero((scene_of >= a) & (scene_of < a + 4))
        blocked += rng.permutation(scene_of[members]).tolist()
    assert repeats(np.array(blocked)) > hi


# --- the target store ---------------------------------------------------------------------------
def test_lifted_cache_memory_is_bounded_by_its_size(fake):
    run = read_lift_run(fake / "lift" / "default")
    cache = LiftedCache(run.path, size=2)
    for sid in ["s0", "s1", "s2", "s0", "s0", "s1"]:
        assert cache.get(sid).meta["scene_id"] == sid
        assert len(cache) <= 2
    assert cache.loads == 5  # s0, s1, s2, s0 (evicted by s2), s1 (evicted by s0)


@pytest.mark.parametrize("window", [5, 64])
def test_store_loads_each_scene_once_per_window_and_items_equal_on_demand(fake, window):
    data = FinetuneDataModule(read_lift_run(fake / "lift" / "default"), _grid, window=window)
    loader = data.train_dataloader()
    store = data.stores[0]
    folder = store.folder
    ds = loader.dataset
    reference = data.train_dataset()  # renders on demand
    windows: dict[str, list] = {}
    loads = [0]
    for key in loader.sampler:  # the loader's own key stream, window by window
        if key.file not in windows:
            windows[key.file] = []
            loads.append(store.loads)
            assert len(list(folder.glob("*.f32"))) <= 2  # the current and the previous window
        windows[key.file].append(key)
        item, ref = ds[key], reference[(key.pair, key.flip)]
        for k in ("image", "target", "mask", "key"):
            assert torch.equal(item[k], ref[k]), k
    assert len(windows) == -(-12 // window)
    for keys, new in zip(windows.values(), np.diff(loads), strict=True):
        assert new <= len({data.train_pairs[k.pair][0] for k in keys})
    if window >= 12:
        assert store.loads == 3  # each scene once per epoch
    assert store.rendered == 12 and len(ds.cache) <= 1 and len(store.dataset.cache) == 1
    # a second epoch: a window holding the whole train set is not rendered again, the other
    # windows are (their pairs differ epoch to epoch), and items still equal on-demand renders
    loader.sampler.set_epoch(1)
    for key in loader.sampler:
        item, ref = ds[key], reference[(key.pair, key.flip)]
        assert torch.equal(item["target"], ref["target"]) and torch.equal(item["mask"], ref["mask"])
    assert store.rendered == (12 if window >= 12 else 24)
    data.teardown("fit")
    assert not folder.exists()


def _reference_target(ds, scene, view: int, size: tuple[int, int]) -> torch.Tensor:
    """Independent reference target [C, *size] (float64): rasterise the lifted scene at full
    resolution, the decoder's conv, bilinear resize to the token grid."""
    lifted = ds.cache.get(scene.scene_id)
    g = lifted.gaussians
    render, _, _ = rasterization(
        g["means"], g["quats"], g["scales"], g["opacities"], g["features"],
        scene.viewmat(view)[None], scene.K(view)[None], WIDTH, HEIGHT,
    )  # fmt: skip
    return F.interpolate(
        F.conv2d(render.permute(0, 3, 1, 2).double(), lifted.decoder.weight.double(), padding=1),
        size=size,
        mode="bilinear",
        align_corners=False,
    )[0]


def test_item_target_is_rendered_decoded_downsampled_and_flips_jointly(fake):
    run = read_lift_run(fake / "lift" / "default")
    data = FinetuneDataModule(run, _grid)
    ds = data.train_dataset()
    si, view = data.train_pairs[4]
    item, flipped = ds[(4, False)], ds[(4, True)]
    # independent reference: rasterise, full-resolution conv, bilinear (float64)
    scene = data.scenes[si]
    ref = _reference_target(ds, scene, view, (4, 5))
    assert item["target"].shape == (48, 4, 5)
    assert torch.allclose(item["target"].double(), ref, atol=1e-5)
    assert item["target"].abs().max() > 0.1  # the fake Gaussians are visible
    image = torch.from_numpy(
        cv2.cvtColor(cv2.imread(str(scene.dslr_dir / "undistorted_images" / f"DSC{view:04d}.JPG")),
                     cv2.COLOR_BGR2RGB)
    ).permute(2, 0, 1).float() / 255  # fmt: skip
    assert torch.allclose(item["image"], image)
    # mask: columns < 5 + view are anonymised; token column 0 averages pixel columns 6 and 7
    assert (
        item["mask"][:, 0].tolist() == [float(view + 5 <= 6) * 0.5 + float(view + 5 <= 7) * 0.5] * 4
    )
    assert item["key"].tolist() == [si, view, 0] and flipped["key"].tolist() == [si, view, 1]
    for k in ("image", "target", "mask"):
        assert torch.equal(flipped[k], item[k].flip(-1))


def test_image_scale_shrinks_the_image_and_its_token_grid_not_the_render(fake):
    """finetune.image_scale: the student sees a smaller image and a smaller token grid; the
    target is the same full-size render, decoded and downsampled to that grid."""
    run = read_lift_run(fake / "lift" / "default")
    full = FinetuneDataModule(run, _grid).train_dataset()[(4, False)]
    data = FinetuneDataModule(run, _grid, image_scale=0.5)
    ds = data.train_dataset()
    item = ds[(4, False)]
    h, w = round(HEIGHT * 0.5), round(WIDTH * 0.5)
    assert item["image"].shape == (3, h, w)
    ref_image = F.interpolate(full["image"][None], (h, w), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(item["image"], ref_image)
    si, view = data.train_pairs[4]
    ref = _reference_target(ds, data.scenes[si], view, _grid(h, w))
    assert item["target"].shape == (48, *_grid(h, w)) and item["mask"].shape == _grid(h, w)
    assert torch.allclose(item["target"].double(), ref, atol=1e-5)


def test_crop_keeps_the_tokens_under_a_token_aligned_window(fake):
    """finetune.crop: the image is resized to the token grid's pixel size (as the backbone
    would), then the pixels under a window of crop x rows and columns are kept, with the same
    window of the target and mask; the sampler's corners leave the order and flips as they are."""
    run = read_lift_run(fake / "lift" / "default")
    full = FinetuneDataModule(run, _grid).train_dataset()
    data = FinetuneDataModule(run, _grid, crop=0.5, patch=14)
    ds = data.train_dataset()
    whole = full[(4, True)]
    h, w = whole["target"].shape[1:]  # 4 x 5 tokens of a 70x56 image
    item = ds[Sample(4, True, corner=(0.99, 0.0))]  # the last free row, the first column
    ch, cw = round(0.5 * h), round(0.5 * w)
    oy, ox = h - ch, 0
    assert item["target"].shape == (48, ch, cw) and item["mask"].shape == (ch, cw)
    torch.testing.assert_close(item["target"], whole["target"][:, oy : oy + ch, ox : ox + cw])
    torch.testing.assert_close(item["mask"], whole["mask"][oy : oy + ch, ox : ox + cw])
    resized = F.interpolate(whole["image"][None], (h * 14, w * 14), mode="bilinear",
                            antialias=True)[0]  # fmt: skip
    torch.testing.assert_close(
        item["image"], resized[:, oy * 14 : (oy + ch) * 14, ox * 14 : (ox + cw) * 14]
    )
    assert torch.equal(ds[(4, True)]["target"], whole["target"])  # no corner: not cropped
    plain = ShuffledSampler(12, seed=3)
    cropped = ShuffledSampler(12, seed=3, crop=True)
    a, b = list(plain), list(cropped)
    assert [(k.pair, k.flip) for k in a] == [(k.pair, k.flip) for k in b]
    assert all(k.corner == (-1.0, -1.0) for k in a)
    corners = [k.corner for k in b]
    assert all(0 <= u < 1 and 0 <= v < 1 for u, v in corners) and len(set(corners)) == 12
    cropped.set_epoch(1)
    assert [k.corner for k in cropped] != corners  # a fresh corner per epoch
    cropped.set_epoch(0)
    assert [k.corner for k in cropped] == corners  # and the same on a rerun (resume)


def test_train_views_only_and_validation_on_held_out_views(fake):
    data = FinetuneDataModule(read_lift_run(fake / "lift" / "default"), _grid, val_views=0)
    assert all(v % 3 != 2 for _, v in data.train_pairs) and len(data.train_pairs) == 12
    assert sorted(data.val_pairs) == [(s, v) for s in range(3) for v in (2, 5)]


def test_loader_workers_give_the_same_batches(fake, tmp_path):
    run_ = read_lift_run(fake / "lift" / "default")
    serial = list(FinetuneDataModule(run_, _grid, window=5).train_dataloader())
    data = FinetuneDataModule(run_, _grid, num_workers=1, window=5, target_dir=tmp_path / "t")
    parallel = list(data.train_dataloader())
    assert (tmp_path / "t" / "rank0").is_dir()
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
