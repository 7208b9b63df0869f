"""The encoder: preprocessing, batching and normalisation around a backend's image and text towers.

Thread-safe: backend calls are serialised by a lock, because one model on two cores gains nothing from
concurrent calls and torch/ORT thread pools would oversubscribe the machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from .backends.base import ImageTower, TextTower
from .backends.on_demand import OnDemandTextTower
from .load import ModelIdentity, PreprocessConfig
from .preprocess import Crops, Preprocessor, check_crops
from .prompts import ClassPrompts, class_prompt_texts

FloatArray = npt.NDArray[np.float32]


def l2_normalise(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: FloatArray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


class ServedModel(Protocol):
    """What the encoder needs of a model: a torch `LoadedModel`, or an `ExportedModel` read without torch."""

    @property
    def identity(self) -> ModelIdentity: ...
    @property
    def preprocess(self) -> PreprocessConfig: ...
    @property
    def logit_scale(self) -> float: ...
    @property
    def config_key(self) -> str: ...

    def tokenize(self, texts: Sequence[str]) -> npt.NDArray[np.int64]: ...


class Encoder:
    def __init__(
        self,
        loaded: ServedModel,
        image_tower: ImageTower,
        text_tower: TextTower,
        *,
        batch_size: int,
        templates: Sequence[str],
    ) -> None:
        self._loaded = loaded
        self._image_tower = image_tower
        self._text_tower = text_tower
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self.preprocessor = Preprocessor(loaded.preprocess)
        self.default_templates = list(templates)
        # How `auto` chose the backend (choice.py): the evidence for /v1/info and the logs; None if configured.
        self.backend_choice: dict[str, Any] | None = None

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        return self._loaded.identity

    @property
    def backend(self) -> str:
        return self._image_tower.name

    @property
    def dim(self) -> int:
        return self._loaded.identity.dim

    @property
    def logit_scale(self) -> float:
        return self._loaded.logit_scale

    @property
    def input_size(self) -> int:
        return self.preprocessor.size

    @property
    def loaded(self) -> ServedModel:
        return self._loaded

    @property
    def config_key(self) -> str:
        return self._loaded.config_key

    # ---- images ---------------------------------------------------------------------------------
    def encode_crops(self, crops: Crops) -> FloatArray:
        """L2-normalised features [n, d] of uint8 crops ([n, S, S, 3], the preprocessor's eval or view crops),
        in batches of `batch_size`; the tower normalises them (backends/crops.py)."""
        check_crops(crops, self.input_size)
        out = np.empty((crops.shape[0], self.dim), dtype=np.float32)
        for start in range(0, crops.shape[0], self._batch_size):
            stop = min(start + self._batch_size, crops.shape[0])
            with self._lock:
                out[start:stop] = self._image_tower(np.ascontiguousarray(crops[start:stop]))
        return l2_normalise(out)

    def encode_images(self, images: Sequence[Image.Image]) -> FloatArray:
        """Eval-transform features [n, d]; preprocessing happens batch by batch to bound memory."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self._batch_size):
            chunk = images[start : start + self._batch_size]
            out[start : start + len(chunk)] = self.encode_crops(self.preprocessor.eval_crops(chunk))
        return out

    # ---- text ---------------------------------------------------------------------------------
    @property
    def text_tower_state(self) -> dict[str, Any]:
        """Whether the text tower's session is open, and after how long idle it closes (None: never)."""
        tower = self._text_tower
        if isinstance(tower, OnDemandTextTower):
            return {"open": tower.is_open, "idle_close_s": tower.idle_s, "opens": tower.opens}
        return {"open": True, "idle_close_s": None, "opens": 1}

    def close_text_tower(self) -> bool:
        """Close an on-demand text tower's session now (the next text call opens it again); whether it closed."""
        tower = self._text_tower
        return isinstance(tower, OnDemandTextTower) and tower.close()

    def tokenize(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        return self._loaded.tokenize(texts)

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """L2-normalised text features [n, d]."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self._batch_size):
            chunk = texts[start : start + self._batch_size]
            out[start : start + len(chunk)] = self.encode_tokens(self.tokenize(chunk))
        return l2_normalise(out)

    def encode_tokens(self, tokens: npt.NDArray[np.int64]) -> FloatArray:
        """L2-normalised text features [n, d] of token ids (a remote encoder's text tower sends these)."""
        out = np.empty((tokens.shape[0], self.dim), dtype=np.float32)
        for start in range(0, tokens.shape[0], self._batch_size):
            with self._lock:
                out[start : start + self._batch_size] = self._text_tower(tokens[start : start + self._batch_size])
        return l2_normalise(out)

    def prompt_embeddings(
        self,
        classes: Sequence[ClassPrompts],
        templates: Sequence[str] | None = None,
        *,
        encode_texts: Callable[[Sequence[str]], FloatArray] | None = None,
    ) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Every class's prompts, encoded: ([P, d] normalised, offsets [N + 1]; class c's prompts are rows
        offsets[c]:offsets[c + 1]). `encode_texts` replaces `self.encode_texts` (the service passes its
        encoder queue's text lane)."""
        chosen = self.default_templates if templates is None else list(templates)
        prompt_lists = [class_prompt_texts(cls, chosen) for cls in classes]
        offsets = np.cumsum([0] + [len(prompts) for prompts in prompt_lists]).astype(np.int64)
        embeddings = (encode_texts or self.encode_texts)([p for prompts in prompt_lists for p in prompts])
        return embeddings, offsets

    def class_text_weights(
        self,
        classes: Sequence[ClassPrompts],
        templates: Sequence[str] | None = None,
        *,
        encode_texts: Callable[[Sequence[str]], FloatArray] | None = None,
    ) -> FloatArray:
        """[N, d]: per class, the mean of its normalised prompt embeddings, re-normalised."""
        return prompt_means(*self.prompt_embeddings(classes, templates, encode_texts=encode_texts))


def prompt_means(embeddings: FloatArray, offsets: npt.NDArray[np.int64]) -> FloatArray:
    """[N, d]: per class, the mean of its prompts' rows offsets[c]:offsets[c + 1], re-normalised (CLIP's
    prompt ensembling)."""
    out = np.empty((offsets.size - 1, embeddings.shape[1]), dtype=np.float32)
    for i in range(offsets.size - 1):
        out[i] = embeddings[offsets[i] : offsets[i + 1]].mean(axis=0)
    return l2_normalise(out)
