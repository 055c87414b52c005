"""Atomic file writes (JSON, safetensors whose bytes depend only on their content), provenance
(git commit, sha256) and checks of input files by content (`file_format`, `read_image`) shared by
every stage."""

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
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fit3d.errors import UserError

if TYPE_CHECKING:
    import numpy as np
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


# --- what a file holds, judged by its bytes (checks before long work) --------------------------
STATE_DICT_FORMATS = ("safetensors", "torch archive", "pickle")
"""Formats of a weights file (`fit3d.weights.load_state_dict_file`): safetensors, `torch.save`'s
zip archive, or its legacy pickle (Meta's and FiT3D's `.pth`)."""
IMAGE_FORMATS = ("PNG image", "JPEG image", "TIFF image", "BMP image", "WebP image", "GIF image")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"BM", "BMP image"),
    (b"GIF8", "GIF image"),
    (b"\x1f\x8b", "gzip archive"),
    (b"\x93NUMPY", "NumPy array"),
    (b"\x89HDF\r\n\x1a\n", "HDF5 file"),
    (b"%PDF", "PDF document"),
)


def _head(path: Path, size: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _text(head: bytes) -> str | None:
    """`head` as text when it is UTF-8 without control bytes (a cut last character allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\t\r\n\f" for c in text) else None


def file_format(path: str | Path) -> str:
    """What a file holds, from its first bytes (never its name): `empty`, `safetensors`, `torch
    archive`, `zip archive`, `pickle`, one of `IMAGE_FORMATS`, `gzip archive`, `NumPy array`,
    `HDF5 file`, `PDF document`, `text` or `unknown`."""
    path = Path(path)
    head = _head(path)
    if not head:
        return "empty"
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
        if 8 + struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip archive"
        return "torch archive" if any(n.endswith("data.pkl") for n in names) else "zip archive"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "text" if _text(head) is not None else "unknown"


def describe_file(path: str | Path) -> str:
    """A few words on what a file holds, for messages: `a text file starting 'root:x:0:0'`, `a
    PNG image`, `an empty file`, `a file of unknown format (bytes 00 01 ...)`."""
    fmt = file_format(path)
    if fmt == "text":
        lines = (_text(_head(Path(path), 200)) or "").strip().splitlines()
        return f"a text file starting {(lines[0] if lines else '')[:40]!r}"
    if fmt == "unknown":
        return f"a file of unknown format (bytes {_head(Path(path), 8).hex(' ')})"
    if fmt == "empty":
        return "an empty file"
    return f"an {fmt}" if fmt[0] in "aeiouAEIOU" else f"a {fmt}"


def check_state_dict_file(path: Path) -> str:
    """The format of weights file `path` (one of `STATE_DICT_FORMATS`); a missing file or one of
    another kind is a one-line `UserError` naming it and saying what it is."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    fmt = file_format(path)
    if fmt not in STATE_DICT_FORMATS:
        raise UserError(
            f"cannot read weights file {path}: it is {describe_file(path)}, not a state dict "
            "(safetensors, or a torch .pt/.pth)"
        )
    return fmt


def read_image(path: str | Path, flags: int | None = None) -> np.ndarray:
    """`cv2.imread(path, flags)` (default `cv2.IMREAD_COLOR`: 8-bit BGR [H, W, 3]); a missing file
    or one that does not decode is a one-line `UserError` naming it (and what it holds)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing image {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if flags is None else flags)
    if img is None:
        fmt = file_format(path)
        what = f"a damaged {fmt}" if fmt in IMAGE_FORMATS else describe_file(path)
        raise UserError(f"image {path} does not decode: it is {what}")
    return img
