"""Shot thumbnails: small JPEGs made once when a shot is added, kept with the task as two arrays.

The pack is `data` (uint8, every JPEG back to back) and `offsets` (int64, S + 1 boundaries), so a
task of S shots holds two arrays, not S Python objects, and the store saves it like any other array.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

# The page shows evidence at ~110 CSS px; 160 px is sharp at 1.5x density and costs a few kB per shot.
THUMBNAIL_SIDE = 160
JPEG_QUALITY = 80

ByteArray = npt.NDArray[np.uint8]
OffsetArray = npt.NDArray[np.int64]


def make_thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of `image` whose longer side is at most `side` (never enlarged)."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def pack(jpegs: Sequence[bytes]) -> tuple[ByteArray, OffsetArray]:
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(j) for j in jpegs])
    data = np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy()
    return data, offsets


def append(data: ByteArray, offsets: OffsetArray, jpegs: Sequence[bytes]) -> tuple[ByteArray, OffsetArray]:
    more, more_offsets = pack(jpegs)
    return np.concatenate([data, more]), np.concatenate([offsets, offsets[-1] + more_offsets[1:]])


def count(offsets: OffsetArray) -> int:
    return max(0, int(offsets.size) - 1)


def thumbnail(data: ByteArray, offsets: OffsetArray, shot: int) -> bytes | None:
    """Shot `shot`'s JPEG, or None when there is no such shot."""
    if not 0 <= shot < count(offsets):
        return None
    return data[int(offsets[shot]) : int(offsets[shot + 1])].tobytes()
