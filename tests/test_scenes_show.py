"""fit3d.scenes.show: the scene picture has one row per requested view at the documented size,
and bad input on its command line is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from fit3d.scenes.demo import generate_demo
from fit3d.scenes.show import main

IMAGES = "data/demo_000/dslr/undistorted_images"


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """One generated room, 5 views of 48 x 32."""
    return generate_demo(
        tmp_path / "d", seed=1, n_train=1, n_val=0, n_views=5, width=48, height=32, workers=1
    )


def test_picture_has_a_row_per_view(tiny_root: Path, capsys) -> None:
    """Figure size (4 * 2.6 + 4.5) x (rows * 1.9 + 0.4) inches at 100 dpi; --views sets the rows
    (at most the scene's views) and --out the file, whose path is printed."""
    for views, rows in ((2, 2), (3, 3), (9, 5)):
        out = tiny_root / f"v{views}.png"
        argv = ["demo_000", "--root", str(tiny_root), "--views", str(views), "--out", str(out)]
        assert main(argv) == 0
        assert capsys.readouterr().out.strip() == str(out)
        img = cv2.imread(str(out))
        assert img.shape == (round(100 * (rows * 1.9 + 0.4)), round(100 * (4 * 2.6 + 4.5)), 3)
        assert img.std() > 10  # drawn, not a blank page


def test_bad_input_cli_is_one_line(tiny_root: Path, capsys) -> None:
    (tiny_root / IMAGES / "DSC00001.JPG").unlink()
    assert main(["demo_000", "--root", str(tiny_root), "--out", str(tiny_root / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DSC00001.JPG" in err and "Traceback" not in err
    assert not (tiny_root / "x.png").exists()
