"""fit3d.gaussians, the stage-1 output format: save/load round trip, the files on disk, activated
values, done-marker semantics and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fit3d.errors import UserError
from fit3d.gaussians import (
    is_lifted_scene,
    list_lifted_scenes,
    load_lifted_scene,
    make_decoder,
    save_lifted_scene,
)
from fit3d.io import write_safetensors


def _scene(n: int = 5, d: int = 4, c: int = 6, k: int = 16) -> tuple[dict, torch.Tensor]:
    g = {
        "means": torch.randn(n, 3),
        "quats": torch.nn.functional.normalize(torch.randn(n, 4), dim=-1),
        "scales": torch.rand(n, 3) + 0.01,
        "opacities": torch.rand(n),
        "sh": torch.randn(n, k, 3),
        "features": torch.randn(n, d),
    }
    return g, torch.randn(c, d, 3, 3)


def test_round_trip(tmp_path):
    g, w = _scene()
    save_lifted_scene(tmp_path / "s0", g, w, {"scene_id": "s0", "feature_dim": 4})
    assert list_lifted_scenes(tmp_path) == ["s0"]
    lifted = load_lifted_scene(tmp_path / "s0")
    for key in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.equal(lifted.gaussians[key], g[key])
    # features are stored in half precision: equal to the f16 rounding of the input
    assert torch.equal(lifted.gaussians["features"], g["features"].half().float())
    assert lifted.gaussians["features"].dtype == torch.float32
    assert lifted.sh_degree == 3
    assert lifted.meta == {"scene_id": "s0", "feature_dim": 4}
    assert not lifted.decoder.weight.requires_grad and lifted.decoder.bias is None
    x = torch.randn(1, 4, 7, 9)
    ref = torch.nn.functional.conv2d(x, w, padding=1)  # the documented decoder
    assert torch.allclose(lifted.decoder(x), ref, atol=1e-6)


def test_unfinished_scene_is_rejected(tmp_path):
    g, w = _scene()
    save_lifted_scene(tmp_path / "s0", g, w, {"scene_id": "s0"})
    (tmp_path / "s0" / "meta.json").unlink()
    assert list_lifted_scenes(tmp_path) == []
    with pytest.raises(UserError, match="not a finished"):
        load_lifted_scene(tmp_path / "s0")


def test_decoder_shape_mismatch_is_a_user_error(tmp_path):
    g, _ = _scene(d=4)
    save_lifted_scene(tmp_path / "s0", g, torch.randn(6, 5, 3, 3), {"scene_id": "s0"})
    assert json.loads((tmp_path / "s0" / "meta.json").read_text())["scene_id"] == "s0"
    with pytest.raises(UserError, match="does not fit"):
        load_lifted_scene(tmp_path / "s0")


def test_files_on_disk_follow_the_documented_format(tmp_path):
    g, w = _scene(n=3, d=2, c=5, k=4)
    save_lifted_scene(tmp_path / "s0", g, w, {"scene_id": "s0"})
    raw = load_file(str(tmp_path / "s0" / "gaussians.safetensors"))
    assert sorted(raw) == sorted(["means", "quats", "scales", "opacities", "sh", "features"])
    assert raw["features"].dtype == torch.float16
    assert all(raw[k].dtype == torch.float32 for k in raw if k != "features")
    decoder = load_file(str(tmp_path / "s0" / "decoder.safetensors"))
    assert list(decoder) == ["weight"] and torch.equal(decoder["weight"], w)


@pytest.mark.parametrize(("k", "degree"), [(1, 0), (4, 1), (9, 2), (16, 3)])
def test_sh_degree_from_the_coefficient_count(tmp_path, k, degree):
    g, w = _scene(k=k)
    save_lifted_scene(tmp_path / "s", g, w, {})
    assert load_lifted_scene(tmp_path / "s").sh_degree == degree


def test_to_moves_tensors_and_decoder(tmp_path):
    g, w = _scene()
    save_lifted_scene(tmp_path / "s", g, w, {})
    lifted = load_lifted_scene(tmp_path / "s")
    moved = lifted.to(torch.float64)  # a dtype exercises the same .to path as a device
    assert moved is lifted
    assert all(v.dtype == torch.float64 for v in lifted.gaussians.values())
    assert lifted.decoder.weight.dtype == torch.float64
    assert torch.equal(lifted.gaussians["means"], g["means"].double())


def test_list_lifted_scenes_sorts_finished_folders_only(tmp_path):
    assert list_lifted_scenes(tmp_path / "missing") == []
    g, w = _scene()
    for sid in ("b", "a", "c"):
        save_lifted_scene(tmp_path / sid, g, w, {})
    (tmp_path / "c" / "meta.json").unlink()  # unfinished
    (tmp_path / "notes.txt").write_text("not a scene")
    assert list_lifted_scenes(tmp_path) == ["a", "b"]
    assert is_lifted_scene(tmp_path / "a") and not is_lifted_scene(tmp_path / "c")


def test_make_decoder_is_the_documented_conv():
    dec = make_decoder(4, 6)
    assert dec.weight.shape == (6, 4, 3, 3) and dec.bias is None
    x = torch.randn(1, 4, 5, 7)
    torch.testing.assert_close(dec(x), torch.nn.functional.conv2d(x, dec.weight, padding=1))


def test_bad_input_to_save_and_load(tmp_path):
    g, w = _scene()
    partial = {k: v for k, v in g.items() if k != "opacities"}
    with pytest.raises(ValueError, match="opacities"):
        save_lifted_scene(tmp_path / "s0", partial, w, {})
    assert not (tmp_path / "s0").exists() or list((tmp_path / "s0").iterdir()) == []
    # a gaussians file without a tensor, and one that is not safetensors at all
    save_lifted_scene(tmp_path / "s1", g, w, {})
    write_safetensors(tmp_path / "s1" / "gaussians.safetensors", partial)
    with pytest.raises(UserError, match=r"lacks tensors \['opacities'\]"):
        load_lifted_scene(tmp_path / "s1")


def test_unreadable_gaussians_file_is_a_user_error(tmp_path):
    g, w = _scene()
    save_lifted_scene(tmp_path / "s1", g, w, {})
    (tmp_path / "s1" / "gaussians.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read lifted scene"):
        load_lifted_scene(tmp_path / "s1")
