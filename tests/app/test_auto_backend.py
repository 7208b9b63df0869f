"""`SHOTCACHE_BACKEND=auto`: the fastest backend within the fidelity bound, measured once per model and host,
cached, and re-used by the next (torch-free) start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.encoder.backends.cache import EXPORT_FORMATS, model_folder
from app.encoder.choice import CHOICE_FILE, FIDELITY_MIN_COSINE, host_key, measure
from app.encoder.encoder import Encoder
from app.encoder.load import PreprocessConfig
from benchmarks.server_process import link_model

PRE = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_towers(clock: FakeClock, seconds_per_image: float, noise: float) -> tuple[Any, Any]:
    """Towers whose features are a fixed projection plus `noise`, costing `seconds_per_image` on the clock."""
    projection = np.random.default_rng(0).standard_normal((3 * 16 * 16, 8)).astype(np.float32)
    rng = np.random.default_rng(1)

    def image(pixels: Any) -> Any:
        clock.now += seconds_per_image * pixels.shape[0]
        out = pixels.reshape(pixels.shape[0], -1) @ projection
        return out + noise * rng.standard_normal(out.shape).astype(np.float32) * np.abs(out).mean()

    def text(tokens: Any) -> Any:
        return tokens.astype(np.float32) @ np.ones((tokens.shape[1], 8), dtype=np.float32)

    return image, text


def test_the_fastest_eligible_backend_wins_and_a_lossy_one_is_not_eligible() -> None:
    clock = FakeClock()
    candidates = {
        "onnx": fake_towers(clock, 0.010, 0.0),
        "onnx-int8": fake_towers(clock, 0.004, 0.001),  # faster, within the bound
        "openvino-int8": fake_towers(clock, 0.001, 0.3),  # fastest, but too far from fp32
    }
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4) % 7 + 1
    choice = measure(candidates, PRE, tokens, "host", clock=clock)
    assert choice.backend == "onnx-int8"
    assert not choice.candidates["openvino-int8"]["eligible"]
    assert choice.candidates["openvino-int8"]["min_cosine"] < FIDELITY_MIN_COSINE["fp32"]
    assert choice.candidates["onnx-int8"]["img_per_s"] > choice.candidates["onnx"]["img_per_s"] > 0
    assert not choice.cached


class Tagged:
    """A fake tower that says which precision it runs at (as the real towers' `precision` does)."""

    def __init__(self, tower: Any, precision: str) -> None:
        self.tower = tower
        self.precision = precision
        self.name = precision

    def __call__(self, array: Any) -> Any:
        return self.tower(array)


def test_the_bound_is_the_precision_s_own() -> None:
    """The same small error (min cosine between 0.999 and 0.9999) is bf16's to make, not an fp32 graph's."""
    clock = FakeClock()
    reference = fake_towers(clock, 0.010, 0.0)
    towers = {precision: fake_towers(clock, 0.002, 0.025) for precision in ("bf16", "fp32")}
    candidates = {
        "onnx": reference,
        "openvino": (Tagged(towers["bf16"][0], "bf16"), Tagged(towers["bf16"][1], "bf16")),
        "openvino-fp32": (Tagged(towers["fp32"][0], "fp32"), Tagged(towers["fp32"][1], "fp32")),
    }
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4) % 7 + 1
    choice = measure(candidates, PRE, tokens, "host", clock=clock)
    for name in ("openvino", "openvino-fp32"):
        assert FIDELITY_MIN_COSINE["bf16"] <= choice.candidates[name]["min_cosine"] < FIDELITY_MIN_COSINE["fp32"]
    assert choice.candidates["openvino"]["eligible"]
    assert not choice.candidates["openvino-fp32"]["eligible"]
    assert choice.backend == "openvino"


def _private_copy(model_data_dir: Path, data_dir: Path, encoder: Encoder) -> Path:
    """A data dir whose model folder is its own (the choice file may be edited) over the shared exports."""
    link_model(data_dir, model_data_dir)
    (data_dir / "exports").unlink()
    shared = model_folder(encoder.identity, model_data_dir.resolve())
    mine = model_folder(encoder.identity, data_dir)
    mine.mkdir(parents=True)
    for item in shared.iterdir():
        if item.is_dir() and not item.name.startswith("."):
            (mine / item.name).symlink_to(item, target_is_directory=True)
        elif item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, mine / item.name)
    shutil.copytree(model_data_dir.resolve() / "exports" / "sources", data_dir / "exports" / "sources")
    return mine


START = (
    "import json\nfrom app.encoder import create_encoder\nfrom app.settings import Settings\n"
    "enc, _ = create_encoder(Settings(model='offline', backend='auto', threads=2))\n"
    "print(json.dumps([enc.backend, enc.backend_choice]))"
)


def test_the_choice_is_cached_per_host_and_reused(encoder: Encoder, model_data_dir: Path, tmp_path: Path) -> None:
    # The session encoder started with `auto` on the torch path: it measured (or found) this host's choice.
    assert encoder.backend_choice is not None
    host = host_key(2)
    mine = _private_copy(model_data_dir, tmp_path / "data", encoder)
    table = json.loads((mine / CHOICE_FILE).read_text())
    assert table[host]["backend"] == encoder.backend_choice["backend"]
    # Re-used, not re-measured: a start follows whatever the cache says for this host.
    other = "onnx" if table[host]["backend"] != "onnx" else "onnx-int8"
    table[host]["backend"] = other
    (mine / CHOICE_FILE).write_text(json.dumps(table))
    env = {**__import__("os").environ, "SHOTCACHE_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    backend, choice = json.loads(run.stdout.strip().splitlines()[-1])
    assert choice["backend"] == other
    assert choice["cached"] is True
    assert backend == ("onnx" if other == "onnx-int8" else other)  # the stand-in's int8 export keeps fp32 towers


def test_a_changed_export_recipe_makes_the_host_measure_again(monkeypatch: pytest.MonkeyPatch) -> None:
    before = host_key(2)
    assert host_key(2) == before
    monkeypatch.setitem(EXPORT_FORMATS, "openvino", EXPORT_FORMATS["openvino"] + 1)
    assert host_key(2) != before


# An installation without torch (the Docker image's runtime): `import torch` fails and find_spec finds nothing.
WITHOUT_TORCH = """
import importlib.util, sys
BLOCKED = {"torch", "open_clip", "timm", "transformers", "torchvision"}
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCKED else _find(name, package)
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Absent())
"""


def test_a_host_not_measured_yet_is_measured_from_the_exports_without_torch(
    encoder: Encoder, model_data_dir: Path, tmp_path: Path
) -> None:
    # A baked image started on another host (or another CPU limit) than it was built on: its model folder has
    # exports but no choice for this host. Before, the start fell to the torch path and died without torch.
    mine = _private_copy(model_data_dir, tmp_path / "data", encoder)
    (mine / CHOICE_FILE).unlink()
    script = WITHOUT_TORCH + START + "\nprint(json.dumps(sorted(set(sys.modules) & BLOCKED)))"
    env = {**__import__("os").environ, "SHOTCACHE_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    *_, answer, imported = run.stdout.strip().splitlines()
    backend, choice = json.loads(answer)
    assert json.loads(imported) == []
    assert choice["cached"] is False  # measured now, on this host
    assert "onnx" in choice["candidates"]  # the fp32 reference the others were checked against
    assert backend == choice["backend"]
    assert choice["candidates"][backend]["eligible"]
    table = json.loads((mine / CHOICE_FILE).read_text())
    assert table[host_key(2)]["backend"] == backend  # cached: the next start reads it


def test_with_torch_installed_a_fully_exported_model_is_measured_without_loading_it(
    encoder: Encoder, model_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.encoder import factory
    from app.encoder.exported import find_exported_model
    from app.settings import Settings

    mine = _private_copy(model_data_dir, tmp_path / "data", encoder)
    (mine / CHOICE_FILE).unlink()
    settings = Settings(model="offline", backend="auto", threads=2, data_dir=tmp_path / "data")

    def torch_path(*_: Any) -> Any:
        raise AssertionError("the model was loaded through torch")

    monkeypatch.setattr(factory, "_resolve", torch_path)
    # Every installed backend exported: nothing torch could add, so the start measures from the exports.
    monkeypatch.setattr(factory, "available_backends", lambda: ["onnx", "onnx-int8"])
    started, _ = factory.create_encoder(settings)
    assert started.backend_choice is not None
    assert started.backend_choice["cached"] is False
    assert json.loads((mine / CHOICE_FILE).read_text())[host_key(2)]["backend"] == started.backend
    # A backend without an export (the stand-in's openvino-int8 never exports): torch could make it, so the
    # torch-free path steps aside and says why.
    (mine / CHOICE_FILE).unlink()
    monkeypatch.setattr(factory, "available_backends", lambda: ["onnx", "openvino-int8"])
    found = find_exported_model(settings)
    assert not isinstance(found, str)
    reason = factory._measure_exported(found[0], settings)
    assert isinstance(reason, str)
    assert "openvino-int8" in reason
