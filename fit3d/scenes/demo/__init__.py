"""Demo scenes: procedurally furnished rooms with exact ground truth, in the ScanNet++ layout.

Each room (`layout`) is an axis-aligned shell furnished with analytic solids in 17 classes
(`CLASSES`), textured from scikit-image's photographs (`materials`), filmed along a hand-held-like
loop (`camera`) by a vectorised ray caster that also gives exact depth, normals and labels
(`raycast`), and written as a ScanNet++ scene (`write`): its DSLR capture with exact ground truth
and its scan, a triangle mesh with segment annotations (`mesh`). `generate_demo` makes a set of
rooms in four roles, one split file each:

    <out>/data/<room>/{dslr,scans}/    one folder per room (see `write`), `room.json` last
    <out>/splits/nvs_sem_train.txt     demo_000..: lifted and fine-tuned on, all `n_views` views
    <out>/splits/nvs_sem_val.txt       the next `n_val`: held out from stages 1-2, all views
    <out>/splits/probe_train.txt       the train rooms + `n_probe` rooms demo_pNN of
                                       `probe_views` views each: what the probes train on
    <out>/splits/test.txt              `n_test` rooms demo_tS_NN (S = `test_seed`) of
                                       `test_views` views each: what the probes are scored on
    <out>/classes.json                 {"classes": CLASSES}
    <out>/demo.json                    the parameters; written last, so it marks a finished set

Every room films the same kind of loop: train, val and probe rooms one of `n_views` poses, of
which probe rooms render `probe_views` (at most all) evenly spaced ones; test rooms one of
`TEST_LOOP` poses, of which they render `TEST_POSES` (so their view pairs span every rotation bin
of the correspondence probe). A room is generated once for its own parameters (`room.json`):
another test seed adds its rooms beside the others and leaves every other room as it is. A
second call with the same parameters does nothing. Command line:
`python -m fit3d.scenes.demo`.
"""

from __future__ import annotations

import collections
import fcntl
import importlib
import json
import multiprocessing
import os
import queue
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fit3d.errors import UserError
from fit3d.io import atomic_path, write_json

_EXPORTS = {
    "CLASSES": "layout",
    "Room": "layout",
    "build_room": "layout",
    "camera_path": "camera",
    "RoomTensors": "raycast",
    "render_view": "raycast",
    "generate_room": "write",
}
"""Names this package re-exports -> their submodule, imported on first use (they import torch):
`python -m fit3d.scenes.demo` checks its settings before torch loads."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ROOM_FILE = "room.json"
"""A room's parameters, written after its files: marks a finished room."""

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "Room",
    "RoomTensors",
    "build_room",
    "camera_path",
    "generate_demo",
    "generate_room",
    "render_view",
]

GENERATOR_VERSION = 5
"""Bump when the generator's output changes, so cached sets are regenerated (5: probe and test
rooms, a `room.json` per room; the rooms of 4 are byte-identical)."""
TEST_LOOP = 40
"""Poses of the loop a test room films (whatever `n_views` is): ~10 degrees apart."""
TEST_POSES = (0, 1, 3, 6, 10, 15, 21, 28)
"""Loop poses a test room renders (its first `test_views`): its view pairs are 1 to 28 poses
(~10 to ~280 degrees of the loop) apart, so they fall in every rotation bin of the
correspondence probe."""
PROBE_SEED, TEST_SEED = 100, 1_000_000
"""Room seeds: train and val rooms `1000 * seed + i`, probe rooms `1000 * seed + PROBE_SEED + i`,
test rooms `TEST_SEED + 1000 * test_seed + i`."""


def _room_job(job: tuple) -> float:
    """Generate one room with single-threaded torch, then its `room.json` (the parameters, last);
    returns seconds taken."""
    import torch

    from fit3d.scenes.demo.write import generate_room

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        scene_dir, seed, n_views, width, height, poses, room = job
        generate_room(scene_dir, seed, n_views, width, height, poses=poses)
        write_json(scene_dir / ROOM_FILE, {"params": room})
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[tuple[int, float]]:
    """Run `_room_job` on every job in `workers` processes, this one and `workers - 1` spawned
    ones, each taking the next room when its last one ends (this one starts at once, while the
    others import). Yields (job index, seconds) as rooms end."""
    todo = collections.deque(range(len(jobs)))  # popped by this thread and the pool's
    if workers <= 1:
        for i in todo:
            yield i, _room_job(jobs[i])
        return
    ended: queue.SimpleQueue = queue.SimpleQueue()  # (job index, future) of the pool's rooms
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers - 1, mp_context=ctx) as pool:

        def feed() -> None:  # give a pool process the next room
            try:
                i = todo.popleft()
            except IndexError:
                return

            def done(future: Future) -> None:
                ended.put((i, future))
                if future.exception() is None:
                    feed()

            pool.submit(_room_job, jobs[i]).add_done_callback(done)

        try:
            for _ in range(workers - 1):
                feed()
            left = len(jobs)
            while left:
                try:
                    i = todo.popleft()
                except IndexError:  # all started: wait for the pool's next room
                    i, future = ended.get()
                    yield i, future.result()
                else:
                    yield i, _room_job(jobs[i])
                left -= 1
                while not ended.empty():
                    i, future = ended.get()
                    yield i, future.result()
                    left -= 1
        finally:
            todo.clear()  # on an error: start no more rooms


def generate_demo(
    out: str | Path,
    seed: int = 0,
    n_train: int = 6,
    n_val: int = 3,
    n_views: int = 40,
    width: int = 336,
    height: int = 224,
    n_probe: int = 0,
    probe_views: int = 10,
    n_test: int = 0,
    test_views: int = 5,
    test_seed: int = 0,
    workers: int = 0,
    verbose: bool = False,
) -> Path:
    """Generate the demo set under `out` (cached: a matching `demo.json` marker -> no work; a
    room whose `room.json` matches is kept). Rooms and split files: module docstring.

    Rooms are generated in `workers` processes (0 = one per CPU core; this one and spawned ones),
    each single-threaded: torch's thread pool spends most of its time waiting on these small
    per-tile operations.
    Returns `out`.
    """
    out = Path(out)
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_views": n_views,
        "width": width,
        "height": height,
        "n_probe": n_probe,
        "probe_views": probe_views,
        "n_test": n_test,
        "test_views": test_views,
        "test_seed": test_seed,
    }
    if n_views < 2 or n_train + n_val < 1 or width < 8 or height < 8:
        raise UserError(f"demo needs >= 2 views, >= 1 room and >= 8x8 pixels, got {params}")
    if n_test and not 2 <= test_views <= len(TEST_POSES):
        raise UserError(f"scenes.demo_test_views must be 2..{len(TEST_POSES)}, got {test_views}")
    marker = out / "demo.json"
    if _cached(marker, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".demo.lock", "w") as lock:  # concurrent callers (e.g. DDP ranks) wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cached(marker, params):
            _generate(out, params, workers, verbose)
    return out


def rooms(params: dict) -> dict[str, list[tuple[str, int, int, list[int]]]]:
    """Role -> [(room id, seed, poses of its loop, the poses rendered)] of a set's parameters;
    roles `train`, `val`, `probe`, `test` (module docstring)."""
    seed, n, n_train = params["seed"], params["n_views"], params["n_train"]
    every = list(range(n))
    n_probe_views = min(params["probe_views"], n)
    probe = [round(k * n / n_probe_views) for k in range(n_probe_views)]
    test = list(TEST_POSES[: params["test_views"]])
    ts = params["test_seed"]
    return {
        "train": [(f"demo_{i:03d}", 1000 * seed + i, n, every) for i in range(n_train)],
        "val": [
            (f"demo_{i:03d}", 1000 * seed + i, n, every)
            for i in range(n_train, n_train + params["n_val"])
        ],
        "probe": [
            (f"demo_p{i:02d}", 1000 * seed + PROBE_SEED + i, n, probe)
            for i in range(params["n_probe"])
        ],
        "test": [
            (f"demo_t{ts}_{i:02d}", TEST_SEED + 1000 * ts + i, TEST_LOOP, test)
            for i in range(params["n_test"])
        ],
    }


def _cached(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()).get("params") == params
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _generate(out: Path, params: dict, workers: int, verbose: bool) -> None:
    """Generate every room whose `room.json` does not match, then the set's files."""
    width, height = params["width"], params["height"]
    marker = out / "demo.json"
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    by_role = rooms(params)
    jobs, ids = [], []
    for sid, room_seed, n_views, poses in (r for role in by_role.values() for r in role):
        room = {"version": GENERATOR_VERSION, "seed": room_seed, "n_views": n_views}
        room |= {"poses": poses, "width": width, "height": height}
        if _cached(out / "data" / sid / ROOM_FILE, room):
            continue
        shutil.rmtree(out / "data" / sid, ignore_errors=True)  # only our own folders
        jobs.append((out / "data" / sid, room_seed, n_views, width, height, poses, room))
        ids.append(sid)
    if not workers:  # processes pay off only for real work (spawn costs seconds)
        big = sum(len(j[5]) for j in jobs) * width * height > 4_000_000
        workers = (os.cpu_count() or 1) if big else 1
    for i, secs in _run_jobs(jobs, min(len(jobs), workers)):  # lazy: as each room ends
        if verbose:
            print(f"{ids[i]}: {len(jobs[i][5])} views {width}x{height} in {secs:.1f} s", flush=True)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    lists = {
        "nvs_sem_train": by_role["train"],
        "nvs_sem_val": by_role["val"],
        "probe_train": by_role["train"] + by_role["probe"],
        "test": by_role["test"],
    }
    for name, members in lists.items():
        path = out / "splits" / f"{name}.txt"
        if name == "test" and not members:  # no test rooms: no test split (not an empty one)
            path.unlink(missing_ok=True)
            continue
        with atomic_path(path) as tmp:
            tmp.write_text("".join(r[0] + "\n" for r in members))
    from fit3d.scenes.demo.layout import CLASSES

    write_json(out / "classes.json", {"classes": CLASSES})
    seconds = time.perf_counter() - start
    scenes = [r[0] for role in by_role.values() for r in role]
    write_json(marker, {"params": params, "scenes": scenes, "seconds": round(seconds, 2)})
