"""Headless Chromium for pictures of the viewer and checks of results.html (tests, README).

Driven through Playwright's Python API with the system's Chromium (Debian package `chromium`;
Playwright's own browser download is never used), a fresh profile per launch and no background
networking, so nothing here reaches the internet. WebGL runs on SwiftShader (CPU).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fit3d.errors import UserError

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
HIDE_NOTIFICATIONS = "[class*='Notification'] { display: none !important; }"
"""viser warns about software WebGL in a toast that would cover part of the canvas."""
INSTALL_HINT = "install Chromium (apt-get install chromium) and Playwright (pip install playwright)"


def find_chromium() -> str | None:
    """Path of a Chromium executable: $FIT3D_CHROMIUM, else `chromium` / `chromium-browser` on
    PATH; None if there is none."""
    env = os.environ.get("FIT3D_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_missing() -> str:
    """Why no headless browser can run here ('' when one can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"Playwright is not installed: {INSTALL_HINT}"
    if find_chromium() is None:
        return f"no Chromium executable found: {INSTALL_HINT}"
    return ""


@contextlib.contextmanager
def chromium_page(
    width: int = 1280, height: int = 800, offline: bool = False
) -> Iterator[tuple[object, list[str]]]:
    """(page, requested URLs) in a fresh headless Chromium; `offline` cuts all networking."""
    why = browser_missing()
    if why:
        raise UserError(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=find_chromium(), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            context = browser.new_context(
                viewport={"width": width, "height": height}, offline=offline
            )
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            yield page, requests
        finally:
            browser.close()


def canvas_box(page) -> dict[str, float]:
    """Bounding box {x, y, width, height} of the largest canvas on the page (the 3D view)."""
    return page.evaluate(
        """() => {
            let best = null, area = 0;
            for (const c of document.querySelectorAll('canvas')) {
                const r = c.getBoundingClientRect();
                if (r.width * r.height > area) {
                    area = r.width * r.height;
                    best = {x: r.x, y: r.y, width: r.width, height: r.height};
                }
            }
            return best;
        }"""
    )


def scene_pixels(page) -> np.ndarray:
    """uint8 [H, W, 3] screenshot of the 3D view left of the control panel."""
    import cv2

    box = canvas_box(page)
    panel = page.evaluate(
        """() => {
            let left = Infinity;
            for (const e of document.querySelectorAll('input, button')) {
                const r = e.getBoundingClientRect();
                if (r.width > 0 && r.x > window.innerWidth / 2) left = Math.min(left, r.x);
            }
            return left;
        }"""
    )
    right = min(box["x"] + box["width"], panel - 24) if panel and panel > 0 else None
    width = (right - box["x"]) if right else box["width"]
    clip = {"x": box["x"], "y": box["y"], "width": max(width, 16), "height": box["height"]}
    png = page.screenshot(clip=clip)
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return bgr[..., ::-1].copy()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(interval)


def open_viewer(page, url: str, timeout: float = 90.0) -> None:
    """Load the viewer at `url`, wait for its canvas and hide toasts that would cover it."""
    page.goto(url)
    page.wait_for_selector("canvas", timeout=timeout * 1000)
    page.add_style_tag(content=HIDE_NOTIFICATIONS)


def wait_for_picture(page, min_std: float, timeout: float = 90.0) -> np.ndarray:
    """Poll the 3D view until its pixel standard deviation exceeds `min_std` (the splats have
    been drawn); return the last picture either way."""
    shot = [scene_pixels(page)]

    def drawn() -> bool:
        shot[0] = scene_pixels(page)
        return float(shot[0].std()) > min_std

    wait_for(drawn, timeout)
    return shot[0]


def save_viewer_picture(
    viewer, path: str | Path, width: int = 1280, height: int = 800, out_width: int = 960
) -> Path:
    """The README picture: open `viewer` in headless Chromium, select its first training view,
    wait until the splats are drawn and save the page as a PNG `out_width` pixels wide with a
    256-colour palette (about 200 kB)."""
    from PIL import Image

    from fit3d.io import atomic_path

    path = Path(path)
    with chromium_page(width, height) as (page, _):
        open_viewer(page, viewer.url)
        wait_for_picture(page, min_std=12.0)
        if viewer.cameras is not None:
            viewer.select_view(0)
            page.wait_for_selector("img", timeout=60000)
            time.sleep(2.0)
        png = page.screenshot(type="png")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > out_width:
        size = (out_width, round(image.height * out_width / image.width))
        image = image.resize(size, Image.Resampling.LANCZOS)
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return path
