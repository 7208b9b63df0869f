"""OpenVINO towers (`openvino`: the CPU's default inference precision, bf16 on AMX / AVX-512-bf16 hosts;
`openvino-int8`: NNCF post-training int8 of the image tower) over the cached IR exports (openvino_export.py).

Imports neither torch nor ONNX Runtime; `openvino` itself comes from the `openvino` extra. Compiled for one
stream on `threads` threads with the latency hint: the encoder lock serialises calls, so one stream is all a
call can use, and without pinning, because the cores are shared with decoding and the HTTP loop.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import numpy as np

from .base import FloatArray, TokenArray
from .cache import Export, ExportError, TowerExport

_core: Any = None
_core_lock = threading.Lock()


def core() -> Any:
    """One OpenVINO Core per process (it owns the CPU plugin and its thread pools)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def supports_bf16() -> bool:
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """Compile options: `fp32` pins f32 inference; `bf16` and `int8` take the plugin's default (bf16 where the
    CPU has it, for the layers int8 leaves in floating point)."""
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
        "ENABLE_CPU_PINNING": False,
    }
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


class OpenVinoTower:
    """One compiled tower: numpy in, raw float32 features out. Not thread-safe (the encoder lock serialises)."""

    def __init__(self, tower: TowerExport, backend: str, threads: int) -> None:
        self.name = backend
        self.precision = tower.precision
        self.path = tower.path
        self._compiled = core().compile_model(str(tower.path), "CPU", compile_config(tower.precision, threads))
        self._request = self._compiled.create_infer_request()

    def _run(self, array: Any) -> FloatArray:
        self._request.infer({0: array})
        out: FloatArray = np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return out


_Tower = TypeVar("_Tower", bound=OpenVinoTower)


class OpenVinoImageTower(OpenVinoTower):
    def __call__(self, pixels: FloatArray) -> FloatArray:
        return self._run(np.ascontiguousarray(pixels, dtype=np.float32))


class OpenVinoTextTower(OpenVinoTower):
    def __call__(self, tokens: TokenArray) -> FloatArray:
        return self._run(np.ascontiguousarray(tokens, dtype=np.int64))


def open_openvino_towers(export: Export, threads: int) -> tuple[OpenVinoImageTower, OpenVinoTextTower]:
    return _compiled(OpenVinoImageTower, export, "image", threads), open_openvino_text(export, threads)


def open_openvino_text(export: Export, threads: int) -> OpenVinoTextTower:
    """The text tower alone (on_demand.py opens it again after an idle spell)."""
    return _compiled(OpenVinoTextTower, export, "text", threads)


def _compiled(kind: type[_Tower], export: Export, tower: str, threads: int) -> _Tower:
    try:
        return kind(export.image if tower == "image" else export.text, export.backend, threads)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own messages
        raise ExportError("load", f"OpenVINO could not compile the {tower} tower of {export.folder}: {exc}") from exc
