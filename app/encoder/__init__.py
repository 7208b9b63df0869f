"""The encoder layer: model loading (open_clip), the offline stand-in, preprocessing, backends."""

from .encoder import Encoder, l2_normalise
from .errors import EncoderLoadError
from .factory import create_encoder
from .load import ModelIdentity, ModelSource
from .prompts import ClassPrompts, check_templates

__all__ = [
    "ClassPrompts",
    "Encoder",
    "EncoderLoadError",
    "ModelIdentity",
    "ModelSource",
    "check_templates",
    "create_encoder",
    "l2_normalise",
]
