"""Stage-2 objectives (`finetune.objective`) and adapters (`finetune.adapter`): the InfoNCE term on
known values, the token mapping of matched points under flips and crops, view-pair sampling, and
each objective / adapter through the real entry points on the tiny demo."""

import json
import math

import pytest
import torch
from _tiny_demo import TINY_DEMO
from safetensors.torch import load_file

from fit3d.compare import main as compare_main
from fit3d.losses import correspondence_infonce
from stage2_finetune.data import ShuffledSampler
from stage2_finetune.equivariance import pair_loss, sample_tokens, to_tokens


# --- the InfoNCE term -----------------------------------------------------------------------
def test_infonce_identical_features_give_log_m() -> None:
    f = torch.randn(1, 16).expand(10, 16)
    assert correspondence_infonce(f, f.clone()).item() == pytest.approx(math.log(10), rel=1e-6)


@pytest.mark.parametrize("tau", [0.2, 0.5, 1.0])
def test_infonce_orthonormal_points_have_the_closed_form(tau: float) -> None:
    # cos(i, i) = 1, cos(i, j) = 0: each cross-entropy is log(1 + (M - 1) exp(-1 / tau))
    m = 6
    f = torch.eye(m, 8) * 3.0  # norms do not matter (cosines)
    want = math.log(1 + (m - 1) * math.exp(-1 / tau))
    got = correspondence_infonce(f, f.clone(), temperature=tau).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_infonce_gradient_matches_a_float64_reference() -> None:
    # fa = (1, 0), (0, 1); fb = (cos t, sin t), (0, 1): cosines S = [[cos t, 0], [sin t, 1]].
    # Reference: the two cross-entropies written out with math (rows of S / tau, then columns),
    # differentiated by central differences at t = 0.3
    tau = 0.5

    def ref(tt: float) -> float:
        s = [[math.cos(tt), 0.0], [math.sin(tt), 1.0]]

        def ce(mat: list[list[float]]) -> float:
            return (
                sum(
                    -mat[i][i] / tau + math.log(sum(math.exp(x / tau) for x in mat[i]))
                    for i in range(2)
                )
                / 2
            )

        return 0.5 * (ce(s) + ce([list(r) for r in zip(*s, strict=True)]))

    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fa = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    fb = torch.stack([torch.stack([torch.cos(t), torch.sin(t)]), torch.tensor([0.0, 1.0]).double()])
    loss = correspondence_infonce(fa, fb, temperature=tau)
    loss.backward()
    assert loss.item() == pytest.approx(ref(0.3), rel=1e-5)
    h = 1e-6
    assert t.grad.item() == pytest.approx((ref(0.3 + h) - ref(0.3 - h)) / (2 * h), rel=1e-4)


def test_infonce_without_negatives_is_zero_and_shapes_are_checked() -> None:
    fa, fb = torch.randn(5, 4), torch.randn(5, 4)
    none = torch.zeros(5, 5, dtype=torch.bool)
    assert correspondence_infonce(fa, fb, negatives=none).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        correspondence_infonce(fa, fb[:4])


# --- matched points in token maps -----------------------------------------------------------
def _batch(flip: bool, origin: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {
        "depth": torch.ones(1, 20, 40),  # a 40 x 20 depth grid
        "grid": torch.tensor([[10, 20]]),  # whole token grid h=10, w=20: 2x2 depth px per token
        "key": torch.tensor([[0, 0, int(flip)]]),
        "origin": torch.tensor([origin]),
    }


def test_to_tokens_follows_the_flip_and_the_crop() -> None:
    xy = torch.tensor([[0, 0], [3, 5], [39, 19]])
    # pixel centre (x + 0.5) / 40 * 20 tokens: x = 3 -> 1.75, y = 5 -> 2.75
    plain = to_tokens(xy, _batch(False, (0, 0)), 0, (10, 20))
    assert torch.allclose(plain, torch.tensor([[0.25, 0.25], [1.75, 2.75], [19.75, 9.75]]))
    flipped = to_tokens(xy, _batch(True, (0, 0)), 0, (10, 20))
    assert torch.allclose(flipped[:, 0], 20 - plain[:, 0]) and torch.equal(
        flipped[:, 1], plain[:, 1]
    )
    cropped = to_tokens(xy, _batch(True, (2, 5)), 0, (8, 15))
    assert torch.allclose(cropped, flipped - torch.tensor([5.0, 2.0]))


def test_sample_tokens_reads_token_centres_exactly() -> None:
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # [C, h, w]
    uv = torch.tensor([[0.5, 0.5], [3.5, 2.5], [2.0, 1.5]])  # centres, and between two columns
    got = sample_tokens(tokens, uv)
    close = dict(atol=1e-5, rtol=0)
    assert torch.allclose(got[0], tokens[:, 0, 0], **close)
    assert torch.allclose(got[1], tokens[:, 2, 3], **close)
    assert torch.allclose(got[2], (tokens[:, 1, 1] + tokens[:, 1, 2]) / 2, **close)


def test_pair_loss_is_lower_where_the_views_agree() -> None:
    torch.manual_seed(0)
    ta = torch.randn(16, 4, 4)
    uv = torch.tensor([[i + 0.5, j + 0.5] for i in range(4) for j in range(4)])
    apart = torch.cdist(uv, uv) > 1.0
    same = pair_loss(ta, ta.clone(), (uv, uv, apart), 0.1)
    other = pair_loss(ta, torch.randn(16, 4, 4), (uv, uv, apart), 0.1)
    assert same < 0.1 < other


# --- view pairs -----------------------------------------------------------------------------
def test_view_pair_order_pairs_views_of_one_scene_and_splits_ranks_by_pairs() -> None:
    scene_of = [0] * 5 + [1] * 4  # 9 (scene, view) pairs in two scenes
    partners = [[j for j in range(9) if scene_of[j] == scene_of[i] and j != i] for i in range(9)]
    one = ShuffledSampler(9, seed=3, partners=partners)
    keys = list(one)
    assert len(keys) == len(one) == 8  # 9 // 2 view pairs
    for a, b in zip(keys[::2], keys[1::2], strict=True):
        assert b.pair in partners[a.pair]
    firsts = [k.pair for k in keys[::2]]
    assert len(set(firsts)) == 4  # distinct first views (a permutation's head)
    ranks = [
        list(ShuffledSampler(9, seed=3, num_replicas=2, rank=r, partners=partners)) for r in (0, 1)
    ]
    assert [len(r) for r in ranks] == [4, 4]
    assert ranks[0] == keys[0:2] + keys[4:6] and ranks[1] == keys[2:4] + keys[6:8]
    # the plain order is untouched by the option's existence
    assert [k.pair for k in ShuffledSampler(9, seed=3)] == [
        k.pair for k in ShuffledSampler(9, seed=3, partners=None)
    ]


# --- through the entry points ---------------------------------------------------------------
@pytest.mark.slow
def test_compare_runs_each_objective_and_adapter_through_the_entry_points(tmp_path) -> None:
    """`python -m fit3d.compare` on the tiny demo: the two objectives with an equivariance term,
    one with each adapter, each fine-tuned and evaluated by the real entry points (processes)."""
    common = [
        f"run.out={tmp_path}",
        "backbone.name=test_tiny",
        *TINY_DEMO,
        "lift.steps=30",
        "finetune.max_steps=3",
        "finetune.val_views=1",
        "finetune.corr_pairs=1",
        "finetune.lora_blocks=1",
        "finetune.equiv_points=16",
        "finetune.log_every=1",
        "eval.epochs=1",
        "eval.probes=[seg,corr]",
        "eval.seeds=[0]",
        "eval.lrs=[0.01]",
        "eval.pairs_per_scene=2",
    ]
    variants = "fit3d+equivariance/full,equivariance/lora"
    assert compare_main(["--preset", "demo", "--variants", variants, "--name", "t", *common]) == 0
    report = json.loads((tmp_path / "compare" / "t" / "compare.json").read_text())
    assert [r["variant"] for r in report["variants"]] == [
        "fit3d+equivariance / full",
        "equivariance / lora",
    ]
    for row, (objective, adapter) in zip(
        report["variants"], [("fit3d+equivariance", "full"), ("equivariance", "lora")], strict=True
    ):
        ft = tmp_path / "finetune" / f"cmp-t-{objective.replace('+', '_')}-{adapter}"
        meta = json.loads((ft / "meta.json").read_text())
        assert meta["steps"] == 3 and (meta["objective"], meta["adapter"]) == (objective, adapter)
        (log,) = (ft / "logs").glob("version_*/metrics.csv")
        header, *rows = [r.split(",") for r in log.read_text().splitlines()]
        col = header.index("finetune/equiv_step")  # the term was computed and logged
        eq = [float(r[col]) for r in rows if r[col]]
        assert len(eq) == 3 and all(math.isfinite(v) and v > 0 for v in eq)
        weights = load_file(str(ft / "backbone.safetensors"))
        assert not any("lora" in k for k in weights)  # merged: a plain timm state dict
        blocks = sum(v.numel() for k, v in weights.items() if k.startswith("blocks."))
        if adapter == "lora":
            assert 0 < meta["trainable_params"] < blocks / 10
        else:
            assert meta["trainable_params"] > blocks
        # the evaluator scored these weights, and the table shows its verdicts
        assert row["weights_sha256"] == meta["weights_sha256"]
        assert set(row["verdicts"]) >= {"eval/seg/miou", "eval/corr/recall_10px"}
        assert row["trainable_params"] == meta["trainable_params"]
    table = (tmp_path / "compare" / "t" / "compare.md").read_text()
    assert table.count("\n") == 4 and "equivariance / lora" in table
    assert (tmp_path / "compare" / "t" / "compare.png").read_bytes()[:4] == b"\x89PNG"
