"""Shot thumbnails: small JPEGs, packed into two arrays, read back one by one."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.thumbnails import THUMBNAIL_SIDE, append, count, make_thumbnail, pack, thumbnail


def _decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    image.load()
    return image


def test_thumbnails_are_small_jpegs_never_enlarged() -> None:
    wide = Image.new("RGB", (1000, 400), (200, 30, 30))
    assert _decoded(make_thumbnail(wide)).size == (THUMBNAIL_SIDE, 64)
    tiny = Image.new("L", (32, 20), 128)
    small = _decoded(make_thumbnail(tiny))
    assert small.size == (32, 20)
    assert small.mode == "RGB"


def test_pack_append_and_read_back() -> None:
    jpegs = [make_thumbnail(Image.new("RGB", (40 + i, 30), (i * 40, 0, 0))) for i in range(3)]
    data, offsets = pack(jpegs[:2])
    assert data.dtype == np.uint8
    assert count(offsets) == 2
    data, offsets = append(data, offsets, jpegs[2:])
    assert count(offsets) == 3
    assert [thumbnail(data, offsets, i) for i in range(3)] == jpegs
    assert thumbnail(data, offsets, 3) is None
    assert thumbnail(data, offsets, -1) is None
    empty_data, empty_offsets = pack([])
    assert count(empty_offsets) == 0
    assert thumbnail(empty_data, empty_offsets, 0) is None
