"""OpenVINO towers (`openvino`: the CPU's default inference precision, bf16 on AMX / AVX-512-bf16 hosts;
`openvino-int8`: NNCF post-training int8 of the image tower) over the cached IR exports (openvino_export.py).

Imports neither torch nor ONNX Runtime; `openvino` itself comes from the `openvino` extra. Compiled for one
stream on `threads` threads with the latency hint: the encoder lock serialises calls, so one stream is all a
call can use, and without pinning, because the cores are shared with decoding and the HTTP loop.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..load import PreprocessConfig
from .base import CropArray, FloatArray, TokenArray
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
        self._compiled = core().compile_model(self._model(), "CPU", compile_config(tower.precision, threads))
        self._request = self._compiled.create_infer_request()

    def _model(self) -> Any:
        """What is compiled: the IR file as it is."""
        return str(self.path)

    def _run(self, array: Any) -> FloatArray:
        self._request.infer({0: array})
        out: FloatArray = np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return out


class OpenVinoImageTower(OpenVinoTower):
    """Takes uint8 crops: the conversion to float, channels-first layout, mean and std are compiled into the
    model (OpenVINO's preprocessing), where the plugin fuses them into the first layer (crops.py)."""

    def __init__(self, tower: TowerExport, backend: str, threads: int, preprocess: PreprocessConfig) -> None:
        self._preprocess = preprocess
        super().__init__(tower, backend, threads)

    def _model(self) -> Any:
        from openvino import Layout, Type
        from openvino.preprocess import PrePostProcessor

        model = core().read_model(str(self.path))
        steps = PrePostProcessor(model)
        steps.input().tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
        steps.input().model().set_layout(Layout("NCHW"))
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): torchvision's ToTensor + Normalize.
        steps.input().preprocess().convert_element_type(Type.f32).mean(
            [255.0 * m for m in self._preprocess.mean]
        ).scale([255.0 * s for s in self._preprocess.std])
        return steps.build()

    def __call__(self, crops: CropArray) -> FloatArray:
        return self._run(np.ascontiguousarray(crops, dtype=np.uint8))


class OpenVinoTextTower(OpenVinoTower):
    def __call__(self, tokens: TokenArray) -> FloatArray:
        return self._run(np.ascontiguousarray(tokens, dtype=np.int64))


def open_openvino_towers(
    export: Export, threads: int, preprocess: PreprocessConfig
) -> tuple[OpenVinoImageTower, OpenVinoTextTower]:
    try:
        image = OpenVinoImageTower(export.image, export.backend, threads, preprocess)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own messages
        raise ExportError("load", f"OpenVINO could not compile the image tower of {export.folder}: {exc}") from exc
    return image, open_openvino_text(export, threads)


def open_openvino_text(export: Export, threads: int) -> OpenVinoTextTower:
    """The text tower alone (on_demand.py opens it again after an idle spell)."""
    try:
        return OpenVinoTextTower(export.text, export.backend, threads)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own messages
        raise ExportError("load", f"OpenVINO could not compile the text tower of {export.folder}: {exc}") from exc
