"""fit3d.viz: the shared PCA-to-RGB against a numpy SVD reference on planted low-rank features,
8-bit conversion by hand, and PNG figures written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from fit3d.viz import pca_rgb, save_figure, to_uint8


def _planted_maps() -> list[torch.Tensor]:
    """Two 8-channel maps [8, H, W] whose pixels are a fixed mixing of 3 latent values with
    well separated spreads (std 5, 2, 0.7) plus a little noise."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]  # [8, 3] orthonormal columns
    maps = []
    for h, w in ((12, 16), (9, 10)):
        latent = torch.randn(h * w, 3, generator=gen) * torch.tensor([5.0, 2.0, 0.7])
        f = latent @ mix.T + 0.01 * torch.randn(h * w, 8, generator=gen) + 3.0  # [HW, 8]
        maps.append(f.T.reshape(8, h, w))
    return maps


def _reference(maps: list[torch.Tensor]) -> np.ndarray:
    """Exact PCA of all pixels (numpy SVD), each component stretched from its 1st to its 99th
    percentile onto [0, 1]: [P, 3] for the pixels of all maps in order."""
    x = np.concatenate([m.double().flatten(1).T.numpy() for m in maps])  # [P, C]
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T  # [P, 3]
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    return np.clip((proj - lo) / (hi - lo), 0, 1)


def test_pca_rgb_matches_an_svd_reference_up_to_sign():
    """With every pixel in the sample, each colour channel is the reference component or, when
    the component's sign came out flipped, 1 minus it."""
    maps = _planted_maps()
    out = pca_rgb(maps)
    assert [tuple(o.shape) for o in out] == [(12, 16, 3), (9, 10, 3)]
    got = torch.cat([o.reshape(-1, 3) for o in out]).double().numpy()  # [P, 3]
    ref = _reference(maps)
    for k in range(3):
        err = min(np.abs(got[:, k] - ref[:, k]).max(), np.abs(got[:, k] - (1 - ref[:, k])).max())
        assert err < 1e-3, (k, err)
    # the stretch clips about 1% of the pixels at each end of each channel
    assert 0.005 < (got[:, 0] == 0).mean() < 0.02 and 0.005 < (got[:, 0] == 1).mean() < 0.02


def test_pca_rgb_shares_one_basis_across_maps_and_is_repeatable():
    """A pixel copied from one map into another gets the same colour in both; the same maps give
    the same colours, and the global RNG is left alone."""
    maps = _planted_maps()
    maps[1][:, 4, 5] = maps[0][:, 2, 3]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = pca_rgb(maps, max_samples=50)  # a subsample fits the basis
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0][2, 3], a[1][4, 5])
    b = pca_rgb(maps, max_samples=50)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(((x >= 0) & (x <= 1)).all() for x in a)


def test_pca_rgb_pads_fewer_than_three_channels_with_zero():
    gen = torch.Generator().manual_seed(1)
    two = [torch.randn(2, 6, 7, generator=gen)]
    out = pca_rgb(two)[0]  # [6, 7, 3]
    assert torch.equal(out[..., 2], torch.zeros(6, 7))
    assert out[..., 0].std() > 0.1 and out[..., 1].std() > 0.1


def test_to_uint8_by_hand():
    img = torch.tensor([[[0.0, 0.5, 1.0], [-0.2, 1.3, 0.998]]], requires_grad=True)  # [1, 2, 3]
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    # 0.5 * 255 = 127.5 rounds to 128; out-of-range values are clipped first
    assert out.tolist() == [[[0, 128, 255], [0, 255, 254]]]
    half = torch.tensor([[[0.25, 0.75, -1.0]]], dtype=torch.float16)  # exact in f16
    assert to_uint8(half).tolist() == [[[64, 191, 0]]]  # 63.75 -> 64, 191.25 -> 191


def _figure() -> Figure:
    fig = Figure(figsize=(2.0, 1.5))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.ones((3, 4, 3)) * np.array([1.0, 0.0, 0.0]))  # all red
    ax.set_axis_off()
    return fig


def test_save_figure_writes_the_png_at_the_requested_dpi(tmp_path: Path):
    path = tmp_path / "sub" / "fig.png"
    save_figure(_figure(), path, dpi=50)
    img = cv2.imread(str(path))  # [H, W, 3] BGR
    assert img.shape == (75, 100, 3)  # 1.5 x 2.0 inches at 50 dpi
    assert (img[30:45, 40:60] == [0, 0, 255]).all()  # the red image fills the figure
    assert sorted(p.name for p in path.parent.iterdir()) == ["fig.png"]


def test_save_figure_failure_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    fig = _figure()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
