"""One factory: settings -> a loaded, warmed-up `Encoder`.

`SHOTCACHE_MODEL=auto` tries the configured real model and falls back to the offline stand-in when
its weights cannot be had (no internet, nothing cached); the fallback is announced loudly here and
reported by the service (`/v1/info`, every response's `model`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings

from .backends import ImageTower, TextTower, TorchImageTower, TorchTextTower
from .backends.export import ONNX_BACKENDS, ExportError
from .encoder import Encoder
from .errors import EncoderLoadError
from .load import LoadedModel, ModelSource, hub_reachable, load_model
from .prompts import template_set
from .resources import read_config

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")


@dataclass(frozen=True)
class ModelDefaults:
    templates: list[str]
    default_backend: str
    default_method: str

    @classmethod
    def for_key(cls, key: str) -> ModelDefaults:
        table = read_config("models.json")
        entry = table.get(key, table["*"])
        return cls(template_set(entry["templates"]), entry["default_backend"], entry["default_method"])


def configure_threads(threads: int) -> None:
    """Pin every thread pool to `threads` so torch, FAISS, BLAS and ONNX Runtime don't oversubscribe cores.

    ONNX Runtime gets its count per session (onnx_backend.make_session); torch's inter-op pool is one thread
    (the encoder lock serialises model calls anyway); numpy's BLAS (the cache methods' matmuls) and FAISS's
    OpenMP follow `threads`.
    """
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    # Settable once per process, before any inter-op work; a later call raises and changes nothing.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads)


def resolve_model(settings: Settings) -> tuple[LoadedModel, str | None]:
    """Load the configured model; returns it and, for an `auto` fallback, why the stand-in is used."""
    data_dir = settings.data_dir
    cache_dir = data_dir / "hub-cache"
    if settings.model != "auto":
        return load_model(ModelSource.parse(settings.model, settings.pretrained), data_dir, cache_dir=cache_dir), None
    real = ModelSource.parse(settings.auto_model, settings.pretrained)
    reason: str
    if _cached(real, cache_dir) or hub_reachable():
        try:
            return load_model(real, data_dir, cache_dir=cache_dir), None
        except EncoderLoadError as exc:
            reason = str(exc)
    else:
        reason = f"the Hugging Face hub is unreachable and {real.name}/{real.pretrained} is not cached"
    log.warning(
        "=== SERVING THE OFFLINE STAND-IN MODEL, NOT CLIP === %s. Accuracy is far below real CLIP; set "
        "SHOTCACHE_MODEL to a real model (name + SHOTCACHE_PRETRAINED file, or local-dir:PATH) for production.",
        reason,
    )
    return load_model(ModelSource.parse("offline", None), data_dir), reason


def _cached(source: ModelSource, cache_dir: Path) -> bool:
    return source.pretrained is not None and (Path(source.pretrained).is_file() or _hub_cache_has(source, cache_dir))


def _hub_cache_has(source: ModelSource, cache_dir: Path) -> bool:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(source.name, source.pretrained or "")
    repo = str(cfg.get("hf_hub", "")).strip("/")
    return bool(repo) and any(cache_dir.glob(f"models--{repo.replace('/', '--')}/snapshots/*/*"))


def make_towers(loaded: LoadedModel, backend: str, settings: Settings) -> tuple[ImageTower, TextTower]:
    """The towers of `backend`. An ONNX backend that cannot be exported, verified or loaded falls back to
    torch with a warning naming the failed step; the towers' `name` then says `torch`."""
    if backend == "torch":
        return TorchImageTower(loaded.model), TorchTextTower(loaded.model)
    if backend in ONNX_BACKENDS:
        try:
            from .backends.onnx_backend import load_onnx_towers

            image, text, _ = load_onnx_towers(loaded, backend, settings.data_dir, settings.threads)
            return image, text
        except Exception as exc:  # ExportError, or whatever torch.onnx / onnxruntime raised (or a missing import)
            stage = exc.stage if isinstance(exc, ExportError) else "import"
            log.warning(
                "=== BACKEND %s UNAVAILABLE, FALLING BACK TO TORCH === %s failed for %s: %s",
                backend,
                stage,
                loaded.identity.model_id,
                exc,
            )
            return TorchImageTower(loaded.model), TorchTextTower(loaded.model)
    raise EncoderLoadError("backend", f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")


def create_encoder(settings: Settings) -> tuple[Encoder, str | None]:
    """The encoder the settings ask for, warmed up; and the stand-in fallback reason if any."""
    configure_threads(settings.threads)
    loaded, fallback = resolve_model(settings)
    defaults = ModelDefaults.for_key(loaded.config_key)
    backend = defaults.default_backend if settings.backend == "auto" else settings.backend
    encoder = encoder_for(loaded, backend, settings)
    warm_up(encoder)
    return encoder, fallback


def encoder_for(loaded: LoadedModel, backend: str, settings: Settings) -> Encoder:
    """An encoder of an already loaded model on `backend` (`shotcache bench` compares backends of one
    load through this)."""
    image_tower, text_tower = make_towers(loaded, backend, settings)
    templates = ModelDefaults.for_key(loaded.config_key).templates
    return Encoder(loaded, image_tower, text_tower, batch_size=settings.max_batch, templates=templates)


def warm_up(encoder: Encoder) -> None:
    """One image and one text through the towers, so the first request doesn't pay for lazy init."""
    import numpy as np

    size = encoder.input_size
    encoder.encode_pixels(np.zeros((1, 3, size, size), dtype=np.float32))
    encoder.encode_texts(["warm-up"])
