"""The OpenVINO backends (the `openvino` extra): IR exports made from the verified ONNX export, checked against
torch, cached with their weights file under the manifest's checksums, and opened torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.encoder.backends import export
from app.encoder.backends.cache import read_valid
from app.encoder.exported import open_towers
from tests.app.test_backends import tiny_encoder, tiny_model

pytest.importorskip("openvino", reason="the `openvino` extra is not installed")


def test_openvino_export_is_close_to_torch_cached_and_checked(tmp_path: Path) -> None:
    loaded = tiny_model(6)
    encoder = tiny_encoder(loaded, "openvino", tmp_path)
    assert encoder.backend == "openvino"
    reference = tiny_encoder(loaded, "torch", tmp_path)
    pixels = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    cosine = np.sum(encoder.encode_pixels(pixels) * reference.encode_pixels(pixels), axis=1)
    assert cosine.min() >= 0.99
    texts = ["a cat", "a dog", "a red car"]
    assert np.sum(encoder.encode_texts(texts) * reference.encode_texts(texts), axis=1).min() >= 0.99

    found = export.ensure_export(loaded, "openvino", tmp_path)
    manifest = json.loads((found.folder / export.MANIFEST).read_text())
    assert [e["file"] for e in manifest["towers"]["image"]["extra_files"]] == ["image.bin"]
    # Torch-free: the same export opened by the serving path's helper gives the same features.
    image, _ = open_towers(found, 1)
    np.testing.assert_allclose(image(pixels), encoder._image_tower(pixels), rtol=1e-3, atol=1e-3)
    # A damaged weights file is detected, and the next start exports again.
    (found.folder / "image.bin").write_bytes(b"\0" * 16)
    assert "image.bin" in str(read_valid(found.folder, loaded.identity.weights_sha256))
    before = export.exports_made()
    again = export.ensure_export(loaded, "openvino", tmp_path)
    assert export.exports_made() == before + 1
    assert not isinstance(read_valid(again.folder, loaded.identity.weights_sha256), str)
