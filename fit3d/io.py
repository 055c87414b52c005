"""Atomic file writes (JSON, safetensors whose bytes depend only on their content) and provenance
(git commit, sha256) shared by every stage."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside `write_safetensors`: `sha256_file` and the JSON writers are used by
# `python -m fit3d.weights --prepare`, which must stay instant once the weights are cached.


@functools.cache
def safetensors_dtypes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name, in the order `write_safetensors` lays tensors out:
    widest elements first, so every tensor starts at a multiple of its element size (the
    safetensors library uses the same order, so a file is what it would write with the same
    metadata in sorted key order)."""
    import torch

    return {
        torch.uint64: "U64",
        torch.int64: "I64",
        torch.float64: "F64",
        torch.float32: "F32",
        torch.uint32: "U32",
        torch.int32: "I32",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.uint16: "U16",
        torch.int16: "I16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


def _current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; use normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None
) -> None:
    """Save `tensors` (any device) and `meta` (values as `str`) as safetensors, atomically.

    The bytes depend only on the tensors' names, dtypes, shapes and values and on `meta`, never on
    dict order or the process: the header is compact JSON with `__metadata__` first (keys sorted),
    then the tensors by dtype (`safetensors_dtypes()` order) and name, padded with spaces to a
    multiple of 8 bytes; the data follow in the same order, little-endian. (The safetensors
    library keeps the metadata in a hash map and writes its keys in a different order in every
    process, so equal weights got a different sha256 on every conversion.)
    """
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors writes native bytes; safetensors is little-endian")
    dtypes = safetensors_dtypes()
    rank = {dt: i for i, dt in enumerate(dtypes)}
    for name, t in tensors.items():
        if t.dtype not in dtypes:
            raise TypeError(f"write_safetensors: {name} has dtype {t.dtype}, not in safetensors")
    names = sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k))
    text_meta = sorted((str(k), str(v)) for k, v in (meta or {}).items())
    header: dict[str, Any] = {"__metadata__": dict(text_meta)}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entry = {"dtype": dtypes[t.dtype], "shape": list(t.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)  # [numel]
            f.write(flat.view(torch.uint8).numpy())  # raw bytes, no extra copy


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The source tree's git commit (with `-dirty` if modified), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")
