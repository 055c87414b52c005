"""The stage-1 output format: save/load round trip, activated values, done-marker semantics."""

import json

import pytest
import torch

from fit3d.errors import UserError
from fit3d.gaussians import list_lifted_scenes, load_lifted_scene, save_lifted_scene


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
