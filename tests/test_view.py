"""The lifted-scene viewer: what it computes (against brute force), bad input, and the real
server seen through headless Chromium."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from fit3d.view import data
from fit3d.view.__main__ import main
from fit3d.view.browser import browser_missing
from fit3d.view.synthetic import write_synthetic_lift, write_wall_scene


@pytest.fixture(scope="module")
def wall(tmp_path_factory) -> Path:
    """A lifted scene of 3000 Gaussians on a textured wall, with its 4-camera scene dataset."""
    root = tmp_path_factory.mktemp("view")
    write_wall_scene(root / "scenes")
    return write_synthetic_lift(root / "lift" / "wall", 3000, scenes_root=root / "scenes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what is shown -------------------------------------------------------------------------------
def test_decoded_feature_is_the_decoder_on_a_constant_map():
    """A Gaussian seen alone = a constant feature map; its decoded feature is the decoder's
    output there (away from the zero-padded border)."""
    weight = torch.randn(5, 4, 3, 3)
    feats = torch.randn(7, 4)
    conv = torch.stack(
        [
            F.conv2d(f.view(1, 4, 1, 1).expand(1, 4, 6, 6), weight, padding=1)[0, :, 3, 3]
            for f in feats
        ]
    )
    torch.testing.assert_close(data.decode(feats, weight), conv, rtol=1e-5, atol=1e-5)


def test_similarity_equals_cosine_of_decoded_features():
    weight = torch.randn(6, 3, 3, 3)
    feats = torch.randn(200, 3)
    sim = data.FeatureIndex.build(feats, weight).similarity(17)
    dec = F.conv2d(feats[:, :, None, None].expand(-1, -1, 3, 3), weight, padding=1)[:, :, 1, 1]
    torch.testing.assert_close(sim, F.cosine_similarity(dec, dec[17:18], dim=1), atol=1e-5, rtol=0)
    assert sim[17] == pytest.approx(1.0, abs=1e-6)


def test_pca_colours_use_one_basis_for_all_chunks(monkeypatch):
    """Equal features get equal colours even when they land in different chunks."""
    monkeypatch.setattr(data, "CHUNK", 50)
    feats = torch.randn(120, 4)
    feats[110] = feats[3]  # chunk 0 and chunk 2
    rgb = data.pca_colours(feats, torch.randn(8, 4, 3, 3))
    assert rgb.shape == (120, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[110], rgb[3])
    assert rgb.std(0).min() > 10  # three components actually vary


def test_covariances_match_scipy_rotations():
    quats = torch.randn(5, 4)
    quats = quats / quats.norm(dim=1, keepdim=True)
    scales = torch.rand(5, 3) + 0.1
    rot = Rotation.from_quat(quats[:, [1, 2, 3, 0]].numpy()).as_matrix()  # scipy: xyzw
    expect = rot @ np.stack([np.diag(s**2) for s in scales.numpy()]) @ rot.transpose(0, 2, 1)
    np.testing.assert_allclose(data.covariances(quats, scales).numpy(), expect, atol=1e-5)


def test_rgb_colours_invert_the_sh_dc_term():
    rgb = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.4, 0.6]])
    sh = torch.zeros(2, 4, 3)
    sh[:, 0] = (rgb - 0.5) / 0.28209479177387814
    np.testing.assert_array_equal(data.rgb_colours(sh), (rgb.numpy() * 255).round())


def test_display_subset_keeps_the_most_visible():
    opac = torch.tensor([0.9, 0.1, 0.9, 0.9, 0.5])
    scales = torch.tensor([[1, 1, 0.1], [1, 1, 1], [0.1, 0.1, 0.1], [2, 1, 0.1], [1, 1, 1.0]])
    # opacity x two largest scales: 0.9, 0.1, 0.009, 1.8, 0.5 -> keep 0, 3, 4
    assert data.display_subset(opac, scales, 3).tolist() == [0, 3, 4]
    assert data.display_subset(opac, scales, 10).tolist() == [0, 1, 2, 3, 4]


def test_pick_along_ray_takes_the_first_hit():
    means = torch.tensor([[0.0, 0, 5], [0.0, 0, 2], [0.05, 0, 1], [0.0, 0, -1], [3, 0, 1.5]])
    scales = torch.full((5, 3), 0.1)
    opac = torch.tensor([0.9, 0.9, 0.05, 0.9, 0.9])  # index 2 is nearly transparent
    origin, direction = np.zeros(3), np.array([0.0, 0, 2])
    assert data.pick_along_ray(means, scales, opac, origin, direction) == 1  # 3 is behind
    # No Gaussian within its radius of the ray: the closest centre in front wins.
    far = means + torch.tensor([1.0, 0, 0])
    far[4] = torch.tensor([0.5, 0, 9])
    assert data.pick_along_ray(far, scales, opac, origin, direction) == 4


def test_up_direction_and_camera_pose_of_known_cameras():
    # Camera looking along world +y with image-down = world -z: up = +z, centre (1, 2, 3).
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # columns: x, y(down), z(fwd)
    c2w[:3, 3] = [1, 2, 3]
    viewmat = torch.from_numpy(np.linalg.inv(c2w)).float()
    np.testing.assert_allclose(data.up_direction(viewmat[None]), [0, 0, 1], atol=1e-6)
    wxyz, pos = data.camera_pose(viewmat)
    np.testing.assert_allclose(pos, [1, 2, 3], atol=1e-5)
    back = Rotation.from_quat(np.r_[wxyz[1:], wxyz[0]]).as_matrix()
    np.testing.assert_allclose(back, c2w[:3, :3], atol=1e-5)
    K = torch.tensor([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    assert data.vertical_fov(K, 48) == pytest.approx(2 * math.atan(24 / 50))


# --- bad input -----------------------------------------------------------------------------------
def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_exit_2(tmp_path, wall, capsys):
    (tmp_path / "run").mkdir()
    err = _one_line_exit_2([str(tmp_path / "run")], capsys)
    assert "not a lifted scene" in err
    assert "not a folder" in _one_line_exit_2([str(tmp_path / "missing")], capsys)
    broken = tmp_path / "broken"
    write_synthetic_lift(broken, 10)
    (broken / "decoder.safetensors").unlink()
    assert "no decoder.safetensors" in _one_line_exit_2([str(broken)], capsys)
    err = _one_line_exit_2([str(wall), "--finetune", str(tmp_path / "nope")], capsys)
    assert "no fine-tuned backbone" in err


# --- the server ----------------------------------------------------------------------------------
def test_viewer_colours_query_and_selected_view(wall, tmp_path):
    """Without a browser: the colour switch, a centre query and a selected view with the
    original and fine-tuned feature maps."""
    from safetensors.torch import save_file

    from fit3d.backbones import Backbone
    from fit3d.view.server import COLOURINGS, Viewer

    torch.manual_seed(1)
    tuned = Backbone("test_tiny")
    (tmp_path / "ft").mkdir()
    save_file(tuned.model.state_dict(), str(tmp_path / "ft" / "backbone.safetensors"))
    viewer = Viewer(wall, finetune=tmp_path / "ft", port=free_port())
    try:
        assert viewer.shown == viewer.total == 3000 and len(viewer.frustums) == 4
        rgb = viewer.splats.rgbs.copy()
        viewer.colouring.value = COLOURINGS[1]
        assert not np.array_equal(viewer.splats.rgbs, rgb)
        np.testing.assert_array_equal(viewer.splats.rgbs, viewer.colours[COLOURINGS[1]])
        viewer.centre_button.value = True  # what a click on the GUI control does
        viewer._query_centre(None)
        q = viewer.query_index
        init = viewer.server.initial_camera
        axis = (init.look_at - init.position) / np.linalg.norm(init.look_at - init.position)
        rel = viewer.means.numpy() - init.position
        perp = np.linalg.norm(rel - (rel @ axis)[:, None] * axis, axis=1)
        assert perp[q] <= 2 * float(viewer.scales[q].max()) + 1e-6  # on the view axis
        assert viewer.colouring.value == COLOURINGS[2]
        sim = viewer.index.similarity(q)
        np.testing.assert_array_equal(viewer.splats.rgbs, data.similarity_colours(sim))
        viewer.select_view(2)
        assert viewer.view_choice.value == "DSC0002.JPG"
        assert viewer.view_image.visible and viewer.finetuned_map.visible
        assert viewer.original_map.image.shape[1] == 320
        assert not np.array_equal(viewer.original_map.image, viewer.finetuned_map.image)
    finally:
        viewer.stop()


def test_large_scene_is_subsampled_and_says_so(wall):
    from fit3d.view.server import Viewer

    viewer = Viewer(wall, port=free_port(), max_gaussians=1000)
    try:
        assert (viewer.shown, viewer.total, len(viewer.splats.centers)) == (1000, 3000, 1000)
        assert "showing 1,000 of 3,000 Gaussians" in viewer.summary_text.content
    finally:
        viewer.stop()


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_viewer_in_headless_chromium(wall):
    """Serve the scene, open it in headless Chromium, check the picture is not blank and that
    switching to PCA colouring changes it; the server stops at the end."""
    from fit3d.view.browser import (
        canvas_box,
        chromium_page,
        open_viewer,
        scene_pixels,
        wait_for,
        wait_for_picture,
    )
    from fit3d.view.server import COLOURINGS, Viewer

    port = free_port()
    viewer = Viewer(wall, port=port)
    try:
        with chromium_page(640, 480) as (page, requests):
            open_viewer(page, viewer.url)
            rgb = wait_for_picture(page, min_std=15.0)
            assert rgb.std() > 15.0, "the splats were never drawn"
            viewer.colouring.value = COLOURINGS[1]
            changed = [rgb]

            def differs() -> bool:
                changed[0] = scene_pixels(page)
                return np.abs(changed[0].astype(int) - rgb).mean() > 8.0

            assert wait_for(differs, timeout=60), "PCA colouring did not change the picture"
            assert changed[0].std() > 15.0
            # Shift+click a point: that Gaussian becomes the query, on the ray through the pixel.
            box = canvas_box(page)
            u, v = 0.25 * box["width"], 0.5 * box["height"]
            page.keyboard.down("Shift")
            page.mouse.click(box["x"] + u, box["y"] + v)
            page.keyboard.up("Shift")
            assert wait_for(lambda: viewer.query_index is not None, timeout=30)
            assert viewer.colouring.value == COLOURINGS[2]
            cam = next(iter(viewer.server.get_clients().values())).camera
            rot = Rotation.from_quat(np.r_[cam.wxyz[1:], cam.wxyz[0]]).as_matrix()  # OpenCV axes
            t = math.tan(cam.fov / 2)
            ray = rot @ np.array([(2 * u / box["width"] - 1) * t * cam.aspect, 0.0, 1.0])
            ray /= np.linalg.norm(ray)
            rel = viewer.means[viewer.query_index].numpy() - cam.position
            off_ray = np.linalg.norm(rel - (rel @ ray) * ray)
            assert off_ray <= 2 * float(viewer.scales[viewer.query_index].max()) + 0.02
            outside = [r for r in requests if not r.startswith((viewer.url, "blob:", "data:"))]
            assert not outside, f"the viewer fetched {outside[:3]}"
    finally:
        viewer.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
