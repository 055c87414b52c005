"""Materials of the demo rooms: texture tiles cut from scikit-image's real photographs.

A material is an index into a room's list of `TEX` x `TEX` RGB tiles (float32 in [0, 1], rows
stored bottom-up so that texel row 0 is texture v = 0) with the size in metres one tile covers
along (u, v); surfaces repeat it (see `raycast.texture`). Every material draws its source image,
crop, tint, contrast and scale from the room's random generator, so no two rooms look alike, and
is prefiltered (blurred) to about half a pixel's footprint: a fixed mip level.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import skimage.data

TEX = 256
"""Texture tile size (texels)."""

PALETTES: dict[str, list[tuple[float, float, float]]] = {
    "wall": [
        (0.85, 0.83, 0.78),
        (0.75, 0.8, 0.85),
        (0.8, 0.85, 0.75),
        (0.88, 0.8, 0.72),
        (0.7, 0.7, 0.72),
    ],
    "wood": [(0.55, 0.36, 0.2), (0.7, 0.52, 0.32), (0.4, 0.26, 0.15), (0.8, 0.65, 0.45)],
    "fabric": [
        (0.3, 0.35, 0.55),
        (0.55, 0.25, 0.22),
        (0.35, 0.5, 0.35),
        (0.5, 0.5, 0.52),
        (0.75, 0.65, 0.45),
        (0.25, 0.25, 0.28),
    ],
    "paint": [
        (0.9, 0.9, 0.88),
        (0.3, 0.3, 0.32),
        (0.6, 0.2, 0.2),
        (0.2, 0.35, 0.5),
        (0.85, 0.75, 0.3),
    ],
    "metal": [(0.2, 0.2, 0.22), (0.7, 0.7, 0.72), (0.6, 0.5, 0.3)],
    "card": [(0.62, 0.48, 0.3), (0.7, 0.58, 0.4)],
    "green": [(0.2, 0.45, 0.18), (0.3, 0.55, 0.2), (0.15, 0.35, 0.2)],
}
"""Base colours (linear RGB) per kind of surface; a material picks one at random."""


@functools.cache
def _sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-image's bundled images: (grey textures, colour photos), float32 in [0, 1]."""
    grey = [
        skimage.data.brick(),
        skimage.data.grass(),
        skimage.data.gravel(),
        skimage.data.moon(),
        skimage.data.camera(),
        skimage.data.coins(),
        skimage.data.page(),
        skimage.data.text(),
        skimage.data.clock(),
        skimage.data.cell(),
    ]
    colour = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.hubble_deep_field(),
        skimage.data.immunohistochemistry(),
        skimage.data.retina(),
        skimage.data.cat(),
        skimage.data.colorwheel(),
        skimage.data.logo()[..., :3],
    ]
    return [g.astype(np.float32) / 255 for g in grey], [c.astype(np.float32) / 255 for c in colour]


class Materials:
    """Builds a room's randomised texture tiles; `textures[m]` and `scales[m]` describe
    material m. `footprint` is the width in metres of a pixel at a typical distance."""

    def __init__(self, rng: np.random.Generator, footprint: float):
        self.rng, self.footprint = rng, footprint
        self.grey, self.colour = _sources()
        self.textures: list[np.ndarray] = []  # each [TEX, TEX, 3] float32
        self.scales: list[tuple[float, float]] = []  # metres per tile along (u, v)

    def _crop(self, img: np.ndarray, aspect: float = 1.0) -> np.ndarray:
        h, w = img.shape[:2]
        ch = int(self.rng.integers(min(h, 64), min(h, 320) + 1))
        cw = min(w, max(8, int(ch * aspect)))
        y, x = self.rng.integers(0, h - ch + 1), self.rng.integers(0, w - cw + 1)
        return cv2.resize(img[y : y + ch, x : x + cw], (TEX, TEX), interpolation=cv2.INTER_AREA)

    def _add(self, tex: np.ndarray, scale: tuple[float, float]) -> int:
        # prefilter (a fixed mip level): blur to about half the pixel footprint, in texels
        sx, sy = (min(4.0, max(0.7, 0.5 * self.footprint * TEX / s)) for s in scale)
        tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=sx, sigmaY=sy)
        self.textures.append(np.ascontiguousarray(np.clip(tex, 0, 1)[::-1], np.float32))
        self.scales.append(scale)
        return len(self.textures) - 1

    def tinted(
        self, base: tuple[float, float, float], contrast: float, scale: float, grain: bool = False
    ) -> int:
        """A grey texture as detail on a base colour (`grain`: stretched into wood streaks)."""
        src = self.grey[int(self.rng.integers(len(self.grey)))]
        g = self._crop(src, aspect=8.0 if grain else 1.0)
        g = (g - g.mean()) / (g.std() + 1e-6)
        jitter = self.rng.uniform(0.85, 1.15, 3)
        col = np.clip(np.asarray(base) * jitter, 0.03, 1.0)
        tex = col[None, None, :] * (1.0 + contrast * g[..., None])
        s = scale * self.rng.uniform(0.7, 1.4)
        return self._add(tex, (s, s))

    def photo(self, scale: tuple[float, float], whole: bool = False) -> int:
        """A colour photograph (whole image for pictures, random crop otherwise)."""
        src = self.colour[int(self.rng.integers(len(self.colour)))]
        if whole:
            tex = cv2.resize(src, (TEX, TEX), interpolation=cv2.INTER_AREA)
        else:
            tex = self._crop(src)
        tex = tex * self.rng.uniform(0.8, 1.1, 3)[None, None, :]
        return self._add(tex, scale)

    def palette(self, kind: str) -> tuple[float, float, float]:
        """A random base colour from `PALETTES[kind]`."""
        options = PALETTES[kind]
        return options[int(self.rng.integers(len(options)))]

    def painted(self, kind: str, contrast: float, scale: float) -> int:
        """`tinted` on a random colour of palette `kind` (the colour is drawn first)."""
        return self.tinted(self.palette(kind), contrast, scale)

    def wood(self) -> int:
        return self.tinted(self.palette("wood"), 0.25, 1.2, grain=True)

    def fabric(self) -> int:
        return self.tinted(self.palette("fabric"), 0.2, 0.8)
