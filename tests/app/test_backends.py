"""Encoder backends: ONNX Runtime exports close to torch, cached on disk once per model identity, re-exported when
damaged, falling back to torch when they cannot be had; explicit thread settings; `auto` from models.json.

Most cache behaviour runs on a tiny two-tower model (exports in about a second); closeness to torch runs on the
real stand-in with real images (its export is cached under the test data dir and reused across runs).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.encoder import create_encoder
from app.encoder.backends import export
from app.encoder.backends.crops import NormalisedInput
from app.encoder.backends.on_demand import OnDemandTextTower
from app.encoder.backends.onnx_backend import OnnxTower, load_onnx_towers
from app.encoder.encoder import Encoder
from app.encoder.factory import ModelDefaults, make_towers
from app.encoder.load import LoadedModel, ModelIdentity, PreprocessConfig, weights_sha256
from app.settings import Settings
from tests.conftest import dataset_dir

# Measured on the stand-in with 24 real images (cifar10-mini + textile-defects): onnx vs torch fp32 mean and min
# cosine 1.00000 (max abs diff ~4e-6); the stand-in's onnx-int8 is the same fp32 graph. The bounds leave room
# for other CPUs' kernels, and are still far tighter than anything a broken export gives.
ONNX_MEAN_COSINE = 0.9999
ONNX_MIN_COSINE = 0.999


class Tiny(torch.nn.Module):
    """Two towers in a dozen parameters: a conv + linear image tower and an embedding + linear text tower."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.proj = torch.nn.Linear(8, 16)
        self.emb = torch.nn.Embedding(50, 16)
        self.text_proj = torch.nn.Linear(16, 16)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean((2, 3)))  # type: ignore[no-any-return]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.emb(tokens).mean(1))  # type: ignore[no-any-return]


def tiny_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c) % 50 for c in f"{t:<12}"[:12]] for t in texts], dtype=torch.int64)


def tiny_model(seed: int = 0, kind: type[Tiny] = Tiny, name: str = "tiny") -> LoadedModel:
    model = kind(seed).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    identity = ModelIdentity(name, None, weights_sha256(model), 16)
    preprocess = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest")
    return LoadedModel(model, tiny_tokenizer, preprocess, identity, 10.0, "*")


def tiny_encoder(loaded: LoadedModel, backend: str, data_dir: Path) -> Encoder:
    image, text = make_towers(loaded, backend, Settings(data_dir=data_dir, threads=2))
    return Encoder(loaded, image, text, batch_size=8, templates=["a {}."])


# ---- closeness to torch (the real stand-in) -----------------------------------------------------------------
def real_images() -> list[Image.Image]:
    paths = sorted((dataset_dir("cifar10-mini") / "test").glob("*/*.jpg"))[::25]
    paths += sorted((dataset_dir("textile-defects") / "test").glob("*/*.jpg"))[::45]
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_features_match_torch_on_real_images(encoder: Encoder, model_data_dir: Path, backend: str) -> None:
    settings = Settings(model="offline", data_dir=model_data_dir, threads=2)
    torch_image, torch_text = make_towers(encoder.loaded, "torch", settings)
    image, text = make_towers(encoder.loaded, backend, settings)
    # The stand-in's image tower has no MatMul to quantize and its int8 text tower fails the export check:
    # both backends run fp32 graphs, and say so.
    assert image.name == "onnx"
    reference = Encoder(encoder.loaded, torch_image, torch_text, batch_size=8, templates=["a {}."])
    candidate = Encoder(encoder.loaded, image, text, batch_size=8, templates=["a {}."])
    images = real_images()
    assert len(images) >= 20
    cosine = np.sum(reference.encode_images(images) * candidate.encode_images(images), axis=1)
    assert cosine.mean() >= ONNX_MEAN_COSINE
    assert cosine.min() >= ONNX_MIN_COSINE
    prompts = ["a photo of a cat.", "a photo of a truck.", "a close-up photo of a fabric defect."]
    text_cosine = np.sum(reference.encode_texts(prompts) * candidate.encode_texts(prompts), axis=1)
    assert text_cosine.min() >= ONNX_MIN_COSINE


def test_auto_without_anything_to_measure_takes_the_models_json_default(
    model_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.encoder import factory

    real = ModelDefaults.for_key

    def patched(key: str) -> ModelDefaults:
        defaults = real(key)
        return ModelDefaults(defaults.templates, "torch", defaults.default_method)

    monkeypatch.setattr(ModelDefaults, "for_key", staticmethod(patched))
    monkeypatch.setattr(factory, "read_choice", lambda *args: None)
    monkeypatch.setattr(factory, "available_backends", list)
    settings = Settings(model="offline", backend="auto", data_dir=model_data_dir, threads=2)
    encoder, _ = create_encoder(settings, torch_free=False)
    assert encoder.backend == "torch"
    assert encoder.backend_choice is None
    assert ModelDefaults.for_key("ViT-B-32").default_backend == "torch"
    assert real("ViT-B-32").default_backend == "onnx-int8"


# ---- the export cache (tiny model) --------------------------------------------------------------------------
def test_export_is_reused_and_keyed_by_model_identity(tmp_path: Path) -> None:
    loaded = tiny_model(0)
    before = export.exports_made()
    first = export.ensure_export(loaded, "onnx", tmp_path)
    assert export.exports_made() == before + 1
    assert first.folder == tmp_path / "exports" / loaded.identity.model_id.replace("/", "_") / "onnx"
    stamp = (first.folder / export.MANIFEST).stat().st_mtime_ns
    again = export.ensure_export(loaded, "onnx", tmp_path)  # a second start
    assert export.exports_made() == before + 1
    assert again.image.path == first.image.path
    assert (first.folder / export.MANIFEST).stat().st_mtime_ns == stamp
    other = tiny_model(1)  # other weights: another identity, another export
    assert other.identity.model_id != loaded.identity.model_id
    assert export.ensure_export(other, "onnx", tmp_path).folder != first.folder
    assert export.exports_made() == before + 2
    manifest = json.loads((first.folder / export.MANIFEST).read_text())
    assert manifest["weights_sha256"] == loaded.identity.weights_sha256


def test_an_export_writes_nothing_to_stdout_and_no_exporter_warnings(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A first start exports in the service's process: the dynamo exporter's progress lines ('[torch.onnx] Run
    decompositions...') and onnxscript's routine constant-folding warnings would land in the operator's log."""
    caplog.set_level(logging.DEBUG)
    capfd.readouterr()
    before = export.exports_made()
    found = export.ensure_export(tiny_model(11), "onnx", tmp_path)  # a model no other test exports
    assert export.exports_made() == before + 1  # really exported here, not copied from an earlier export
    assert found.image.precision == "fp32"
    out, _ = capfd.readouterr()
    assert "[torch.onnx]" not in out
    assert not [r for r in caplog.records if r.name.startswith("onnxscript") and r.levelno < logging.ERROR]
    assert logging.getLogger("onnxscript").level == logging.NOTSET  # restored after the export


def test_int8_export_quantizes_matmuls_and_stays_close(tmp_path: Path) -> None:
    loaded = tiny_model(0)
    encoder = tiny_encoder(loaded, "onnx-int8", tmp_path)
    assert encoder.backend == "onnx-int8"
    found = export.ensure_export(loaded, "onnx-int8", tmp_path)
    assert found.image.precision == "int8"
    assert found.image.check["min_cosine"] >= export.INT8_MIN_COSINE
    reference = tiny_encoder(loaded, "torch", tmp_path)
    crops = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    cosine = np.sum(reference.encode_crops(crops) * encoder.encode_crops(crops), axis=1)
    assert cosine.min() >= export.INT8_MIN_COSINE


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_export_is_detected_and_redone(tmp_path: Path, damage: str) -> None:
    loaded = tiny_model(0)
    first = export.ensure_export(loaded, "onnx", tmp_path)
    target = first.image.path
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (first.folder / export.MANIFEST).write_text("{not json")
    before = export.exports_made()
    image, _, again = load_onnx_towers(loaded, "onnx", tmp_path, 1)
    assert export.exports_made() == before + 1
    assert not isinstance(export._read_valid(again.folder, loaded), str)
    assert image(np.zeros((1, 16, 16, 3), dtype=np.uint8)).shape == (1, 16)


def test_a_second_data_dir_copies_this_process_export(tmp_path: Path) -> None:
    loaded = tiny_model(2)
    export.ensure_export(loaded, "onnx", tmp_path / "a")
    before = export.exports_made()
    copied = export.ensure_export(loaded, "onnx", tmp_path / "b")
    assert export.exports_made() == before
    assert copied.folder.is_relative_to(tmp_path / "b")


def test_concurrent_first_starts_export_once(tmp_path: Path) -> None:
    loaded = tiny_model(3)
    before = export.exports_made()
    results: list[Any] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(export.ensure_export(loaded, "onnx", tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert export.exports_made() == before + 1
    assert len({r.folder for r in results}) == 1
    leftovers = [p.name for p in results[0].folder.parent.iterdir() if p.name.startswith(".onnx-")]
    assert leftovers == []  # no temporary folder left behind


# ---- falling back to torch ----------------------------------------------------------------------------------
def test_failing_export_falls_back_to_torch_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise export.ExportError("export image tower", "the exporter met an unsupported operator")

    monkeypatch.setattr(export, "_export_fp32", broken)
    with caplog.at_level(logging.WARNING, logger="app.encoder.factory"):
        encoder = tiny_encoder(tiny_model(4), "onnx", tmp_path)
    assert encoder.backend == "torch"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "FALLING BACK TO TORCH" in warning
    assert "export image tower" in warning
    assert "unsupported operator" in warning
    assert encoder.encode_crops(np.zeros((1, 16, 16, 3), dtype=np.uint8)).shape == (1, 16)


def test_a_failed_export_check_is_recorded_and_not_redone_until_its_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refused(loaded: LoadedModel, tower: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(tower)
        raise export.ExportError("verify fp32 image tower", "too far from torch (min cosine 0.5)")

    monkeypatch.setattr(export, "_export_fp32", refused)
    loaded = tiny_model(9)
    for _ in range(2):
        with pytest.raises(export.ExportError, match="too far from torch") as raised:
            export.ensure_export(loaded, "onnx", tmp_path)
    assert calls == ["image"]  # the second start raised the recorded failure without exporting
    assert raised.value.stage == "verify fp32 image tower"
    record = export.failure_record(export.export_dir(loaded, "onnx", tmp_path))
    assert str(record) in str(raised.value)
    # Other weights are not blocked by it; a changed library (or recipe) retries.
    with pytest.raises(export.ExportError):
        export.ensure_export(tiny_model(10), "onnx", tmp_path)
    assert calls == ["image", "image"]
    versions = export._versions()
    monkeypatch.setattr(export, "_versions", lambda: {**versions, "onnxruntime": "0.0-other"})
    with pytest.raises(export.ExportError):
        export.ensure_export(loaded, "onnx", tmp_path)
    assert calls == ["image", "image", "image"]
    # Once the export works, the record goes.
    monkeypatch.undo()
    assert export.ensure_export(loaded, "onnx", tmp_path).image.precision == "fp32"
    assert not record.exists()


def test_an_export_that_differs_from_torch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def off(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {"min_cosine": 0.5, "mean_cosine": 0.7, "max_abs_diff": 3.0, "max_rel_error": 1.0}

    monkeypatch.setattr(export, "verify", off)
    with caplog.at_level(logging.WARNING, logger="app.encoder.factory"):
        encoder = tiny_encoder(tiny_model(5), "onnx", tmp_path)
    assert encoder.backend == "torch"
    assert "differs from torch" in caplog.text
    assert not (tmp_path / "exports" / tiny_model(5).identity.model_id / "onnx").exists()


def test_a_full_start_reports_the_backend_really_used(
    model_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise export.ExportError("load", "ONNX Runtime could not load the model")

    monkeypatch.setattr("app.encoder.backends.export.ensure_export", unavailable)
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "offline-standin").symlink_to(model_data_dir / "models" / "offline-standin")
    encoder, _ = create_encoder(Settings(model="offline", backend="onnx", data_dir=data_dir, threads=2))
    assert encoder.backend == "torch"


# ---- threads ------------------------------------------------------------------------------------------------
def test_thread_settings_are_applied(tmp_path: Path) -> None:
    # In a fresh interpreter, as at service start: other tests' libraries and thread pools stay out of it.
    script = (
        "import json, faiss, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "from app.encoder.factory import configure_threads\n"
        "configure_threads(1)\n"
        "print(json.dumps({'torch': torch.get_num_threads(), 'interop': torch.get_num_interop_threads(),\n"
        "    'faiss': faiss.omp_get_max_threads(),\n"
        "    'pools': [p['num_threads'] for p in threadpool_info() if p['user_api'] in ('blas', 'openmp')]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["torch"] == found["interop"] == found["faiss"] == 1
    assert found["pools"]
    assert set(found["pools"]) == {1}
    image, text = make_towers(tiny_model(0), "onnx", Settings(data_dir=tmp_path, threads=3))
    assert isinstance(text, OnDemandTextTower)  # closed when idle; each session it opens is made the same way
    text.close()
    text(np.zeros((1, 12), dtype=np.int64))
    assert isinstance(image, NormalisedInput)  # ONNX Runtime takes normalised pixels: crops.py adapts it
    for tower in (image.tower, text.current):
        assert isinstance(tower, OnnxTower)
        options = tower.session_options
        assert options.intra_op_num_threads == 3
        assert options.inter_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_an_int8_tower_left_in_fp32_is_the_fp32_file_not_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = tiny_model(3)
    monkeypatch.setattr(export, "QUANTIZED_OPS", ("NoSuchOp",))  # nothing to quantize: both towers stay fp32
    int8 = export.ensure_export(loaded, "onnx-int8", tmp_path)
    fp32 = export.ensure_export(loaded, "onnx", tmp_path)
    assert (int8.image.precision, int8.text.precision) == ("fp32", "fp32")
    assert int8.image.path.samefile(fp32.image.path)
    assert int8.text.path.samefile(fp32.text.path)
    assert sorted(p.name for p in int8.folder.iterdir()) == [export.MANIFEST]  # no copy of either graph
    # A later start reads it back as valid and serves exactly the fp32 features.
    assert not isinstance(export._read_valid(int8.folder, loaded), str)
    crops = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    served = tiny_encoder(loaded, "onnx-int8", tmp_path).encode_crops(crops)
    assert served.tobytes() == tiny_encoder(loaded, "onnx", tmp_path).encode_crops(crops).tobytes()
    # If the fp32 file changes, the int8 folder no longer checks out (and is exported again).
    fp32.image.path.write_bytes(fp32.image.path.read_bytes()[:1000])
    assert "does not match its checksum" in str(export._read_valid(int8.folder, loaded))
