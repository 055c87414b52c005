"""Demo scenes: procedurally furnished rooms with exact ground truth, in the ScanNet++ layout.

Each room (`layout`) is an axis-aligned shell furnished with analytic solids in 17 classes
(`CLASSES`), textured from scikit-image's photographs (`materials`), filmed along a hand-held-like
loop (`camera`) by a vectorised ray caster that also gives exact depth, normals and labels
(`raycast`), and written as a ScanNet++ scene (`write`): its DSLR capture with exact ground truth
and its scan, a triangle mesh with segment annotations (`mesh`). `generate_demo` makes a set:

    <out>/data/demo_NNN/{dslr,scans}/  one folder per room (see `write`)
    <out>/splits/nvs_sem_{train,val}.txt
    <out>/classes.json                 {"classes": CLASSES}
    <out>/demo.json                    the parameters; written last, so it marks a finished set

A second call with the same parameters does nothing. Command line: `python -m fit3d.scenes.demo`.
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
from fit3d.io import write_json

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

GENERATOR_VERSION = 4
"""Bump when the generator's output changes, so cached sets are regenerated (4: adds `scans/`;
the views are byte-identical to 3's)."""


def _room_job(job: tuple) -> float:
    """Generate one room with single-threaded torch; returns seconds taken."""
    import torch

    from fit3d.scenes.demo.write import generate_room

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        generate_room(*job)
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
    workers: int = 0,
    verbose: bool = False,
) -> Path:
    """Generate the demo set under `out` (cached: a matching `demo.json` marker -> no work).

    Train rooms are listed in `splits/nvs_sem_train.txt`, held-out rooms in `nvs_sem_val.txt`.
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
    }
    if n_views < 2 or n_train + n_val < 1 or width < 8 or height < 8:
        raise UserError(f"demo needs >= 2 views, >= 1 room and >= 8x8 pixels, got {params}")
    marker = out / "demo.json"
    if _cached(marker, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".demo.lock", "w") as lock:  # concurrent callers (e.g. DDP ranks) wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cached(marker, params):
            _generate(out, params, workers, verbose)
    return out


def _cached(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()).get("params") == params
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _generate(out: Path, params: dict, workers: int, verbose: bool) -> None:
    """Generate every room (room i draws from seed 1000 * seed + i), then the set's files."""
    seed, n_train, n_val = params["seed"], params["n_train"], params["n_val"]
    n_views, width, height = params["n_views"], params["width"], params["height"]
    marker = out / "demo.json"
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    ids = [f"demo_{i:03d}" for i in range(n_train + n_val)]
    for sid in ids:  # only our own folders: `out` may hold other data
        shutil.rmtree(out / "data" / sid, ignore_errors=True)
    jobs = [
        (out / "data" / sid, seed * 1000 + i, n_views, width, height) for i, sid in enumerate(ids)
    ]
    if not workers:  # processes pay off only for real work (spawn costs seconds)
        big = len(jobs) * n_views * width * height > 4_000_000
        workers = (os.cpu_count() or 1) if big else 1
    for i, secs in _run_jobs(jobs, min(len(jobs), workers)):  # lazy: as each room ends
        if verbose:
            print(f"{ids[i]}: {n_views} views {width}x{height} in {secs:.1f} s", flush=True)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    (out / "splits" / "nvs_sem_train.txt").write_text("".join(s + "\n" for s in ids[:n_train]))
    (out / "splits" / "nvs_sem_val.txt").write_text("".join(s + "\n" for s in ids[n_train:]))
    from fit3d.scenes.demo.layout import CLASSES

    write_json(out / "classes.json", {"classes": CLASSES})
    seconds = time.perf_counter() - start
    write_json(marker, {"params": params, "scenes": ids, "seconds": round(seconds, 2)})
