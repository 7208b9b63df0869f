"""What a backend provides: raw (un-normalised) features from preprocessed pixels or token ids."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
TokenArray = npt.NDArray[np.int64]


class ImageTower(Protocol):
    name: str

    def __call__(self, pixels: FloatArray) -> FloatArray:
        """[n, 3, S, S] normalised pixels -> [n, d] float32 features (not normalised)."""
        ...


class TextTower(Protocol):
    name: str

    def __call__(self, tokens: TokenArray) -> FloatArray:
        """[n, L] token ids -> [n, d] float32 features (not normalised)."""
        ...
