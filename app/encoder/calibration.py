"""A fixed, generated image set: NNCF's int8 calibration and `auto`'s fidelity check run on it.

Photos cannot be shipped in the package, and noise is a poor stand-in for them (its statistics are flat).
These are smooth colour fields with overlaid shapes, edges and a little grain, drawn from a seeded generator:
deterministic, so an export made twice is made the same way, and varied enough to exercise every channel.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIDE = 256


def generated_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [_image(rng) for _ in range(count)]


def _image(rng: np.random.Generator) -> Image.Image:
    coarse = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0 = (int(v) for v in rng.integers(0, SIDE, 2))
        x1, y1 = x0 + int(rng.integers(10, SIDE // 2)), y0 + int(rng.integers(10, SIDE // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 8)))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (SIDE, SIDE, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
