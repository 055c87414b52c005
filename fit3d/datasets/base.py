"""The one interface every evaluation dataset implements: `Sample` (one view) and `EvalSet`.

An `EvalSet` is a lazy, indexable sequence of views of one split of one dataset. Opening it
validates the dataset root and reads only the index (split lists, JSON, file names); pixels are
read by `set[i]`, one view at a time, so memory never grows with the size of the set.

    ds = open_dataset("nyuv2", "/data/nyuv2", "test")
    len(ds)                      # cheap
    s = ds[0]                    # Sample: key, image, seg, depth, normals, eval_mask, K, ...
    ds.info(0)                   # ViewInfo(key, group, height, width, K, viewmat): no pixels read
    ds.pairs()                   # fixed correspondence pairs, [] = pick covisible pairs per group

Conventions (docs/method.md, "Conventions"):

- `image` [H, W, 3] float32 RGB in [0, 1], at the size the dataset protocol evaluates (crops that
  the protocol applies to the input, e.g. KITTI's KB crop, are already applied).
- `seg` [H, W] int64 class ids in [0, num_classes), 255 = ignore (the protocols' zero-label
  reductions are applied here, so ids index `classes` directly).
- `depth` [H, W] float32 metres along the optical axis, 0 = invalid.
- `normals` [H, W, 3] float32 unit vectors in the camera frame (OpenCV: x right, y down,
  z forward), facing the camera; all-zero = invalid. Datasets whose release stores another
  convention say so in their module docstring.
- `eval_mask` [H, W] bool: True where a pixel counts in the metrics (Eigen / Garg crops,
  anonymisation masks); None = every pixel with a valid label counts. The valid-label test itself
  (seg != 255, depth in (min_depth, max_depth), normals != 0) is the evaluator's.
- `K` [3, 3] intrinsics at this image size with pixel centres at +0.5; `viewmat` [4, 4]
  world-to-camera with OpenCV axes. Both None where the dataset has no calibration / poses.
- `key` is unique within the split; `group` names the scene / sequence / object a view belongs
  to (views of one group share a world frame, so any two of them may form a correspondence pair).

`EvalSet` attributes: `name`, `split`, `tasks` (subset of {"seg", "depth", "normals", "corr"}: the
ground truth the set provides), `classes` (names, id = index; None without segmentation),
`min_depth` / `max_depth` (the protocol's depth range in metres: the depth bins, and valid ground
truth; None = unbounded), `gt_max_depth` (where valid ground truth ends if not at `max_depth`),
`paper` (published numbers for this set, see `PaperNumbers`), and the protocol details the
evaluator follows: `mask_tasks` (the tasks `eval_mask` applies to), `mask_is_crop` (the mask is
a test-time crop, Eigen's or Garg's, that the originals never apply to training labels),
`image_norm` (`imagenet`, or `half` for mean = std = 0.5) and `color_brightness` (the brightness
range of FiT3D's depth colour augmentation).

Bad roots raise `fit3d.errors.UserError` with one line: the path tried, what was expected there
and where the official release is documented (`missing`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import cv2
import numpy as np
import torch

from fit3d.errors import UserError
from fit3d.io import read_image

TASKS = frozenset({"seg", "depth", "normals", "corr"})
"""Every task name a set may provide."""
IGNORE = 255
"""Segmentation id of pixels that count in no metric."""

PaperNumbers = dict[str, dict[str, tuple[float, float]]]
"""backbone alias -> {metric key: (before, after)}: the published FiT3D numbers (original features,
FiT3D features) or, for Probe3D's sets, Probe3D's number as `before` and NaN as `after`. Units are
ours: fractions for mIoU, accuracies and recalls, metres for RMSE, degrees for angles."""


@dataclass
class Sample:
    """One view with whatever ground truth its dataset provides (see the module docstring)."""

    key: str
    image: torch.Tensor  # [H, W, 3] float32 in [0, 1]
    seg: torch.Tensor | None = None  # [H, W] int64, 255 = ignore
    depth: torch.Tensor | None = None  # [H, W] float32 metres, 0 = invalid
    normals: torch.Tensor | None = None  # [H, W, 3] float32, camera frame, 0 = invalid
    eval_mask: torch.Tensor | None = None  # [H, W] bool
    K: torch.Tensor | None = None  # [3, 3]
    viewmat: torch.Tensor | None = None  # [4, 4] world-to-camera, OpenCV
    group: str = ""


@dataclass(frozen=True)
class ViewInfo:
    """What is known about a view without reading its pixels (for choosing pairs, batching)."""

    key: str
    group: str
    height: int
    width: int
    K: torch.Tensor | None = None  # [3, 3]
    viewmat: torch.Tensor | None = None  # [4, 4]


class EvalSet(Sequence[Sample]):
    """Lazy sequence of `Sample`s of one split; subclasses implement `__len__`, `info`, `_load`.

    Subclasses set the class attributes below (instance attributes where they depend on options)
    and validate their root in `__init__`, before any long work.
    """

    name: str = ""
    split: str = ""
    tasks: frozenset[str] = frozenset()
    classes: tuple[str, ...] | None = None
    min_depth: float = 1e-3
    max_depth: float | None = None
    gt_max_depth: float | None = None
    paper: PaperNumbers = {}
    mask_tasks: frozenset[str] = frozenset({"seg", "depth", "normals"})
    mask_is_crop: bool = False
    image_norm: str = "imagenet"
    color_brightness: tuple[float, float] = (0.75, 1.25)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def info(self, i: int) -> ViewInfo:
        """Key, group, size and cameras of view `i` (reads no pixels)."""

    @abstractmethod
    def _load(self, i: int) -> Sample:
        """View `i` (0 <= i < len) with its ground truth."""

    def pairs(self) -> list[tuple[int, int]]:
        """Fixed correspondence pairs (indices into this set); [] = evaluator picks covisible
        pairs within each group."""
        return []

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"{self.name} {self.split}: index {i} out of range for {n} views")
        return self._load(j)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, views={len(self)}, "
            f"tasks={sorted(self.tasks)}, classes={self.num_classes})"
        )


# --- helpers shared by the readers -------------------------------------------------------------
def missing(path: Path, expected: str, where: str) -> UserError:
    """The one-line error for a missing or wrong dataset file: path tried, what, where to get it."""
    return UserError(f"{path}: expected {expected}; get it from {where}")


def require_file(path: Path, expected: str, where: str) -> Path:
    """`path` if it is a file, else the `missing` error."""
    if not path.is_file():
        raise missing(path, expected, where)
    return path


def require_dir(path: Path, expected: str, where: str) -> Path:
    """`path` if it is a folder, else the `missing` error."""
    if not path.is_dir():
        raise missing(path, expected, where)
    return path


def check_split(name: str, split: str, known: Sequence[str]) -> None:
    """A split that the dataset does not define is a UserError naming the known ones."""
    if split not in known:
        raise UserError(f"dataset {name} has no split {split!r} (known: {', '.join(known)})")


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file, `#` comments skipped."""
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file (EXIF orientation applied, as cv2 and mmcv do)."""
    return cv2.cvtColor(read_image(path), cv2.COLOR_BGR2RGB)


def read_png(path: Path, dtype: type | None = None) -> np.ndarray:
    """A single-channel PNG as stored (8 or 16 bit, palette PNGs as their indices)."""
    from PIL import Image  # palette PNGs need PIL: cv2 would expand them to colours

    if not path.is_file():
        raise UserError(f"{path}: missing label file")
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except OSError as e:
        raise UserError(f"{path}: unreadable PNG ({e})") from e
    if arr.ndim != 2:
        raise UserError(f"{path}: expected a single-channel PNG, got shape {arr.shape}")
    return arr if dtype is None else arr.astype(dtype)


def to_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).float() / 255.0


def reduce_zero_label(label: np.ndarray) -> torch.Tensor:
    """mmseg's `reduce_zero_label`: 0 -> 255 (ignore), k -> k - 1, 255 stays 255."""
    lab = label.astype(np.int64)
    out = lab - 1
    out[(lab == 0) | (lab == IGNORE)] = IGNORE
    return torch.from_numpy(out)


def read_pair_list(
    lists: Sequence[Path], what: str, where: str
) -> tuple[Path, list[tuple[str, str]]]:
    """The first existing file of `lists` (a split list in BTS's format, one `<image> <depth |
    None> [focal]` per line, as FiT3D's depth toolbox reads it) and its (image, depth) paths:
    lines without depth skipped, a leading slash dropped, sorted by image path."""
    lst = next((p for p in lists if p.is_file()), None)
    if lst is None:
        raise missing(lists[0], what, where)
    items = []
    for ln in read_lines(lst):
        parts = ln.split()
        if len(parts) < 2:
            raise UserError(f"{lst}: line {ln!r} is not '<image> <depth> <focal>'")
        if parts[1] != "None":
            items.append((parts[0].lstrip("/\\"), parts[1].lstrip("/\\")))
    if not items:
        raise UserError(f"{lst}: lists no image with ground-truth depth")
    return lst, sorted(items)


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    """[3, 3] float32 pinhole matrix."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def box_mask(height: int, width: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """[H, W] bool, True inside rows [top, bottom) and columns [left, right)."""
    m = torch.zeros(height, width, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def evenly_spaced(n: int, k: int) -> list[int]:
    """`k` evenly spaced indices of range(n) (all of them when k <= 0 or k >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]
