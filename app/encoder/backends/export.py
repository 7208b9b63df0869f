"""Export a model's towers to ONNX once, verify them against torch, and cache them on disk (layout and
validity rules: cache.py, which the torch-free serving path reads).

Concurrent first starts: a lock file per (model, backend) serialises exporters; each export is written into a
temporary folder and renamed into place, so a reader never sees half a folder.

`onnx`: both towers in fp32. `onnx-int8`: ONNX Runtime dynamic quantization (int8 weights, activations
quantized per call) of MatMul/Gemm only. Convolutions stay fp32: ORT's ConvInteger ran ~10x slower than its
fp32 convolution on the reference CPU. A quantized tower must stay within `INT8_MIN_COSINE` of torch; a text
tower that does not (MiniLM, the stand-in's) keeps its fp32 export, an image tower that does not fails the
backend (the factory then falls back to torch).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..folders import file_lock, install_folder, sha256_file
from ..load import LoadedModel
from .cache import CHECK_PROMPTS as CHECK_PROMPTS  # re-exported: the prompts every export is checked on
from .cache import (
    EXPORT_FORMATS,
    EXPORTED_BACKENDS,
    INPUT_NAMES,
    MANIFEST,
    OPENVINO_BACKENDS,
    Export,
    ExportError,
    Tower,
    TowerExport,
    read_valid,
)
from .cache import export_dir as cache_export_dir
from .cache import model_key as cache_model_key

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")
# Export checks on fixed inputs. fp32 is the same arithmetic reordered: anything below this is a broken
# export. int8 is judged by the direction of the features (what the cache methods use).
FP32_MIN_COSINE = 0.9999
FP32_MAX_REL_ERROR = 1e-3  # max |onnx - torch| / max |torch|
INT8_MIN_COSINE = 0.99

FloatArray = npt.NDArray[np.float32]

_exports_made = 0  # exports run by this process (tests read it to prove the cache is reused)
_verified: dict[tuple[str, str], Path] = {}  # (weights sha, backend) -> a folder this process has verified
_verified_lock = threading.Lock()


def exports_made() -> int:
    return _exports_made


def model_key(loaded: LoadedModel) -> str:
    return cache_model_key(loaded.identity)


def export_dir(loaded: LoadedModel, backend: str, data_dir: Path) -> Path:
    return cache_export_dir(loaded.identity, backend, data_dir)


def ensure_export(loaded: LoadedModel, backend: str, data_dir: Path, *, threads: int = 1) -> Export:
    """The verified export of `loaded` for `backend`, made now if the cache lacks a valid one."""
    if backend not in EXPORTED_BACKENDS:
        raise ExportError("resolve", f"{backend!r} is not an exported backend ({', '.join(EXPORTED_BACKENDS)})")
    folder = export_dir(loaded, backend, data_dir)
    found = _read_valid(folder, loaded)
    if isinstance(found, Export):
        return _remember(loaded, found)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{backend}.lock"):
        found = _read_valid(folder, loaded)  # another process may have made it while we waited
        if isinstance(found, Export):
            return _remember(loaded, found)
        if folder.exists():
            log.warning("cached %s export at %s is unusable (%s): exporting again", backend, folder, found)
        if _copy_verified(loaded, backend, folder):
            copied = _read_valid(folder, loaded)
            if isinstance(copied, Export):
                return _remember(loaded, copied)
        failed = failure_record(folder)
        recorded = _recorded_failure(failed, loaded, backend)
        if recorded is not None:
            raise recorded
        try:
            built = _build(loaded, backend, data_dir, folder, threads)
        except ExportError as exc:
            _record_failure(failed, loaded, backend, exc)
            raise
        failed.unlink(missing_ok=True)
        return _remember(loaded, built)


# ---- failed exports -----------------------------------------------------------------------------
# An export that failed its check (ExportError: e.g. the stand-in's int8 OpenVINO image tower, 0.982 against a
# bound of 0.99) fails the same way again for the same weights, recipe and libraries, after minutes of work
# at every start that tries it (`auto` measuring a host). So the failure is recorded beside the folder and
# raised again at once until one of those changes; deleting the record retries. Other errors (out of memory,
# a full disk, an interrupt) are not recorded: they need not recur.
def failure_record(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.failed.json")


def _failure_key(loaded: LoadedModel, backend: str) -> dict[str, Any]:
    return {
        "backend": backend,
        "format": EXPORT_FORMATS[backend],
        "weights_sha256": loaded.identity.weights_sha256,
        "versions": _versions(),
    }


def _recorded_failure(record: Path, loaded: LoadedModel, backend: str) -> ExportError | None:
    try:
        entry = json.loads(record.read_text())
        if entry["key"] != _failure_key(loaded, backend):
            return None
        stage, detail = str(entry["stage"]), str(entry["detail"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    log.info("%s export of %s failed before (%s): not retried", backend, loaded.identity.model_id, record)
    return ExportError(stage, f"{detail} (recorded in {record}: same weights, recipe, libraries; delete it to retry)")


def _record_failure(record: Path, loaded: LoadedModel, backend: str, exc: ExportError) -> None:
    entry = {"key": _failure_key(loaded, backend), "stage": exc.stage, "detail": exc.detail}
    try:
        record.write_text(json.dumps(entry, indent=2))
    except OSError as error:
        log.warning("could not record the failed %s export in %s: %s", backend, record, error)


# ---- the cache ----------------------------------------------------------------------------------
def _read_valid(folder: Path, loaded: LoadedModel) -> Export | str:
    return read_valid(folder, loaded.identity.weights_sha256)


def _remember(loaded: LoadedModel, found: Export) -> Export:
    with _verified_lock:
        _verified[(loaded.identity.weights_sha256, found.backend)] = found.folder
    return found


def _copy_verified(loaded: LoadedModel, backend: str, folder: Path) -> bool:
    """Copy an export this process already verified for the same weights (another data dir) into `folder`.

    The same identity gives the same export, so several services in one process (tests) export once."""
    with _verified_lock:
        source = _verified.get((loaded.identity.weights_sha256, backend))
    if source is None or source == folder or not isinstance(_read_valid(source, loaded), Export):
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".{backend}-", dir=folder.parent))
    try:
        for item in source.iterdir():
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        install_folder(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not copy the export in %s: %s", source, exc)
        return False
    log.info("reused the %s export of %s from %s", backend, loaded.identity.model_id, source)
    return True


def _sha256(path: Path) -> str:
    return sha256_file(path)


# ---- building -----------------------------------------------------------------------------------
def _build(loaded: LoadedModel, backend: str, data_dir: Path, folder: Path, threads: int) -> Export:
    global _exports_made
    tmp = Path(tempfile.mkdtemp(prefix=f".{backend}-", dir=folder.parent))
    try:
        towers: dict[str, TowerExport] = {}
        if backend == "onnx":
            for tower in ("image", "text"):
                towers[tower] = _export_fp32(loaded, tower, tmp / f"{tower}.onnx", threads)
        elif backend in OPENVINO_BACKENDS:
            from .openvino_export import build_openvino

            def onnx_fp32() -> Export:  # the fallback source, exported only if converting from torch fails
                return ensure_export(loaded, "onnx", data_dir, threads=threads)

            towers = build_openvino(loaded, backend, onnx_fp32, tmp, threads)
        else:
            fp32 = ensure_export(loaded, "onnx", data_dir, threads=threads)
            towers["image"] = _quantize(loaded, "image", fp32.image, tmp / "image.onnx", threads, required=True)
            towers["text"] = _quantize(loaded, "text", fp32.text, tmp / "text.onnx", threads, required=False)
        manifest = {
            "format": EXPORT_FORMATS[backend],
            "backend": backend,
            "model_id": loaded.identity.model_id,
            "weights_sha256": loaded.identity.weights_sha256,
            "versions": _versions(),
            "towers": {
                name: {
                    # Relative to the folder: "../onnx/text.onnx" for a tower shared with the fp32 export.
                    "file": os.path.relpath(t.path, tmp),
                    "sha256": _sha256(t.path),
                    "precision": t.precision,
                    "check": t.check,
                    "note": t.note,
                    "extra_files": [{"file": f, "sha256": _sha256(tmp / f)} for f in t.extra_files],
                }
                for name, t in towers.items()
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for item in tmp.iterdir():
            item.chmod(0o644)
        install_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _exports_made += 1
    summary = ", ".join(f"{n} {t.precision} (min cosine {t.check['min_cosine']:.5f})" for n, t in towers.items())
    log.info("exported %s for %s to %s: %s", backend, loaded.identity.model_id, folder, summary)
    found = _read_valid(folder, loaded)
    if not isinstance(found, Export):
        raise ExportError("install", f"the export written to {folder} does not read back: {found}")
    return found


def tower_module(loaded: LoadedModel, tower: Tower) -> torch.nn.Module:
    """One tower of the model as a module with one tensor in and one out: what every exporter converts."""
    return _TowerModule(loaded.model, tower).eval()


def _export_fp32(loaded: LoadedModel, tower: Tower, path: Path, threads: int) -> TowerExport:
    module = tower_module(loaded, tower)
    example = torch.from_numpy(check_inputs(loaded, tower)[:2])
    name = INPUT_NAMES[tower]
    errors = []
    options: dict[str, dict[str, Any]] = {
        "dynamo": {"external_data": False, "dynamic_shapes": {"inputs": {0: torch.export.Dim("batch", min=1)}}},
        "torchscript": {"dynamic_axes": {name: {0: "batch"}, "features": {0: "batch"}}, "opset_version": 17},
    }
    for exporter, extra in options.items():
        try:
            with warnings.catch_warnings(), _quiet_exporter_logs(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporters warn about deprecations and tracing details
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=exporter == "dynamo",
                    verbose=False,  # else the dynamo exporter prints its progress to stdout, into the service's log
                    input_names=[name],
                    output_names=["features"],
                    **extra,
                )
            check = verify(loaded, tower, path, threads)
        except Exception as exc:  # every exporter fails differently; the next one gets its chance
            errors.append(f"{exporter} exporter: {type(exc).__name__}: {str(exc)[:300]}")
            log.info("ONNX export of the %s tower with the %s exporter failed: %s", tower, exporter, errors[-1])
            continue
        if check["min_cosine"] >= FP32_MIN_COSINE and check["max_rel_error"] <= FP32_MAX_REL_ERROR:
            return TowerExport(path, "fp32", check, f"{exporter} exporter")
        errors.append(f"{exporter} exporter: output differs from torch ({describe(check)})")
    raise ExportError(f"export {tower} tower", "; ".join(errors))


def _quantize(
    loaded: LoadedModel, tower: Tower, fp32: TowerExport, path: Path, threads: int, *, required: bool
) -> TowerExport:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_root_logger():
            quantize_dynamic(fp32.path, path, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS))
        quantized_nodes = sum(
            n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in onnx.load(path).graph.node
        )
        check = verify(loaded, tower, path, threads)
    except Exception as exc:
        raise ExportError(f"quantize {tower} tower", f"{type(exc).__name__}: {exc}") from exc
    # A tower that stays fp32 is the fp32 export's own file (the manifest names it by a relative path, with
    # its checksum), not a copy of it: the stand-in's onnx-int8 folder held a 102 MB copy of onnx/.
    if quantized_nodes == 0:
        path.unlink()
        return TowerExport(fp32.path, "fp32", fp32.check, f"no {'/'.join(QUANTIZED_OPS)} to quantize: runs fp32")
    if check["min_cosine"] >= INT8_MIN_COSINE:
        return TowerExport(path, "int8", check)
    problem = f"int8 {tower} tower is too far from torch ({describe(check)}; bound {INT8_MIN_COSINE})"
    if required:
        raise ExportError(f"verify int8 {tower} tower", problem)
    log.info("%s: keeping the fp32 %s tower", problem, tower)
    path.unlink()
    return TowerExport(fp32.path, "fp32", fp32.check, f"int8 rejected: {describe(check)}")


def verify(loaded: LoadedModel, tower: Tower, path: Path, threads: int) -> dict[str, float]:
    """Cosine and absolute difference between the ONNX file's and torch's features on fixed inputs."""
    from .onnx_backend import make_session

    inputs = check_inputs(loaded, tower)
    session = make_session(path, threads)
    got = np.concatenate([session.run(None, {INPUT_NAMES[tower]: inputs[i : i + 3]})[0] for i in (0, 3)])
    return compare(np.asarray(got, dtype=np.float32), torch_features(loaded, tower, inputs))


def torch_features(loaded: LoadedModel, tower: Tower, inputs: Any) -> FloatArray:
    """What eager torch fp32 gives for `inputs` on `tower` (the reference every export is checked against)."""
    with torch.inference_mode():
        out: FloatArray = _TowerModule(loaded.model, tower)(torch.from_numpy(inputs)).float().numpy()
    return out


def compare(got: FloatArray, want: FloatArray) -> dict[str, float]:
    cos = np.sum(got * want, axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    diff = float(np.abs(got - want).max())
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": diff,
        "max_rel_error": diff / max(float(np.abs(want).max()), 1e-12),
    }


def check_inputs(loaded: LoadedModel, tower: Tower) -> Any:
    """Four fixed inputs: normalised-pixel-like noise for images, fixed prompts for text."""
    if tower == "image":
        size = loaded.preprocess.size
        rng = np.random.default_rng(1234)
        return rng.standard_normal((4, 3, size, size)).astype(np.float32)
    return np.ascontiguousarray(loaded.tokenizer(list(CHECK_PROMPTS)).numpy(), dtype=np.int64)


def describe(check: dict[str, float]) -> str:
    return f"min cosine {check['min_cosine']:.5f}, max abs diff {check['max_abs_diff']:.3g}"


def _versions() -> dict[str, str]:
    """The libraries an export's result depends on (OpenVINO and NNCF only where installed)."""
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """onnxscript's optimizer logs a WARNING whenever a constant fold does not apply ('Evaluation failed: cannot
    reshape ...'), which is routine for a graph with a dynamic batch and reads like a failed export in an operator's
    log. What decides an export is `verify`, so its records below ERROR are dropped for the export's duration."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic logs a generic 'consider pre-processing' warning on the root logger every time."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class _TowerModule(torch.nn.Module):
    """One tower of an open_clip model as a module with one tensor in and one out (what ONNX exports)."""

    def __init__(self, model: Any, tower: Tower) -> None:
        super().__init__()
        self.model = model
        self.tower = tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.encode_image(inputs) if self.tower == "image" else self.model.encode_text(inputs)
        return out
