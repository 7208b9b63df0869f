"""The OpenVINO backends (the `openvino` extra): IR exports converted from torch (the ONNX export when that fails),
checked against torch, cached with their weights file under the manifest's checksums, and opened torch-free;
the int8 tower keeps every attention's output projection in floating point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.encoder.backends import export
from app.encoder.backends.cache import read_valid
from app.encoder.exported import open_towers
from app.encoder.load import LoadedModel
from tests.app.test_backends import Tiny, tiny_encoder, tiny_model

pytest.importorskip("openvino", reason="the `openvino` extra is not installed")

from app.encoder.backends import openvino_export
from app.encoder.backends.openvino_backend import OpenVinoTower


class TinyViT(Tiny):
    """Tiny's text tower under an image tower of 4 x 4 patches and two self-attention blocks (ViT's shape)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        self.patches = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = torch.nn.ModuleList(torch.nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2))
        self.head = torch.nn.Linear(16, 16)
        with torch.no_grad():
            for parameter in [*self.patches.parameters(), *self.blocks.parameters(), *self.head.parameters()]:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = tokens + block(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))  # type: ignore[no-any-return]


def tiny_vit(seed: int = 3) -> LoadedModel:
    return tiny_model(seed, TinyViT, "tiny-vit")


def test_int8_keeps_attention_output_projections_in_floating_point(tmp_path: Path) -> None:
    import openvino

    loaded = tiny_vit()
    found = export.ensure_export(loaded, "openvino-int8", tmp_path)
    assert found.image.precision == "int8"
    assert "converted from torch" in str(found.image.note)
    # Its text tower keeps int8 weights (for memory), checked at the int8 bound.
    assert found.text.precision == "int8"
    assert str(found.text.note).endswith("int8 weights (NNCF)")
    assert found.text.check["min_cosine"] >= 0.999
    assert sorted(p.name for p in found.folder.iterdir() if p.name.startswith("text")) == ["text.bin", "text.xml"]
    assert "2 attention output projections" in str(found.image.note)
    quantized = openvino.Core().read_model(str(found.image.path))
    matmul_inputs = [
        openvino_export.through_layout(op.input_value(0).get_node()).get_type_name()
        for op in quantized.get_ops()
        if op.get_type_name() == "MatMul"
    ]
    # Both output projections read the attention directly; every other MatMul reads quantized values.
    assert matmul_inputs.count("ScaledDotProductAttention") == 2
    assert "FakeQuantize" in matmul_inputs
    # The same two are found in the graph converted from the ONNX export (a fused attention there too).
    onnx_graph = openvino.convert_model(str(export.ensure_export(loaded, "onnx", tmp_path).image.path))
    assert len(openvino_export.attention_output_projections(onnx_graph)) == 2


def test_a_tower_that_torch_cannot_convert_is_converted_from_the_onnx_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(loaded: LoadedModel, tower: str) -> None:
        raise RuntimeError("this frontend cannot trace the model")

    monkeypatch.setattr(openvino_export, "_from_torch", refuse)
    loaded = tiny_model(7)
    found = export.ensure_export(loaded, "openvino", tmp_path)
    assert found.image.note == found.text.note == "converted from ONNX"
    assert (export.export_dir(loaded, "onnx", tmp_path) / "image.onnx").is_file()
    assert found.image.check["min_cosine"] >= 0.99


def test_openvino_export_is_close_to_torch_cached_and_checked(tmp_path: Path) -> None:
    loaded = tiny_model(6)
    encoder = tiny_encoder(loaded, "openvino", tmp_path)
    assert encoder.backend == "openvino"
    reference = tiny_encoder(loaded, "torch", tmp_path)
    crops = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    cosine = np.sum(encoder.encode_crops(crops) * reference.encode_crops(crops), axis=1)
    assert cosine.min() >= 0.99
    texts = ["a cat", "a dog", "a red car"]
    assert np.sum(encoder.encode_texts(texts) * reference.encode_texts(texts), axis=1).min() >= 0.99

    found = export.ensure_export(loaded, "openvino", tmp_path)
    assert found.image.note == found.text.note == "converted from torch"
    assert not export.export_dir(loaded, "onnx", tmp_path).exists()  # the ONNX export is only the fallback
    manifest = json.loads((found.folder / export.MANIFEST).read_text())
    assert [e["file"] for e in manifest["towers"]["image"]["extra_files"]] == ["image.bin"]
    # Torch-free: the same export opened by the serving path's helper gives the same features.
    image, _ = open_towers(found, 1, loaded.preprocess)
    np.testing.assert_allclose(image(crops), encoder._image_tower(crops), rtol=1e-3, atol=1e-3)
    # A damaged weights file is detected, and the next start exports again.
    (found.folder / "image.bin").write_bytes(b"\0" * 16)
    assert "image.bin" in str(read_valid(found.folder, loaded.identity.weights_sha256))
    before = export.exports_made()
    again = export.ensure_export(loaded, "openvino", tmp_path)
    assert export.exports_made() == before + 1
    assert not isinstance(read_valid(again.folder, loaded.identity.weights_sha256), str)


def test_int8_falls_back_to_the_generic_recipe_when_the_transformer_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quantize = openvino_export._quantize
    recipes = []

    def transformer_breaks(model: Any, pixels: Any, recipe: str, kept: list[str]) -> Any:
        recipes.append(recipe)
        if recipe == "transformer":
            raise RuntimeError("NNCF could not quantize this graph")
        return quantize(model, pixels, recipe, kept)

    monkeypatch.setattr(openvino_export, "_quantize", transformer_breaks)
    found = export.ensure_export(tiny_vit(5), "openvino-int8", tmp_path)  # other weights: not a cached export
    assert recipes == ["transformer", "generic"]
    assert "(generic recipe), converted from torch" in str(found.image.note)
    assert found.image.precision == "int8"
    assert found.image.path.name == "image.xml"
    assert sorted(p.name for p in found.folder.iterdir()) == [
        "image.bin",
        "image.xml",
        "manifest.json",
        "text.bin",
        "text.xml",
    ]


def test_a_bf16_tower_below_autos_bound_is_exported_and_run_at_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in's case: bf16 passes the export check's floor but not `auto`'s bf16 bound, so the tower is
    kept at fp32 (still a candidate for `auto`) instead of a bf16 tower `auto` would drop, and the other tower,
    whose bf16 passed, goes to fp32 with it."""
    from app.encoder.choice import FIDELITY_MIN_COSINE

    verify = openvino_export._verify
    precisions = []

    def bf16_a_little_off(loaded: LoadedModel, tower: Any, xml: Path, precision: str, threads: int) -> Any:
        precisions.append((tower, precision))
        check = dict(verify(loaded, tower, xml, precision, threads))
        if precision == "bf16" and tower == "image":  # between the export floor and auto's bound
            check["min_cosine"] = (openvino_export.LOW_PRECISION_MIN_COSINE + FIDELITY_MIN_COSINE["bf16"]) / 2
        return check

    monkeypatch.setattr(openvino_export, "supports_bf16", lambda: True)
    monkeypatch.setattr(openvino_export, "_verify", bf16_a_little_off)
    loaded = tiny_model(8)
    found = export.ensure_export(loaded, "openvino", tmp_path)
    assert precisions == [("text", "bf16"), ("image", "bf16"), ("image", "fp32"), ("text", "fp32")]
    assert found.image.precision == found.text.precision == "fp32"
    assert "bf16 rejected: min cosine 0.99450" in str(found.image.note)
    assert "fp32 as the other tower" in str(found.text.note)
    assert found.image.check["min_cosine"] >= 0.9999  # the fp32 runs' own checks
    assert found.text.check["min_cosine"] >= 0.9999
    image, text = open_towers(found, 1, loaded.preprocess)
    assert isinstance(image, OpenVinoTower)
    assert isinstance(text, OpenVinoTower)
    assert image.precision == text.precision == "fp32"  # compiled with the f32 inference hint
    crops = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    reference = tiny_encoder(loaded, "torch", tmp_path)._image_tower(crops)
    cosine = np.sum(image(crops) * reference, axis=1) / (
        np.linalg.norm(image(crops), axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999
