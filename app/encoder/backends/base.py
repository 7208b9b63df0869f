"""What a backend provides: raw (un-normalised) features from image crops or token ids."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
TokenArray = npt.NDArray[np.int64]
CropArray = npt.NDArray[np.uint8]  # [n, S, S, 3] RGB: the eval transform's (or a view's) image, not normalised


class ImageTower(Protocol):
    """What the encoder calls: uint8 crops in (a runtime that normalises inside its graph takes them as they
    are; the others normalise on the way in: crops.py)."""

    name: str

    def __call__(self, crops: CropArray) -> FloatArray:
        """[n, S, S, 3] uint8 RGB crops -> [n, d] float32 features (not normalised)."""
        ...


class PixelTower(Protocol):
    """A runtime's image tower over normalised float pixels (torch, ONNX Runtime); crops.py adapts it."""

    name: str

    def __call__(self, pixels: FloatArray) -> FloatArray:
        """[n, 3, S, S] normalised pixels -> [n, d] float32 features (not normalised)."""
        ...


class TextTower(Protocol):
    name: str

    def __call__(self, tokens: TokenArray) -> FloatArray:
        """[n, L] token ids -> [n, d] float32 features (not normalised)."""
        ...
