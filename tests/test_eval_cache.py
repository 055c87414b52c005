"""The on-disk view store: round trip, resuming after a kill, invalidation, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fit3d.eval.cache import ViewStore, fill, keys_digest

SPEC = {"maps": ("float16", (2, 3, "h", "w")), "cls": ("float16", (3,))}


def _record(k: int, h: int, w: int) -> dict[str, torch.Tensor]:
    """A record whose every value says which view it belongs to."""
    gen = torch.Generator().manual_seed(k)
    return {
        "maps": torch.randn(2, 3, h, w, generator=gen).half(),
        "cls": torch.full((3,), k).half(),
    }


def _sizes(k: int) -> tuple[int, int]:
    return (4 + k % 3, 5 + k % 2)  # views of different sizes


def test_round_trip_with_mixed_sizes(tmp_path):
    store = ViewStore(tmp_path / "s", SPEC, {"model": "a"}, num_views=7)
    fill(store, lambda idx: [_record(k, *_sizes(k)) for k in idx], batch=3)
    assert store.complete and store.done == 7
    again = ViewStore(tmp_path / "s", SPEC, {"model": "a"}, num_views=7)  # reopened: reused
    assert again.note is None and again.complete
    for k in range(7):
        got = again.read(k)
        assert again.size(k) == _sizes(k)
        assert torch.equal(got["maps"], _record(k, *_sizes(k))["maps"])
        assert torch.equal(got["cls"], _record(k, *_sizes(k))["cls"])
    only = again.read(3, ("cls",))
    assert list(only) == ["cls"]
    with pytest.raises(IndexError):
        again.read(7)


def test_killed_run_resumes_at_the_first_unfinished_view(tmp_path):
    store = ViewStore(tmp_path / "s", SPEC, {"model": "a"}, num_views=6)
    store.append([_record(k, 4, 5) for k in range(3)])
    # a kill while writing view 3: its bytes are half there and its index entry torn
    with open(store.data_path, "ab") as f:
        f.write(b"\x01" * 50)
    with open(store.index_path, "ab") as f:
        f.write(b"\x02" * 7)
    made: list[int] = []

    def make(idx):
        made.extend(idx)
        return [_record(k, 4, 5) for k in idx]

    resumed = ViewStore(tmp_path / "s", SPEC, {"model": "a"}, num_views=6)
    assert resumed.done == 3 and resumed.note is None
    fill(resumed, make, batch=2)
    assert made == [3, 4, 5]  # nothing extracted twice
    for k in range(6):
        assert torch.equal(resumed.read(k)["maps"], _record(k, 4, 5)["maps"])
    assert resumed.data_path.stat().st_size == 6 * resumed.record_bytes(4, 5)


def test_other_identity_is_one_line_and_a_fresh_store(tmp_path):
    store = ViewStore(tmp_path / "s", SPEC, {"model": "vit_a", "weights_sha256": "1" * 64}, 2)
    store.append([_record(0, 4, 5), _record(1, 4, 5)])
    other = ViewStore(tmp_path / "s", SPEC, {"model": "vit_b", "weights_sha256": "2" * 64}, 2)
    assert other.done == 0 and not other.complete
    assert other.note is not None and "\n" not in other.note
    assert "model vit_a -> vit_b" in other.note and "111111111111 -> 222222222222" in other.note
    grown = ViewStore(tmp_path / "s", SPEC, {"model": "vit_b", "weights_sha256": "2" * 64}, 3)
    assert grown.done == 0 and "number of views" in grown.note


def test_keys_digest_depends_on_order():
    assert keys_digest(["a", "b"]) != keys_digest(["b", "a"])
    assert keys_digest(["a", "b"]) == keys_digest(iter(["a", "b"]))


def test_reads_are_copies_not_mappings(tmp_path):
    store = ViewStore(tmp_path / "s", {"x": ("float32", ("h", "w"))}, {}, 1)
    store.append([{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}])
    got = store.read(0)["x"]
    store.data_path.write_bytes(b"\x00" * store.data_path.stat().st_size)  # file changed after
    assert got.tolist() == [[0, 1, 2], [3, 4, 5]]
