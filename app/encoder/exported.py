"""Serve a model from its exports alone, without importing torch, open_clip, timm or transformers.

A start takes this path when the configured source was loaded and exported before (its source index entry,
model card, tokenizer file and the backend's verified export are all on disk, card.py / backends/cache.py);
otherwise the factory loads the model with torch, which writes them for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.settings import Settings

from .backends.base import ImageTower, TextTower
from .backends.cache import EXPORTED_BACKENDS, OPENVINO_BACKENDS, Export, export_dir, read_valid
from .backends.on_demand import OnDemandTextTower
from .card import ModelCard, read_auto_record, read_card
from .errors import EncoderLoadError
from .load import ModelIdentity, ModelSource, PreprocessConfig, hub_reachable
from .tokenize import TOKENIZER_FILE, FileTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    """A model as its card describes it, with the tokenizer file loaded: what `Encoder` needs, torch-free."""

    card: ModelCard
    folder: Path  # exports/<model key>
    tokenizer: FileTokenizer

    @property
    def identity(self) -> ModelIdentity:
        return self.card.identity

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.card.preprocess

    @property
    def logit_scale(self) -> float:
        return self.card.logit_scale

    @property
    def config_key(self) -> str:
        return self.card.config_key

    def tokenize(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        return self.tokenizer(texts)


def unreachable_reason(real: ModelSource) -> str:
    return f"the Hugging Face hub is unreachable and {real.name}/{real.pretrained} is not cached"


def find_exported_model(settings: Settings) -> tuple[ExportedModel, str | None] | str:
    """The exported model the settings name (and the `auto` fallback reason), or why there is none."""
    data_dir = settings.data_dir
    try:
        resolved = _resolve_source(settings)
    except EncoderLoadError as exc:
        return str(exc)
    if isinstance(resolved, str):
        return resolved
    source, fallback = resolved
    found = read_card(source, data_dir)
    if isinstance(found, str):
        return found
    card, folder = found
    try:
        tokenizer = FileTokenizer(card.tokenizer, folder / TOKENIZER_FILE)
    except Exception as exc:  # tokenizers raises its own exception type on a bad file
        return f"unreadable tokenizer file in {folder}: {exc}"
    return ExportedModel(card, folder, tokenizer), fallback


def find_export(model: ExportedModel, backend: str, data_dir: Path) -> Export | str:
    """The verified export of `backend` for the model, or why there is none."""
    if backend not in EXPORTED_BACKENDS:
        return f"backend {backend!r} has no torch-free form"
    return read_valid(export_dir(model.identity, backend, data_dir), model.identity.weights_sha256)


def open_towers(
    export: Export, threads: int, preprocess: PreprocessConfig, *, text_idle_s: float = 0.0
) -> tuple[ImageTower, TextTower]:
    """The runtime's sessions over a verified export: ONNX Runtime, or OpenVINO (the `openvino` extra); the
    image tower takes uint8 crops normalised by `preprocess` (backends/crops.py). With `text_idle_s` > 0 the
    text session is closed after that long without a call, and opened again by the next (backends/on_demand.py)."""
    image: ImageTower
    text: TextTower
    open_text: Callable[[Export, int], TextTower]
    if export.backend in OPENVINO_BACKENDS:
        from .backends.openvino_backend import open_openvino_text, open_openvino_towers

        image, text = open_openvino_towers(export, threads, preprocess)
        open_text = open_openvino_text
    else:
        from .backends.onnx_backend import open_onnx_text, open_onnx_towers

        image, text = open_onnx_towers(export, threads, preprocess)
        open_text = open_onnx_text
    if text_idle_s <= 0:
        return image, text
    return image, OnDemandTextTower(lambda: open_text(export, threads), text_idle_s, opened=text)


def _resolve_source(settings: Settings) -> tuple[ModelSource, str | None] | str:
    """The source to serve; for `auto`, the real model if exported, else the stand-in when the real model's
    weights are certainly unavailable (the torch path's own test, made without open_clip)."""
    if settings.model != "auto":
        return ModelSource.parse(settings.model, settings.pretrained), None
    data_dir = settings.data_dir
    real = ModelSource.parse(settings.auto_model, settings.pretrained)
    if not isinstance(read_card(real, data_dir), str):
        return real, None
    if real.pretrained and Path(real.pretrained).is_file():
        return f"{real.pretrained} is a weights file not exported yet"
    record = read_auto_record(real, data_dir)
    if record is None:
        return f"no record of an earlier `auto` fallback for {real.name}"
    repo = record.get("hf_repo")
    cache_dir = data_dir / "hub-cache"
    if repo and any(cache_dir.glob(f"models--{str(repo).strip('/').replace('/', '--')}/snapshots/*/*")):
        return f"{real.name}'s weights are in the hub cache now"
    if hub_reachable():
        return "the Hugging Face hub is reachable"
    return ModelSource.parse("offline", None), unreachable_reason(real)
