"""The one place that maps public method names to classes."""

from __future__ import annotations

from .ape import APE
from .base import CacheMethod
from .gda import GDA
from .proker import ProKeR
from .tip_adapter import TipAdapter
from .tip_x import TipX
from .zero_shot import ZeroShot

_CLASSES: tuple[type[CacheMethod], ...] = (ZeroShot, TipAdapter, TipX, APE, GDA, ProKeR)
REGISTRY: dict[str, type[CacheMethod]] = {cls.name: cls for cls in _CLASSES}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> type[CacheMethod]:
    """The class registered under `name`; unknown names raise ValueError listing the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None
