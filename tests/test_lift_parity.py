"""Stage 1/2 options that follow FiT3D (3DGS) where fit3d's defaults differ: screen-space pruning
of Gaussians wider than 20 px after the first opacity reset, and fitting / fine-tuning on every
view of a scene (train and test frames)."""

from __future__ import annotations

import pytest
import torch

from fit3d.config import load_config
from stage1_lift.loop import adam, make_strategy, read_views


def _gaussians(n: int = 3):
    params = torch.nn.ParameterDict(
        {
            "means": torch.zeros(n, 3),
            "scales": torch.full((n, 3), -5.0),  # tiny in 3D: only the 2D rule can prune them
            "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
            "opacities": torch.full((n,), 3.0),  # opaque: the opacity rule keeps them
        }
    )
    return params, {k: adam([v], 1e-3) for k, v in params.items()}


def _refine(cfg, radii_px: list[float], step: int, size: int = 400) -> int:
    """Gaussians left after one post-backward refinement at `step` whose screen radii were
    `radii_px` (pixels of a size x size view)."""
    strategy = make_strategy(cfg, size)
    params, opts = _gaussians(len(radii_px))
    state = strategy.initialize_state(scene_scale=1.0)
    means2d = torch.zeros(1, len(radii_px), 2, requires_grad=True)
    (means2d * 0).sum().backward()  # zero gradient: nothing grows
    radii = torch.tensor(radii_px, dtype=torch.int32)[None, :, None].repeat(1, 1, 2)
    info = {"means2d": means2d, "radii": radii, "width": size, "height": size, "n_cameras": 1,
            "gaussian_ids": None}  # fmt: skip
    strategy.step_post_backward(params, opts, state, step, info)
    return len(params["means"])


def test_screen_space_pruning_after_the_first_reset_as_3dgs():
    cfg = load_config([], [])  # lift: reset 3000, refine 500..15000 every 100, 20 px
    assert cfg.lift.prune_radius_px == 20.0
    strategy = make_strategy(cfg, 876)
    assert strategy.prune_scale2d == pytest.approx(20 / 876)
    assert strategy.refine_scale2d_stop_iter == cfg.lift.refine_stop
    assert _refine(cfg, [5.0, 30.0, 19.0], step=3100) == 2  # the 30 px one goes
    assert _refine(cfg, [5.0, 30.0, 19.0], step=2900) == 3  # before the first reset: kept
    off = load_config([], ["lift.prune_radius_px=0"])
    assert make_strategy(off, 876).refine_scale2d_stop_iter == 0
    assert _refine(off, [5.0, 30.0, 19.0], step=3100) == 3


def test_the_demo_schedule_never_prunes_by_screen_size():
    demo = load_config(["demo"], [])  # no opacity reset: the rule's window never opens
    assert demo.lift.reset_every == 0
    assert _refine(demo, [5.0, 300.0], step=200) == 2


class _Scene:
    """Five 4x6 views; train and test lists as given."""

    def __init__(self, train: list[int], test: list[int]):
        self.train_views, self.test_views = train, test

    def __len__(self) -> int:
        return 5

    def load_image(self, i: int) -> torch.Tensor:
        return torch.zeros(4, 6, 3)

    def load_mask(self, i: int) -> None:
        return None

    def viewmat(self, i: int) -> torch.Tensor:
        return torch.eye(4)

    def K(self, i: int) -> torch.Tensor:
        return torch.eye(3)

    def width(self, i: int) -> int:
        return 6

    def height(self, i: int) -> int:
        return 4


def test_all_views_fits_test_frames_too():
    scene = _Scene([0, 1, 3], [2, 4])
    assert read_views(scene).train == [0, 1, 3]
    views = read_views(scene, all_views=True)
    assert views.train == [0, 1, 2, 3, 4] and views.test == [2, 4]


def test_bad_view_choice_stops_the_lift_with_one_line(tmp_path):
    from fit3d.errors import UserError

    with pytest.raises(UserError, match=r"lift.views must be one of \['train', 'all'\]"):
        load_config([], [f"run.out={tmp_path}", "lift.views=most"])


def test_finetuning_on_all_views_takes_the_test_frames_too(tmp_path):
    from stage2_finetune.data import FinetuneDataModule, read_lift_run
    from stage2_finetune.synthetic import write_lift_run, write_scenes

    ids = ["s0", "s1"]  # 6 views each: 2 and 5 are test views
    write_scenes(tmp_path / "scenes", ids)
    write_lift_run(tmp_path / "lift" / "default", tmp_path / "scenes", ids)
    run = read_lift_run(tmp_path / "lift" / "default")

    def grid(h: int, w: int) -> tuple[int, int]:
        return h // 14, w // 14

    train_only = FinetuneDataModule(run, grid).train_pairs
    everything = FinetuneDataModule(run, grid, all_views=True).train_pairs
    assert len(train_only) == 8 and all(v not in (2, 5) for _, v in train_only)
    assert sorted(everything) == [(s, v) for s in range(2) for v in range(6)]
