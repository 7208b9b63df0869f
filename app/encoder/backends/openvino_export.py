"""OpenVINO IR exports, converted from the torch model (or, if that fails, from the verified fp32 ONNX export of
export.py) and checked against torch.

Why from torch: OpenVINO's PyTorch frontend keeps each attention block as one `ScaledDotProductAttention` with
its projections as plain MatMuls, while the ONNX graph carries the exporter's reshapes and transposes around
them (ViT-B-32's image tower: 25 Transposes left after compilation instead of 85). Measured in one quiet
window (2 vCPU Xeon with AMX, batch 32): 130 img/s against 102 from the ONNX-derived IR, the same bf16 weights.

`openvino`: the IR saved in fp32; it runs at the CPU's default inference precision (bf16 on AMX hosts) and is
checked at that precision. A tower whose bf16 run misses `auto`'s bf16 bound (choice.FIDELITY_MIN_COSINE, on the
check's generated images) is marked fp32 and compiled so, and the other tower with it (`_one_precision`):
`auto` would drop the bf16 tower anyway, and the fp32 one is still a candidate. The stand-in is that case (bf16
min cosine 0.9977 here, 0.996 on real photos, 0.7-1.5 points of accuracy lost, docs/benchmarks.md); at fp32
OpenVINO still ran it faster than ONNX Runtime.
`openvino-int8`: the image tower quantized by NNCF post-training quantization, calibrated
on the generated image set (calibration.py), with two choices measured on real (train-split) photos for
ViT-B-32 (min / mean cosine to torch fp32 on 64 images): SmoothQuant off (on: 0.9922 / 0.9988; off: 0.9986 /
0.9996) and each attention block's output projection kept in floating point (0.99982 / 0.99984; the
attention output is where per-tensor int8 ranges lose most). NNCF's transformer and generic recipes suit
different models, so both are tried and checked (`_quantize_image`). Its text tower is the `openvino` one with
int8 weights where those meet the bound (`_compress_text_weights`: for memory, not speed).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
# Ops a value passes through unchanged in meaning between an attention and its output projection.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert"})

OnnxSource = Callable[[], Export]  # the verified fp32 ONNX export, made on first call


def build_openvino(
    loaded: LoadedModel, backend: str, onnx_fp32: OnnxSource, folder: Path, threads: int
) -> dict[str, TowerExport]:
    towers = {"text": _convert(loaded, "text", onnx_fp32, folder, threads)}
    if backend == "openvino":
        towers["image"] = _convert(loaded, "image", onnx_fp32, folder, threads)
        towers = _one_precision(loaded, towers, threads)
    else:
        towers["image"] = _quantize_image(loaded, onnx_fp32, folder, threads)
        towers["text"] = _compress_text_weights(loaded, towers["text"], threads)
    return towers


def _compress_text_weights(loaded: LoadedModel, float_tower: TowerExport, threads: int) -> TowerExport:
    """The text tower with int8 weights (activations stay floating point): ViT-B-32's compiled text tower took
    140 MB instead of 350 MB of RSS (the torch-free server's largest part), at min cosine 0.9994 to fp32 on 32
    random prompts; text is encoded once per class at build time, so its lower speed (47 vs 81 texts/s at 32)
    costs little. Kept only if it meets `auto`'s int8 bound on the check prompts; else the float tower stays."""
    import nncf
    import openvino

    from ..choice import FIDELITY_MIN_COSINE

    xml = float_tower.path.with_name("text-int8.xml")
    try:
        compressed = nncf.compress_weights(
            core().read_model(str(float_tower.path)), mode=nncf.CompressWeightsMode.INT8_ASYM
        )
        openvino.save_model(compressed, str(xml), compress_to_fp16=False)
        check = _verify(loaded, "text", xml, "int8", threads)
    except Exception as exc:
        log.info("int8 weights for the text tower failed, keeping it in floating point: %s", exc)
        return float_tower
    if check["min_cosine"] < FIDELITY_MIN_COSINE["int8"]:
        log.info("int8 text weights reach min cosine %.5f only: keeping the float tower", check["min_cosine"])
        xml.unlink()
        xml.with_suffix(".bin").unlink()
        return TowerExport(
            float_tower.path,
            float_tower.precision,
            float_tower.check,
            f"{float_tower.note}; int8 weights rejected: min cosine {check['min_cosine']:.5f}",
            float_tower.extra_files,
        )
    float_tower.path.unlink()
    float_tower.path.with_suffix(".bin").unlink()
    xml.rename(float_tower.path)
    xml.with_suffix(".bin").rename(float_tower.path.with_suffix(".bin"))
    return TowerExport(
        float_tower.path, "int8", check, f"{float_tower.note}; int8 weights (NNCF)", float_tower.extra_files
    )


def _sources(loaded: LoadedModel, tower: Tower, onnx_fp32: OnnxSource) -> list[tuple[str, Callable[[], Any]]]:
    """The graphs a tower can be converted from, best first (each made only when tried)."""
    import openvino

    return [
        ("converted from torch", lambda: _from_torch(loaded, tower)),
        ("converted from ONNX", lambda: openvino.convert_model(str(getattr(onnx_fp32(), tower).path))),
    ]


def _from_torch(loaded: LoadedModel, tower: Tower) -> Any:
    import openvino
    import torch

    from .export import check_inputs, tower_module

    example = check_inputs(loaded, tower)[:2]
    shape = openvino.PartialShape([-1, *example.shape[1:]])
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace, which the frontend uses, warns that it is deprecated
        return openvino.convert_model(
            tower_module(loaded, tower),
            example_input=torch.from_numpy(example),
            input=[(shape, openvino.Type(example.dtype))],
        )


def _one_precision(loaded: LoadedModel, towers: dict[str, TowerExport], threads: int) -> dict[str, TowerExport]:
    """Both towers at fp32 when either one's bf16 was rejected: a model whose activations do not keep bf16's
    precision in one tower is not trusted with it in the other. Measured on the stand-in (image tower rejected at
    0.9977, text tower passing at 0.99982): with its bf16 text tower, APE on textile-defects lost 0.6 points at
    16 shots (fp32 image features identical to ONNX Runtime's), past issue 15's 0.5-point rule."""
    if all(t.precision == "bf16" for t in towers.values()) or all(t.precision != "bf16" for t in towers.values()):
        return towers
    out = dict(towers)
    for tower, export in towers.items():
        if export.precision == "bf16":
            name: Tower = "image" if tower == "image" else "text"
            check = _verify(loaded, name, export.path, "fp32", threads)
            _require(name, check, "fp32")
            note = f"{export.note}; fp32 as the other tower (bf16 min cosine {export.check['min_cosine']:.5f})"
            out[tower] = TowerExport(export.path, "fp32", check, note, export.extra_files)
    return out


def _convert(loaded: LoadedModel, tower: Tower, onnx_fp32: OnnxSource, folder: Path, threads: int) -> TowerExport:
    import openvino

    from ..choice import FIDELITY_MIN_COSINE

    xml = folder / f"{tower}.xml"
    problems = []
    for source, make in _sources(loaded, tower, onnx_fp32):
        try:
            openvino.save_model(make(), str(xml), compress_to_fp16=False)
            precision = "bf16" if supports_bf16() else "fp32"
            check = _verify(loaded, tower, xml, precision, threads)
            note = source
            if precision == "bf16" and check["min_cosine"] < FIDELITY_MIN_COSINE["bf16"]:
                note = f"{source}; bf16 rejected: min cosine {check['min_cosine']:.5f}"
                precision, check = "fp32", _verify(loaded, tower, xml, "fp32", threads)
            _require(tower, check, precision)
        except Exception as exc:  # each source fails in its own way; the next one gets its chance
            problems.append(f"{source}: {type(exc).__name__}: {str(exc)[:300]}")
            log.info("OpenVINO %s tower %s failed: %s", tower, source, problems[-1])
            continue
        return TowerExport(xml, precision, check, note, (xml.with_suffix(".bin").name,))
    raise ExportError(f"convert {tower} tower to OpenVINO", "; ".join(problems))


def _quantize_image(loaded: LoadedModel, onnx_fp32: OnnxSource, folder: Path, threads: int) -> TowerExport:
    """The best-checked of the recipes tried, per source: NNCF's transformer recipe (what a ViT needs: ViT-B-32's
    generic-recipe tower reached only 0.990 on real photos) and its generic one (what conv-attention hybrids
    need: MobileCLIP2-S0's transformer-recipe tower came out unrelated to torch, cosine < 0). The first that
    meets `auto`'s int8 bound ends the search; else the best one that passes the export check is kept."""
    import openvino

    from ..choice import FIDELITY_MIN_COSINE

    xml = folder / "image.xml"
    pixels = Preprocessor(loaded.preprocess).eval_pixels(generated_images(CALIBRATION_IMAGES, CALIBRATION_SEED))
    problems: list[str] = []
    best: tuple[float, Path, dict[str, float], str] | None = None
    attempts = 0
    for source, make in _sources(loaded, "image", onnx_fp32):
        for recipe in ("transformer", "generic"):
            attempts += 1
            candidate = folder / f".image-{attempts}.xml"
            try:
                model = make()
                if recipe == "transformer" and not _is_transformer(model):
                    continue
                kept = attention_output_projections(model)
                openvino.save_model(_quantize(model, pixels, recipe, kept), str(candidate), compress_to_fp16=False)
                check = _verify(loaded, "image", candidate, "int8", threads)
                _require("image", check, "int8")
            except Exception as exc:
                problems.append(f"{source}, {recipe} recipe: {type(exc).__name__}: {str(exc)[:300]}")
                log.info("OpenVINO int8 image tower %s failed: %s", source, problems[-1])
                continue
            note = (
                f"NNCF post-training int8 ({recipe} recipe), {source}; "
                f"{len(kept)} attention output projections kept in floating point"
            )
            if best is None or check["min_cosine"] > best[0]:
                best = (check["min_cosine"], candidate, check, note)
            if check["min_cosine"] >= FIDELITY_MIN_COSINE["int8"]:
                break
        if best is not None:
            break
    if best is None:
        raise ExportError("quantize image tower with NNCF", "; ".join(problems))
    _, chosen, check, note = best
    chosen.rename(xml)
    chosen.with_suffix(".bin").rename(xml.with_suffix(".bin"))
    for leftover in folder.glob(".image-*"):
        leftover.unlink()
    return TowerExport(xml, "int8", check, note, (xml.with_suffix(".bin").name,))


def _quantize(model: Any, pixels: Any, recipe: str, kept: list[str]) -> Any:
    """SmoothQuant off in both recipes: on, ViT-B-32's min cosine on real photos fell from 0.9986 to 0.9922."""
    import nncf

    return nncf.quantize(
        model,
        nncf.Dataset([pixels[i : i + 1] for i in range(pixels.shape[0])]),
        subset_size=pixels.shape[0],
        model_type=nncf.ModelType.TRANSFORMER if recipe == "transformer" else None,
        ignored_scope=nncf.IgnoredScope(names=kept, validate=False) if kept else None,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
        ),
    )


def _is_transformer(model: Any) -> bool:
    return any(op.get_type_name() in ("Softmax", "ScaledDotProductAttention") for op in model.get_ops())


def attention_output_projections(model: Any) -> list[str]:
    """Names of the MatMuls that take an attention's output (through reshapes and transposes): a fused
    ScaledDotProductAttention, or the attention-weights-times-values MatMul of an unfused one."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        node = through_layout(op.input_value(0).get_node())
        if node.get_type_name() == "ScaledDotProductAttention" or (
            node.get_type_name() == "MatMul" and _feeds_from(node, "Softmax")
        ):
            names.append(op.get_friendly_name())
    return names


def _feeds_from(node: Any, op_type: str) -> bool:
    return any(through_layout(value.get_node()).get_type_name() == op_type for value in node.input_values())


def through_layout(node: Any) -> Any:
    """The first node above `node` that is not a reshape, transpose or convert."""
    while node.get_type_name() in _LAYOUT_OPS:
        node = node.input_value(0).get_node()
    return node


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
