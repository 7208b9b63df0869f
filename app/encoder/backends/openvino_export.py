"""OpenVINO IR exports, made from the verified fp32 ONNX export (export.py) and checked against torch.

`openvino`: the ONNX graph converted to IR and saved in fp32; it runs at the CPU's default inference
precision (bf16 on AMX hosts) and is checked at that precision. A tower whose bf16 run is too far from torch
(`LOW_PRECISION_MIN_COSINE`) is marked fp32 and compiled so. `openvino-int8`: the image tower quantized by NNCF
post-training quantization, calibrated on the generated image set (calibration.py); the text tower is the
`openvino` one (text encoding is a small share of the work, and MiniLM's int8 misses the bound under ORT).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..calibration import generated_images
from ..load import LoadedModel
from ..preprocess import Preprocessor
from .cache import Export, ExportError, Tower, TowerExport
from .openvino_backend import compile_config, core, supports_bf16

log = logging.getLogger(__name__)

LOW_PRECISION_MIN_COSINE = 0.99  # the export check of bf16 and int8 towers (noise inputs, as INT8_MIN_COSINE)
CALIBRATION_IMAGES = 96
CALIBRATION_SEED = 20261201
CHECK_SEED = 7  # other images than the calibration ones


def build_openvino(
    loaded: LoadedModel, backend: str, fp32: Export, folder: Path, threads: int
) -> dict[str, TowerExport]:
    towers = {"text": _convert(loaded, "text", fp32.text.path, folder, threads)}
    if backend == "openvino":
        towers["image"] = _convert(loaded, "image", fp32.image.path, folder, threads)
    else:
        towers["image"] = _quantize_image(loaded, fp32.image.path, folder, threads)
    return towers


def _convert(loaded: LoadedModel, tower: Tower, onnx_path: Path, folder: Path, threads: int) -> TowerExport:
    import openvino

    xml = folder / f"{tower}.xml"
    try:
        openvino.save_model(openvino.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"convert {tower} tower to OpenVINO", f"{type(exc).__name__}: {exc}") from exc
    precision = "bf16" if supports_bf16() else "fp32"
    check = _verify(loaded, tower, xml, precision, threads)
    note = None
    if precision == "bf16" and check["min_cosine"] < LOW_PRECISION_MIN_COSINE:
        note = f"bf16 rejected: min cosine {check['min_cosine']:.5f}"
        precision, check = "fp32", _verify(loaded, tower, xml, "fp32", threads)
    _require(tower, check, "fp32" if precision == "fp32" else precision)
    return TowerExport(xml, precision, check, note, (xml.with_suffix(".bin").name,))


def _quantize_image(loaded: LoadedModel, onnx_path: Path, folder: Path, threads: int) -> TowerExport:
    import nncf
    import openvino

    xml = folder / "image.xml"
    try:
        model = openvino.convert_model(str(onnx_path))
        pixels = Preprocessor(loaded.preprocess).eval_pixels(generated_images(CALIBRATION_IMAGES, CALIBRATION_SEED))
        dataset = nncf.Dataset([pixels[i : i + 1] for i in range(pixels.shape[0])])
        transformer = any(op.get_type_name() == "Softmax" for op in model.get_ops())
        quantized = nncf.quantize(
            model,
            dataset,
            subset_size=CALIBRATION_IMAGES,
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        )
        openvino.save_model(quantized, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError("quantize image tower with NNCF", f"{type(exc).__name__}: {exc}") from exc
    check = _verify(loaded, "image", xml, "int8", threads)
    _require("image", check, "int8")
    return TowerExport(xml, "int8", check, "NNCF post-training int8", (xml.with_suffix(".bin").name,))


def _require(tower: Tower, check: dict[str, float], precision: str) -> None:
    from .export import FP32_MIN_COSINE, describe

    bound = FP32_MIN_COSINE if precision == "fp32" else LOW_PRECISION_MIN_COSINE
    if check["min_cosine"] < bound:
        raise ExportError(
            f"verify {precision} OpenVINO {tower} tower", f"too far from torch ({describe(check)}; bound {bound})"
        )


def _verify(loaded: LoadedModel, tower: Tower, xml: Path, precision: str, threads: int) -> dict[str, float]:
    """Against torch on six inputs: the fixed prompts, or generated images (not noise: int8 ranges are calibrated
    on images, and noise drives activations outside them, which no real input does)."""
    from .export import check_inputs, compare, torch_features

    if tower == "image":
        inputs = Preprocessor(loaded.preprocess).eval_pixels(generated_images(6, CHECK_SEED))
    else:
        inputs = check_inputs(loaded, tower)
    compiled = core().compile_model(str(xml), "CPU", compile_config(precision, threads))
    request = compiled.create_infer_request()
    got = []
    for start in range(0, inputs.shape[0], 3):
        request.infer({0: inputs[start : start + 3]})
        got.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
    result: dict[str, float] = compare(np.concatenate(got), torch_features(loaded, tower, inputs))
    return result
