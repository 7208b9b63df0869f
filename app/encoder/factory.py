"""One factory: settings -> a loaded, warmed-up `Encoder`.

`SHOTCACHE_MODEL=auto` tries the configured real model and falls back to the offline stand-in when
its weights cannot be had (no internet, nothing cached); the fallback is announced loudly here and
reported by the service (`/v1/info`, every response's `model`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings

from .backends import ImageTower, TextTower
from .backends.cache import CHECK_PROMPTS, EXPORTED_BACKENDS, ONNX_BACKENDS, Export, ExportError, model_folder
from .choice import REFERENCE, BackendChoice, Towers, host_key, measure, read_choice, write_choice
from .encoder import Encoder, ServedModel
from .errors import EncoderLoadError
from .exported import ExportedModel, find_export, find_exported_model, open_towers, unreachable_reason
from .load import LoadedModel, ModelSource, hub_reachable, load_model
from .preprocess import Preprocessor
from .prompts import template_set
from .resources import read_config

log = logging.getLogger(__name__)

BACKENDS = ("torch", *EXPORTED_BACKENDS)


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


def configure_threads(threads: int, *, with_torch: bool = True) -> None:
    """Pin every thread pool to `threads` so torch, FAISS, BLAS and ONNX Runtime don't oversubscribe cores.

    ONNX Runtime gets its count per session (onnx_backend.make_session); torch's inter-op pool is one thread
    (the encoder lock serialises model calls anyway); numpy's BLAS (the cache methods' matmuls) and FAISS's
    OpenMP follow `threads`. `with_torch=False` leaves torch alone unless something imported it already.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    if with_torch or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
        # Settable once per process, before any inter-op work; a later call raises and changes nothing.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads)


def resolve_model(settings: Settings) -> tuple[LoadedModel, str | None]:
    """Load the configured model; returns it and, for an `auto` fallback, why the stand-in is used."""
    _, loaded, reason = _resolve(settings)
    return loaded, reason


def _resolve(settings: Settings) -> tuple[ModelSource, LoadedModel, str | None]:
    data_dir = settings.data_dir
    cache_dir = data_dir / "hub-cache"
    if settings.model != "auto":
        source = ModelSource.parse(settings.model, settings.pretrained)
        return source, load_model(source, data_dir, cache_dir=cache_dir), None
    real = ModelSource.parse(settings.auto_model, settings.pretrained)
    reason: str
    if _cached(real, cache_dir) or hub_reachable():
        try:
            return real, load_model(real, data_dir, cache_dir=cache_dir), None
        except EncoderLoadError as exc:
            reason = str(exc)
    else:
        reason = unreachable_reason(real)
    announce_fallback(reason)
    standin = ModelSource.parse("offline", None)
    loaded = load_model(standin, data_dir)
    from .card import write_auto_record

    with contextlib.suppress(OSError):  # only a faster next start depends on it
        write_auto_record(real, data_dir, _hub_repo(real))
    return standin, loaded, reason


def announce_fallback(reason: str) -> None:
    log.warning(
        "=== SERVING THE OFFLINE STAND-IN MODEL, NOT CLIP === %s. Accuracy is far below real CLIP; set "
        "SHOTCACHE_MODEL to a real model (name + SHOTCACHE_PRETRAINED file, or local-dir:PATH) for production.",
        reason,
    )


def _hub_repo(source: ModelSource) -> str | None:
    if source.pretrained is None or Path(source.pretrained).is_file():
        return None
    import open_clip

    repo = str(open_clip.get_pretrained_cfg(source.name, source.pretrained).get("hf_hub", "")).strip("/")
    return repo or None


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
    from .backends.torch_backend import TorchTextTower

    if backend == "torch":
        return torch_image_tower(loaded), TorchTextTower(loaded.model)
    if backend in EXPORTED_BACKENDS:
        try:
            from .backends.export import ensure_export

            return open_towers(
                ensure_export(loaded, backend, settings.data_dir, threads=settings.threads),
                settings.threads,
                loaded.preprocess,
                text_idle_s=settings.text_tower_idle_s,
            )
        except Exception as exc:  # ExportError, or whatever torch.onnx / onnxruntime raised (or a missing import)
            stage = exc.stage if isinstance(exc, ExportError) else "import"
            log.warning(
                "=== BACKEND %s UNAVAILABLE, FALLING BACK TO TORCH === %s failed for %s: %s",
                backend,
                stage,
                loaded.identity.model_id,
                exc,
            )
            return torch_image_tower(loaded), TorchTextTower(loaded.model)
    raise EncoderLoadError("backend", f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")


def torch_image_tower(loaded: LoadedModel) -> ImageTower:
    """Eager torch fp32 behind the crops interface (backends/crops.py)."""
    from .backends.crops import NormalisedInput
    from .backends.torch_backend import TorchImageTower

    return NormalisedInput(TorchImageTower(loaded.model), Preprocessor(loaded.preprocess))


def create_encoder(settings: Settings, *, torch_free: bool = True) -> tuple[Encoder, str | None]:
    """The encoder the settings ask for, warmed up; and the stand-in fallback reason if any.

    With `torch_free` (the default) a model exported before is served from its exports without importing
    torch (exported.py); else, or when anything is missing, it is loaded with torch and exported, and what
    the next start needs to skip torch is written (card.py).
    """
    configure_threads(settings.threads, with_torch=False)
    if torch_free and settings.backend != "torch":
        opened = _open_exported(settings)
        if isinstance(opened, tuple):
            warm_up(opened[0])
            return opened
        log.info("serving with torch: %s", opened)
    configure_threads(settings.threads)
    source, loaded, fallback = _resolve(settings)
    choice: BackendChoice | None = None
    if settings.backend == "auto":
        image_tower, text_tower, choice = _auto_towers(loaded, settings)
    else:
        image_tower, text_tower = make_towers(loaded, settings.backend, settings)
    if image_tower.name != "torch":
        try:
            from .card import write_card

            write_card(loaded, source, settings.data_dir)
        except Exception as exc:  # only a torch-free next start depends on it
            log.warning("could not write the model card of %s: %s", loaded.identity.model_id, exc)
    encoder = _encoder(loaded, image_tower, text_tower, settings)
    encoder.backend_choice = choice.to_dict() if choice is not None else None
    warm_up(encoder)
    return encoder, fallback


def available_backends() -> list[str]:
    """The exported backends this installation can run (OpenVINO's need the `openvino` extra)."""
    import importlib.util

    out = list(ONNX_BACKENDS)
    if importlib.util.find_spec("openvino") is not None:
        out.append("openvino")
        if importlib.util.find_spec("nncf") is not None:
            out.append("openvino-int8")
    return out


def _auto_towers(loaded: LoadedModel, settings: Settings) -> tuple[ImageTower, TextTower, BackendChoice | None]:
    """`auto` on the torch path: the cached choice for this host, else measure every available backend."""
    from .backends.export import ensure_export

    host = host_key(settings.threads)
    folder = model_folder(loaded.identity, settings.data_dir)
    cached = read_choice(folder, host)
    if cached is not None:
        image, text = make_towers(loaded, cached.backend, settings)
        return image, text, cached if image.name == cached.backend else None
    candidates = _candidates(
        loaded,
        settings,
        available_backends(),
        lambda backend: ensure_export(loaded, backend, settings.data_dir, threads=settings.threads),
    )
    if REFERENCE not in candidates:
        default = ModelDefaults.for_key(loaded.config_key).default_backend
        log.warning("auto: no fp32 export to measure against; taking %s's default %s", loaded.config_key, default)
        image, text = make_towers(loaded, default, settings)
        return image, text, None
    return _measured(candidates, loaded, host, folder)


def _measure_exported(model: ExportedModel, settings: Settings) -> tuple[ImageTower, TextTower, BackendChoice] | str:
    """`auto` on a host it has not measured, from the exports alone: every available backend's export timed
    and checked as on the torch path, the choice cached. Only where torch could add nothing, because every
    backend is exported or torch is not installed (the Docker image: without this, a host other than the
    build host, or another CPU limit, failed the start with a missing torch); else why not."""
    import importlib.util

    exports = {backend: find_export(model, backend, settings.data_dir) for backend in available_backends()}
    missing = sorted(backend for backend, export in exports.items() if isinstance(export, str))
    if missing and importlib.util.find_spec("torch") is not None:
        return (
            f"no measured backend choice for {model.identity.model_id} on this host yet, and no export of "
            f"{', '.join(missing)} to measure without torch"
        )
    found = {backend: export for backend, export in exports.items() if not isinstance(export, str)}
    candidates = _candidates(model, settings, list(found), found.__getitem__)
    if REFERENCE not in candidates:
        return f"no fp32 ({REFERENCE}) export of {model.identity.model_id} to measure the others against"
    return _measured(candidates, model, host_key(settings.threads), model.folder)


def _candidates(
    model: ServedModel, settings: Settings, backends: Sequence[str], export_of: Callable[[str], Export]
) -> dict[str, Towers]:
    """The backends `auto` can measure, each opened over its export (`export_of`: made through torch, or
    found on disk); one whose export fails or runs as another backend is not a candidate."""
    candidates: dict[str, Towers] = {}
    for backend in backends:
        try:
            towers = open_towers(
                export_of(backend), settings.threads, model.preprocess, text_idle_s=settings.text_tower_idle_s
            )
        except Exception as exc:  # ExportError, or what the runtime raised: the backend is just not a candidate
            log.info("auto: %s is not a candidate for %s: %s", backend, model.identity.model_id, exc)
            continue
        if towers[0].name != backend:  # e.g. an onnx-int8 export that kept fp32 towers is `onnx` again
            log.info("auto: %s runs as %s for %s: not its own candidate", backend, towers[0].name, model.config_key)
            continue
        candidates[backend] = towers
    return candidates


def _measured(
    candidates: dict[str, Towers], model: ServedModel, host: str, folder: Path
) -> tuple[ImageTower, TextTower, BackendChoice]:
    """The fastest eligible of `candidates` on this host (choice.py), cached in `folder` and logged."""
    choice = measure(candidates, model.preprocess, model.tokenize(CHECK_PROMPTS), host)
    try:
        write_choice(folder, choice)
    except OSError as exc:  # e.g. a read-only baked model folder: measured again at the next start
        log.warning("auto: could not cache the backend choice in %s: %s", folder, exc)
    log.info("auto: measured %s on %s: %s", model.identity.model_id, host, _summary(choice))
    image, text = candidates[choice.backend]
    return image, text, choice


def _summary(choice: BackendChoice) -> str:
    rows = [
        f"{name} {c['img_per_s']} img/s, min cosine {c['min_cosine']}{'' if c['eligible'] else ' (not eligible)'}"
        for name, c in choice.candidates.items()
    ]
    return f"chose {choice.backend} ({'; '.join(rows)})"


def _encoder(model: ServedModel, image: ImageTower, text: TextTower, settings: Settings) -> Encoder:
    defaults = ModelDefaults.for_key(model.config_key)
    return Encoder(
        model,
        image,
        text,
        batch_size=settings.max_batch,
        templates=defaults.templates,
    )


def _open_exported(settings: Settings) -> tuple[Encoder, str | None] | str:
    """The encoder from exports alone (no torch import), or why not."""
    found = find_exported_model(settings)
    if isinstance(found, str):
        return found
    model, fallback = found
    backend: str = settings.backend
    choice = None
    towers: tuple[ImageTower, TextTower] | None = None
    if backend == "auto":
        choice = read_choice(model.folder, host_key(settings.threads))
        if choice is None:
            measured = _measure_exported(model, settings)
            if isinstance(measured, str):
                return measured
            image, text, choice = measured
            towers = image, text
        else:
            log.info("auto: %s (cached for this host)", _summary(choice))
        backend = choice.backend
    if towers is None:
        export = find_export(model, backend, settings.data_dir)
        if isinstance(export, str):
            return f"no usable {backend} export of {model.identity.model_id}: {export}"
        try:
            towers = open_towers(export, settings.threads, model.preprocess, text_idle_s=settings.text_tower_idle_s)
        except ExportError as exc:
            return str(exc)
    image, text = towers
    if fallback is not None:
        announce_fallback(fallback)
    log.info("serving %s from its %s export, without torch", model.identity.model_id, backend)
    encoder = _encoder(model, image, text, settings)
    encoder.backend_choice = choice.to_dict() if choice is not None else None
    return encoder, fallback


def encoder_for(loaded: LoadedModel, backend: str, settings: Settings) -> Encoder:
    """An encoder of an already loaded model on `backend` (`shotcache bench` compares backends of one
    load through this)."""
    image_tower, text_tower = make_towers(loaded, backend, settings)
    return _encoder(loaded, image_tower, text_tower, settings)


def warm_up(encoder: Encoder) -> None:
    """One image and one text through the towers, so the first request doesn't pay for lazy init; then an
    on-demand text tower is closed (the first build opens it again: backends/on_demand.py)."""
    import numpy as np

    size = encoder.input_size
    encoder.encode_crops(np.zeros((1, size, size, 3), dtype=np.uint8))
    encoder.encode_texts(["warm-up"])
    encoder.close_text_tower()
