"""Encoder backends: the seam between the encoder's batching/normalisation and the tensor runtime."""

from .base import ImageTower, TextTower
from .torch_backend import TorchImageTower, TorchTextTower

__all__ = ["ImageTower", "TextTower", "TorchImageTower", "TorchTextTower"]
