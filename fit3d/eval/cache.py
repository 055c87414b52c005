"""On-disk, resumable per-view stores: frozen features and ground truth.

A `ViewStore` holds, for a fixed list of views, one record per view: a few named arrays whose
shapes are fixed up to the view's (h, w). Records are appended to one flat file (`data.bin`) in
view order; a 16-byte entry per finished view (`index.bin`: byte offset int64, h int32, w int32)
is appended after its bytes are flushed. So memory never holds more than one batch, a killed
extraction resumes at the first view without an index entry (bytes past the last entry are cut
off), and reading a view reads just its bytes into fresh arrays (`os.preadv`): nothing stays
mapped or cached, so the resident set does not grow with the number of views.

`meta.json` says what made the records (model, weights sha256, resolution, arrays, the view
keys' hash). Opening a store whose meta differs from the one asked for is a one-line note and a
fresh store: a cache written by another backbone, other weights or at another resolution is never
read. A store is complete when it has an entry for every view.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fit3d.io import write_json

FORMAT = 1
"""Version of the on-disk layout; part of every store's meta."""
_ENTRY = np.dtype([("offset", "<i8"), ("h", "<i4"), ("w", "<i4")])

ArraySpec = tuple[str, tuple[int | str, ...]]
"""(numpy dtype name, shape with "h" / "w" standing for the view's size), e.g.
("float16", (5, 384, "h", "w"))."""


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the view keys in order (identifies the view list of a store)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()


class ViewStore:
    """Append-only store of per-view arrays; see the module docstring.

    Args:
        folder: the store's folder (created).
        spec: array name -> `ArraySpec`, laid out in this order inside a record.
        identity: what made the records (JSON-able); part of the meta. A store with another
            identity, spec or view count is replaced, with a note in `self.note`.
        num_views: number of views the store will hold.
    """

    def __init__(
        self, folder: Path, spec: dict[str, ArraySpec], identity: dict[str, Any], num_views: int
    ):
        self.folder = Path(folder)
        self.spec = {k: (np.dtype(dt).name, tuple(shape)) for k, (dt, shape) in spec.items()}
        self.num_views = num_views
        self.meta = {
            "format": FORMAT,
            "identity": identity,
            "spec": {k: [dt, list(shape)] for k, (dt, shape) in self.spec.items()},
            "views": num_views,
        }
        self.note: str | None = None
        self._reader: tuple[int, int] | None = None  # (pid, read descriptor), see `_fd`
        self._open()

    # --- layout ------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.folder / "data.bin"

    @property
    def index_path(self) -> Path:
        return self.folder / "index.bin"

    def _shape(self, name: str, h: int, w: int) -> tuple[int, ...]:
        dims = self.spec[name][1]
        return tuple(h if d == "h" else w if d == "w" else int(d) for d in dims)

    def record_bytes(self, h: int, w: int) -> int:
        """Bytes of one view's record."""
        return sum(
            int(np.prod(self._shape(k, h, w))) * np.dtype(dt).itemsize
            for k, (dt, _) in self.spec.items()
        )

    # --- opening, resuming -------------------------------------------------------------------
    def _open(self) -> None:
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except ValueError:
                old = {}
            if old != self.meta:
                self.note = self._describe_change(old)
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.is_file():
            for p in (self.data_path, self.index_path):
                p.unlink(missing_ok=True)
            write_json(meta_path, self.meta)
        self._index = self._read_index()

    def _describe_change(self, old: dict) -> str:
        """One line: which store, what made it, what is asked for now."""
        was, now = old.get("identity") or {}, self.meta["identity"]
        diff = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if old.get("spec") != self.meta["spec"] and not diff:
            diff = ["stored arrays"]
        if old.get("views") != self.meta["views"] and not diff:
            diff = ["number of views"]

        def short(v: Any) -> str:
            text = str(v)
            return text[:12] if len(text) == 64 else text  # sha256 digests

        shown = ", ".join(f"{k} {short(was.get(k))} -> {short(now.get(k))}" for k in diff[:3])
        return (
            f"cache {self.folder} was written with other settings ({shown or 'unreadable'}): "
            "extracting again"
        )

    def _read_index(self) -> np.ndarray:
        """Valid index entries; cuts a torn entry and data past the last entry (a killed run)."""
        if not self.index_path.is_file():
            self.index_path.touch()
            self.data_path.touch()
            return np.zeros(0, _ENTRY)
        raw = self.index_path.read_bytes()
        whole = len(raw) // _ENTRY.itemsize * _ENTRY.itemsize
        index = np.frombuffer(raw[:whole], _ENTRY).copy()
        end = 0
        if len(index):
            last = index[-1]
            end = int(last["offset"]) + self.record_bytes(int(last["h"]), int(last["w"]))
        size = self.data_path.stat().st_size if self.data_path.is_file() else 0
        if size < end:  # data lost under an entry (should not happen with flush order): restart
            index, end = np.zeros(0, _ENTRY), 0
        if whole != len(raw) or size != end:
            with open(self.index_path, "r+b") as f:
                f.truncate(len(index) * _ENTRY.itemsize)
            with open(self.data_path, "ab") as f:
                f.truncate(end)
        return index

    @property
    def done(self) -> int:
        """Number of views stored (the first `done` views of the list)."""
        return len(self._index)

    @property
    def complete(self) -> bool:
        return self.done >= self.num_views

    # --- writing ------------------------------------------------------------------------------
    def append(self, records: Sequence[dict[str, torch.Tensor | np.ndarray]]) -> None:
        """Append the records of the next views (in view order); each maps every array name of
        the spec to an array of its shape (h, w read from the first array with "h" in it)."""
        if self.done + len(records) > self.num_views:
            raise ValueError(f"{self.folder}: more records than the {self.num_views} views")
        entries = np.zeros(len(records), _ENTRY)
        offset = self.data_path.stat().st_size
        with open(self.data_path, "ab") as f:
            for n, rec in enumerate(records):
                h, w = self._size_of(rec)
                entries[n] = (offset, h, w)
                for name, (dt, _) in self.spec.items():
                    arr = rec[name]
                    arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else arr
                    arr = np.ascontiguousarray(arr, dtype=dt)
                    want = self._shape(name, h, w)
                    if arr.shape != want:
                        raise ValueError(f"{name}: shape {arr.shape}, expected {want}")
                    f.write(arr.tobytes())
                    offset += arr.nbytes
            f.flush()
            os.fsync(f.fileno())
        with open(self.index_path, "ab") as f:
            f.write(entries.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._index = np.concatenate([self._index, entries])

    def _size_of(self, rec: dict) -> tuple[int, int]:
        h = w = 0
        for name, (_, dims) in self.spec.items():
            shape = tuple(rec[name].shape)
            for d, s in zip(dims, shape, strict=False):
                h = s if d == "h" else h
                w = s if d == "w" else w
        return h, w

    # --- reading -----------------------------------------------------------------------------
    def size(self, i: int) -> tuple[int, int]:
        """(h, w) of view i."""
        e = self._index[i]
        return int(e["h"]), int(e["w"])

    def read(self, i: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Arrays of view i (copies), read with `os.preadv` on one descriptor per store and
        process: no shared file offset (safe in forked loader workers) and no mapping per read
        (mapping and unmapping ~73k arrays cost ~10 s of a demo evaluation)."""
        if not 0 <= i < self.done:
            raise IndexError(
                f"{self.folder}: view {i} not stored ({self.done} of {self.num_views})"
            )
        e = self._index[i]
        h, w = int(e["h"]), int(e["w"])
        pos = int(e["offset"])
        out: dict[str, torch.Tensor] = {}
        for name, (dt, _) in self.spec.items():
            shape = self._shape(name, h, w)
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            if names is None or name in names:
                buf = np.empty(shape, dt)
                got = os.preadv(self._fd(), [memoryview(buf).cast("B")], pos)
                if got != nbytes:
                    raise OSError(f"{self.data_path}: view {i} is truncated ({got} of {nbytes} B)")
                out[name] = torch.from_numpy(buf)
            pos += nbytes
        return out

    def _fd(self) -> int:
        """This process's read-only descriptor of the data file (opened on first use)."""
        if self._reader is None or self._reader[0] != os.getpid():
            self._reader = (os.getpid(), os.open(self.data_path, os.O_RDONLY))
        return self._reader[1]

    def __del__(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None and reader[0] == os.getpid():
            os.close(reader[1])


def fill(
    store: ViewStore,
    make: Callable[[list[int]], list[dict[str, torch.Tensor]]],
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Append records for every view the store lacks, `batch` views per `make(indices)` call
    (`progress(n)` after each batch)."""
    while not store.complete:
        idx = list(range(store.done, min(store.done + batch, store.num_views)))
        store.append(make(idx))
        if progress is not None:
            progress(len(idx))
