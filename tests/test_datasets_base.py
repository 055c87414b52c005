"""Shared pieces of the dataset interface: reduce-zero-label, evenly spaced views, crop masks,
the one-line missing-file error, and the registry behind open_dataset."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from fit3d.datasets import DATASETS, EvalSet
from fit3d.datasets.base import box_mask, evenly_spaced, missing, reduce_zero_label


def test_reduce_zero_label():
    lab = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(lab).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_evenly_spaced():
    assert evenly_spaced(10, 0) == list(range(10))
    assert evenly_spaced(10, 20) == list(range(10))
    assert evenly_spaced(10, 1) == [0]
    assert evenly_spaced(9, 3) == [0, 4, 8]
    picks = evenly_spaced(100, 7)
    assert len(set(picks)) == 7 and picks[0] == 0 and picks[-1] == 99


def test_box_mask_and_missing(tmp_path):
    m = box_mask(5, 6, 1, 3, 2, 5)
    assert m.sum() == 6 and m[1, 2] and m[2, 4] and not m[3, 2] and not m[1, 5]
    err = missing(tmp_path / "x.mat", "the labeled set", "example.org/data")
    assert (
        str(err) == f"{tmp_path / 'x.mat'}: expected the labeled set; get it from example.org/data"
    )


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_names_real_evalsets(name):
    module, cls = DATASETS[name]
    obj = getattr(importlib.import_module(f"fit3d.datasets.{module}"), cls)
    assert issubclass(obj, EvalSet)
    for key, (before, after) in ((k, v) for d in obj.paper.values() for k, v in d.items()):
        assert key.startswith("eval/") and before > 0 and (np.isnan(after) or after > 0)
