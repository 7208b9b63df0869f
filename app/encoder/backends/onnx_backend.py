"""ONNX Runtime towers (`onnx`: fp32, `onnx-int8`: dynamic int8 MatMul/Gemm) over the cached exports.

Threads are explicit: `intra_op_num_threads = threads`, one inter-op thread, sequential execution, and no
spin-waiting: ORT's pool otherwise keeps its threads spinning between calls, which on two cores takes the CPU
away from image decoding and the HTTP loop (measured: up to 2x lower throughput on a busy 2-core machine).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..load import LoadedModel, PreprocessConfig
from ..preprocess import Preprocessor
from .base import FloatArray, TokenArray
from .cache import INPUT_NAMES, Export, ExportError, TowerExport
from .crops import NormalisedInput

log = logging.getLogger(__name__)


def make_session(path: Path, threads: int) -> Any:
    """An ORT CPU session on `threads` intra-op threads (and nothing else running in parallel)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTower:
    """One exported tower: numpy in, raw float32 features out."""

    def __init__(self, tower: TowerExport, input_name: str, threads: int) -> None:
        self.name = "onnx-int8" if tower.precision == "int8" else "onnx"
        self.precision = tower.precision
        self.path = tower.path
        self.threads = threads
        self._input = input_name
        self._session = make_session(tower.path, threads)

    @property
    def session_options(self) -> Any:
        return self._session.get_session_options()

    def _run(self, array: Any) -> FloatArray:
        out = self._session.run(None, {self._input: array})[0]
        result: FloatArray = np.asarray(out, dtype=np.float32)
        return result


class OnnxImageTower(OnnxTower):
    def __call__(self, pixels: FloatArray) -> FloatArray:
        return self._run(np.ascontiguousarray(pixels, dtype=np.float32))


class OnnxTextTower(OnnxTower):
    def __call__(self, tokens: TokenArray) -> FloatArray:
        return self._run(np.ascontiguousarray(tokens, dtype=np.int64))


def load_onnx_towers(
    loaded: LoadedModel, backend: str, data_dir: Path, threads: int
) -> tuple[NormalisedInput, OnnxTextTower, Export]:
    """The towers of `backend`, exported first if the cache has no valid export (see export.py)."""
    from .export import ensure_export

    export = ensure_export(loaded, backend, data_dir, threads=threads)
    image, text = open_onnx_towers(export, threads, loaded.preprocess)
    return image, text, export


def open_onnx_towers(
    export: Export, threads: int, preprocess: PreprocessConfig
) -> tuple[NormalisedInput, OnnxTextTower]:
    """ONNX Runtime sessions over a verified export (no torch needed); the image tower takes crops."""
    try:
        image = OnnxImageTower(export.image, INPUT_NAMES["image"], threads)
    except Exception as exc:  # ORT raises its own exception types for unloadable models
        raise ExportError("load", f"ONNX Runtime could not load the image tower of {export.folder}: {exc}") from exc
    text = open_onnx_text(export, threads)
    for name, tower in (("image", export.image), ("text", export.text)):
        if tower.note:
            log.info("%s %s tower: %s (%s)", export.backend, name, tower.precision, tower.note)
    return NormalisedInput(image, Preprocessor(preprocess)), text


def open_onnx_text(export: Export, threads: int) -> OnnxTextTower:
    """The text tower alone (on_demand.py opens it again after an idle spell)."""
    try:
        return OnnxTextTower(export.text, INPUT_NAMES["text"], threads)
    except Exception as exc:  # ORT raises its own exception types for unloadable models
        raise ExportError("load", f"ONNX Runtime could not load the text tower of {export.folder}: {exc}") from exc
