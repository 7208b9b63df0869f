"""Training-free few-shot classification over a key/value cache: pure numpy + faiss, no torch, no I/O.

    from cache_models import METHODS, get_method
    m = get_method("tip-adapter")(alpha=1.0, beta=5.5)
    m.tune(keys, labels, text)      # leave-one-out on the shots, then fit
    logits = m.predict(queries)     # float32 [Q, N]

Formulas: docs/methods.md of the project (shared/docs/methods.md).
"""

from .ape import APE
from .base import CacheMethod
from .gda import GDA
from .proker import ProKeR
from .registry import METHODS, REGISTRY, get_method
from .tip_adapter import TipAdapter
from .tip_x import TipX
from .tuning import TuneReport, fit_temperature
from .zero_shot import ZeroShot

__all__ = [
    "APE",
    "GDA",
    "METHODS",
    "REGISTRY",
    "CacheMethod",
    "ProKeR",
    "TipAdapter",
    "TipX",
    "TuneReport",
    "ZeroShot",
    "fit_temperature",
    "get_method",
]
