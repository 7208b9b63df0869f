"""Serving from exports without torch: the tokenizer files equal open_clip's tokenizers, the PIL/numpy views equal
torchvision's, the serving path imports no torch / open_clip / timm / transformers, and it classifies real images
as the torch path does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from app.encoder.encoder import Encoder
from app.encoder.factory import ModelDefaults, make_towers
from app.encoder.preprocess import Preprocessor, random_resized_crop, sample_view
from app.encoder.tokenize import FileTokenizer, write_tokenizer_file
from app.settings import Settings
from benchmarks.server_process import link_model
from tests.conftest import dataset_dir

FORBIDDEN = ("torch", "open_clip", "timm", "transformers", "torchvision")
PROMPTS = [
    "a photo of a dog.",
    "A Photo of THE large Café!!",
    "it's   a\ttab\nand new-line's test 123 4.5",
    "&amp; html &lt;b&gt; entities",
    "emoji 🐶 and 日本語 text",
    "x" * 300,
    " ".join(["word"] * 100),
    "don't we'll they've I'm",
    "<start_of_text> inside <end_of_text>",
    "naïve résumé façade",
    "",
]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("model", ["ViT-B-32", "standin"])
def test_tokenizer_file_gives_open_clips_tokens(model: str, model_data_dir: Path, tmp_path: Path) -> None:
    name = "ViT-B-32" if model == "ViT-B-32" else f"local-dir:{model_data_dir / 'models' / 'offline-standin'}"
    reference = open_clip.get_tokenizer(name)
    spec = write_tokenizer_file(reference, tmp_path / "tokenizer.json")
    assert spec is not None
    assert spec.kind == ("clip-bpe" if model == "ViT-B-32" else "hf")
    got = FileTokenizer(spec, tmp_path / "tokenizer.json")(PROMPTS)
    np.testing.assert_array_equal(got, reference(PROMPTS).numpy())


def test_views_equal_torchvisions_crop_resize_and_flip() -> None:
    rng_image = np.random.default_rng(7)
    image = Image.fromarray(rng_image.integers(0, 255, (180, 260, 3), dtype=np.uint8))
    rng, replay = np.random.default_rng(3), np.random.default_rng(3)
    flips = 0
    for _ in range(12):
        ours = random_resized_crop(image, 224, rng)
        (left, top, right, bottom), flip = sample_view(image.size, replay)  # the same draw, replayed
        flips += flip
        theirs = tvf.resized_crop(image, top, left, bottom - top, right - left, [224, 224], InterpolationMode.BICUBIC)
        theirs = tvf.hflip(theirs) if flip else theirs
        diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
        assert diff.max() == 0
    assert 0 < flips < 12


def _subprocess_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SHOTCACHE_DATA_DIR=str(data_dir), SHOTCACHE_MODEL="offline", SHOTCACHE_BACKEND="onnx")
    env["SHOTCACHE_THREADS"] = "2"
    return env


SERVE_SCRIPT = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from api.main import create_app
from app.images import ImageLimits, decode_image

train, test, forbidden = (json.loads(a) for a in sys.argv[1:4])
with TestClient(create_app()) as client:
    info = client.get("/v1/info").json()
    files = [("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p, _ in train]
    data = {"labels": [label for _, label in train], "name": "t", "method": "zero-shot"}
    task = client.post("/v1/tasks", files=files, data=data)
    assert task.status_code == 201, task.text
    answer = client.post(
        f"/v1/tasks/{task.json()['id']}/classify",
        files=[("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in test],
    )
    assert answer.status_code == 200, answer.text
    service = client.app.state.service
    images = [decode_image(Path(p).read_bytes(), ImageLimits()) for p in test]
    features = service.encoder.encode_images(images).tolist()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in forbidden),
    "backend": info["model"]["backend"],
    "backend_choice": info["model"]["backend_choice"],
    "labels": [r["label"] for r in answer.json()["results"]],
    "features": features,
}))
"""


def test_serving_from_exports_imports_no_torch_and_agrees_with_torch(
    encoder: Encoder, model_data_dir: Path, tmp_path: Path
) -> None:
    # The session encoder was loaded with torch and exported: the model card and tokenizer file exist now.
    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    root = dataset_dir("cifar10-mini")
    classes = CIFAR_CLASSES[:4]
    train = [(str(p), c) for c in classes for p in sorted((root / "train" / c).glob("*.jpg"))[:2]]
    test = [str(p) for c in classes for p in sorted((root / "test" / c).glob("*.jpg"))[:6]]
    run = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, json.dumps(train), json.dumps(test), json.dumps(FORBIDDEN)],
        env=_subprocess_env(data_dir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads(run.stdout.strip().splitlines()[-1])
    assert served["modules"] == []
    assert served["backend"] == "onnx"
    assert served["backend_choice"] is None  # configured, not chosen by `auto`
    # The same images through eager torch (the reference path) in this process.
    torch_image, torch_text = make_towers(encoder.loaded, "torch", Settings(data_dir=model_data_dir, threads=2))
    templates = ModelDefaults.for_key(encoder.config_key).templates  # the service's zero-shot prompts
    reference = Encoder(encoder.loaded, torch_image, torch_text, batch_size=8, templates=templates)
    from app.images import ImageLimits, decode_image

    images = [decode_image(Path(p).read_bytes(), ImageLimits()) for p in test]
    want = reference.encode_images(images)
    got = np.asarray(served["features"], dtype=np.float32)
    cosine = np.sum(got * want, axis=1)
    assert cosine.min() >= 0.999
    # Zero-shot top-1 over the task's classes with the stand-in's own prompts, as the service classified.
    text = reference.class_text_weights([_prompts(c) for c in classes])
    torch_labels = [classes[i] for i in np.argmax(want @ text.T, axis=1)]
    assert served["labels"] == torch_labels


def _prompts(name: str) -> object:
    from app.encoder.prompts import ClassPrompts

    return ClassPrompts(name)


def test_torch_is_used_until_the_model_card_is_written(encoder: Encoder, model_data_dir: Path, tmp_path: Path) -> None:
    """A data dir with the ONNX export but no model card (an older version's) loads the model with torch once,
    which writes the card; the next start is torch-free."""
    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    (data_dir / "exports").unlink()
    model_key = encoder.identity.model_id.replace("/", "_")
    (data_dir / "exports" / model_key).mkdir(parents=True)
    (data_dir / "exports" / model_key / "onnx").symlink_to(model_data_dir.resolve() / "exports" / model_key / "onnx")
    code = (
        "import sys\nfrom app.encoder import create_encoder\nfrom app.settings import Settings\n"
        "enc, _ = create_encoder(Settings())\nprint('torch' in sys.modules, enc.backend)"
    )
    env = _subprocess_env(data_dir)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)]
    runs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False))
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert [run.stdout.strip().splitlines()[-1] for run in runs] == ["True onnx", "False onnx"]
    assert (data_dir / "exports" / model_key / "model.json").is_file()


def test_the_torch_path_and_the_exported_path_tokenise_alike(encoder: Encoder, model_data_dir: Path) -> None:
    from app.encoder.exported import find_exported_model

    found = find_exported_model(Settings(model="offline", data_dir=model_data_dir))
    assert not isinstance(found, str), found
    model, _ = found
    np.testing.assert_array_equal(model.tokenize(PROMPTS), encoder.loaded.tokenize(PROMPTS))
    assert model.identity == encoder.identity
    assert model.preprocess == encoder.loaded.preprocess
    assert model.logit_scale == pytest.approx(encoder.logit_scale)
    assert Preprocessor(model.preprocess).size == encoder.input_size
