"""Image towers take uint8 crops ([n, S, S, 3] RGB, the eval transform's or a view's image before
normalisation): every image the service encodes starts as one, so the runtime decides where the float
conversion and the mean / std happen.

OpenVINO compiles them into the model (its preprocessing API: u8 NHWC in, f32 NCHW with mean and scale,
fused into the first layer; openvino_backend.py). Torch and ONNX Runtime take normalised float pixels:
`NormalisedInput` normalises the crops into a float buffer it reuses (the preprocessor's arithmetic, the same
bits as before) and calls them. Measured in-process (docs/benchmarks.md, request path): the stand-in on
OpenVINO fp32 took 3.87 ms per call at batch 1 from crops against 4.26 ms for numpy's normalisation plus the
f32 call; ViT-B-32 on openvino-int8 43.8 against 47.8 ms at batch 8; features identical (min cosine 1.000000).
"""

from __future__ import annotations

import numpy as np

from ..preprocess import Pixels, Preprocessor
from .base import CropArray, FloatArray, PixelTower


class NormalisedInput:
    """A float-pixel tower behind the crops interface. Not thread-safe (its buffer; the encoder lock
    serialises calls, as for the runtimes themselves)."""

    def __init__(self, tower: PixelTower, preprocessor: Preprocessor) -> None:
        self.tower = tower
        self.name = tower.name
        self.precision = str(getattr(tower, "precision", "fp32"))  # what `auto` holds it to (choice.py)
        self._preprocessor = preprocessor
        self._buffer: Pixels | None = None

    def __call__(self, crops: CropArray) -> FloatArray:
        n = int(crops.shape[0])
        size = self._preprocessor.size
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = np.empty((n, 3, size, size), dtype=np.float32)
        return self.tower(self._preprocessor.normalise(crops, out=self._buffer[:n]))
