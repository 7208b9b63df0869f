"""open_clip in eager PyTorch, fp32."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import FloatArray, TokenArray


class TorchImageTower:
    def __init__(self, model: Any) -> None:
        self._model = model
        self.name = "torch"

    def __call__(self, pixels: FloatArray) -> FloatArray:
        with torch.inference_mode():
            features = self._model.encode_image(torch.from_numpy(pixels))
        out: FloatArray = features.float().numpy().astype(np.float32, copy=False)
        return out


class TorchTextTower:
    def __init__(self, model: Any) -> None:
        self._model = model
        self.name = "torch"

    def __call__(self, tokens: TokenArray) -> FloatArray:
        with torch.inference_mode():
            features = self._model.encode_text(torch.from_numpy(tokens))
        out: FloatArray = features.float().numpy().astype(np.float32, copy=False)
        return out
