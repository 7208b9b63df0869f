"""The Ray engine's shared encoder: one un-multiplexed deployment holds the model, replicas call it.

- `EncoderDeployment` (`shotcache-encoder`): loads the model with the service's own factory
  (`create_encoder`) and answers `image_features` / `text_features` with `@serve.batch`, so calls from
  every task replica, hence from requests of different tasks, are encoded together. It is not
  multiplexed: any encoder replica serves any task.
- The task replicas' side is an encoder *backend*: `RemoteImageTower` / `RemoteTextTower` implement the
  towers' protocol (app/encoder/backends/base.py) by calling the deployment through a handle, and
  `RemoteModel` is the model description (identity, preprocessing, logit scale) the core's `Encoder`
  reads. So the core keeps its queue, micro-batching and admission unchanged and knows nothing of Ray:
  `remote_encoders` is the encoder factory a replica passes to `create_app`.

A replica's queue sends a batch of up to SHOTCACHE_MAX_BATCH images per call; the deployment gathers
up to `max_batch_size` such calls, waiting at most `batch_wait_timeout_s` for the batch to fill (while
one batch runs, the next call queues anyway; max_concurrent_batches is 1: one model on its cores).
The features come back L2-normalised; the replica's `Encoder` normalises them again (a no-op but for
float rounding), as it does any backend's output.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from ray import serve

from app.encoder import Encoder, create_encoder
from app.encoder.factory import ModelDefaults
from app.encoder.load import ModelIdentity, PreprocessConfig
from app.settings import Settings

ENCODER = "shotcache-encoder"
FloatArray = npt.NDArray[np.float32]
TokenArray = npt.NDArray[np.int64]
CropArray = npt.NDArray[np.uint8]  # [n, S, S, 3] RGB crops (app/encoder/backends/crops.py)
# Seconds a replica waits for the encoder deployment before the call fails (the request then fails with
# the service's encoder error; Serve retries nothing by itself).
CALL_TIMEOUT_S = 120.0
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _batch(*, max_batch_size: int, batch_wait_timeout_s: float) -> Callable[[_Method], _Method]:
    """`serve.batch`, typed for these methods: Ray's hints describe one-argument batch functions; these
    take two (each batched into a list)."""
    decorator: Any = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
    return cast("Callable[[_Method], _Method]", decorator)


@dataclass(frozen=True)
class EncoderBatching:
    """`@serve.batch` of the encoder deployment (the `encoder` args of app_builder / serve-config.yaml)."""

    max_batch_size: int = 8  # calls, each up to SHOTCACHE_MAX_BATCH images from one replica
    batch_wait_timeout_s: float = 0.005

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> EncoderBatching:
        batching = cls(
            max_batch_size=int(args.get("max_batch_size", cls.max_batch_size)),
            batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", cls.batch_wait_timeout_s)),
        )
        if batching.max_batch_size < 1 or not 0 <= batching.batch_wait_timeout_s <= 1:
            raise ValueError(f"encoder batching out of range: {batching} (max_batch_size >= 1, wait in [0, 1] s)")
        return batching


@dataclass
class BatchCounts:
    """What the deployment has encoded: calls, batches, rows, and who the calls came from."""

    calls: int = 0
    batches: int = 0
    rows: int = 0
    mixed_batches: int = 0  # batches holding calls of more than one task replica
    rows_by_caller: Counter[str] = field(default_factory=Counter)

    def record(self, callers: Sequence[str], sizes: Sequence[int]) -> None:
        self.batches += 1
        self.calls += len(callers)
        self.rows += sum(sizes)
        self.mixed_batches += len(set(callers)) > 1
        for caller, size in zip(callers, sizes, strict=True):
            self.rows_by_caller[caller] += size

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "batches": self.batches,
            "rows": self.rows,
            "mixed_batches": self.mixed_batches,
            "rows_by_caller": dict(self.rows_by_caller),
        }


@dataclass(frozen=True)
class ModelDescription:
    """What a replica needs to know of the encoder deployment's model (no weights)."""

    identity: ModelIdentity
    preprocess: PreprocessConfig
    logit_scale: float
    config_key: str
    backend: str
    fallback: str | None


@serve.deployment(
    name=ENCODER,
    ray_actor_options={"num_cpus": 1},  # the model's towers run on SHOTCACHE_THREADS threads
    max_ongoing_requests=64,  # >= max_batch_size x max_concurrent_batches (Serve checks)
    graceful_shutdown_wait_loop_s=1,
    health_check_period_s=5,
    health_check_timeout_s=30,
)
class EncoderDeployment:
    """The model, once; image and text batches from every task replica, encoded together."""

    def __init__(self, env: Mapping[str, str], batching: EncoderBatching) -> None:
        os.environ.update(env)
        self._encoder, self._fallback = create_encoder(Settings())  # loads and warms up the model
        batched: tuple[Any, ...] = (self.image_features, self.text_features)
        for method in batched:
            method.set_max_batch_size(batching.max_batch_size)
            method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._images = BatchCounts()
        self._texts = BatchCounts()

    def describe(self) -> ModelDescription:
        model = self._encoder.loaded
        return ModelDescription(
            model.identity, model.preprocess, model.logit_scale, model.config_key, self._encoder.backend, self._fallback
        )

    def tokenize(self, texts: list[str]) -> TokenArray:
        return self._encoder.tokenize(texts)

    @_batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def image_features(self, crops: list[CropArray], callers: list[str]) -> list[FloatArray]:
        sizes = [int(c.shape[0]) for c in crops]
        features = await asyncio.to_thread(self._encoder.encode_crops, np.concatenate(crops))
        self._images.record(callers, sizes)
        return _split(features, sizes)

    @_batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def text_features(self, tokens: list[TokenArray], callers: list[str]) -> list[FloatArray]:
        sizes = [int(t.shape[0]) for t in tokens]
        if len({t.shape[1] for t in tokens}) == 1:
            features = await asyncio.to_thread(self._encoder.encode_tokens, np.concatenate(tokens))
            parts = _split(features, sizes)
        else:  # tokenizers of one model agree on the context length; this is only the safe path
            parts = [await asyncio.to_thread(self._encoder.encode_tokens, t) for t in tokens]
        self._texts.record(callers, sizes)
        return parts

    def counts(self) -> dict[str, dict[str, Any]]:
        """This encoder replica's batch counts (tests and operators read them through a handle)."""
        return {"images": self._images.to_dict(), "texts": self._texts.to_dict()}

    def check_health(self) -> None:
        return None


def _split(features: FloatArray, sizes: Sequence[int]) -> list[FloatArray]:
    bounds = [0, *itertools.accumulate(sizes)]
    return [features[start:stop] for start, stop in itertools.pairwise(bounds)]


# ---- the task replicas' side: a backend over a deployment handle ------------------------------
class _Remote:
    def __init__(self, handle: Any, caller: str, backend: str) -> None:
        self._handle = handle
        self._caller = caller
        self.name = f"ray-encoder:{backend}"


class RemoteImageTower(_Remote):
    """uint8 crops to the encoder deployment (a quarter of float pixels' bytes), features back. Called from the
    core's encoder-queue thread."""

    def __call__(self, crops: CropArray) -> FloatArray:
        result: FloatArray = self._handle.image_features.remote(crops, self._caller).result(timeout_s=CALL_TIMEOUT_S)
        return result


class RemoteTextTower(_Remote):
    def __call__(self, tokens: TokenArray) -> FloatArray:
        result: FloatArray = self._handle.text_features.remote(tokens, self._caller).result(timeout_s=CALL_TIMEOUT_S)
        return result


@dataclass(frozen=True)
class RemoteModel:
    """The `ServedModel` of a replica: the deployment's description; tokenizing happens there too."""

    description: ModelDescription
    handle: Any

    @property
    def identity(self) -> ModelIdentity:
        return self.description.identity

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.description.preprocess

    @property
    def logit_scale(self) -> float:
        return self.description.logit_scale

    @property
    def config_key(self) -> str:
        return self.description.config_key

    def tokenize(self, texts: Sequence[str]) -> TokenArray:
        tokens: TokenArray = self.handle.tokenize.remote(list(texts)).result(timeout_s=CALL_TIMEOUT_S)
        return tokens


def remote_encoders(
    handle: Any, description: ModelDescription, caller: str
) -> Callable[[Settings], tuple[Encoder, str | None]]:
    """The encoder factory of a task replica: an `Encoder` whose towers are the encoder deployment.

    `description` is fetched (awaited) by the replica before its app starts: the app's lifespan runs on
    the replica's event loop, where a blocking handle call is not allowed."""

    def encoders(settings: Settings) -> tuple[Encoder, str | None]:
        model = RemoteModel(description, handle)
        encoder = Encoder(
            model,
            RemoteImageTower(handle, caller, description.backend),
            RemoteTextTower(handle, caller, description.backend),
            batch_size=settings.max_batch,
            templates=ModelDefaults.for_key(description.config_key).templates,
        )
        return encoder, description.fallback

    return encoders
