"""open_clip in eager PyTorch (fp32, or bf16 autocast where the CPU has native bf16)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import FloatArray, TokenArray


class TorchImageTower:
    def __init__(self, model: Any, *, bf16: bool = False) -> None:
        self._model = model
        self._bf16 = bf16
        self.name = "torch-bf16" if bf16 else "torch"

    def __call__(self, pixels: FloatArray) -> FloatArray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16):
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
