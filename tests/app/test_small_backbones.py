"""Small open_clip backbones by name: MobileCLIP's re-parameterisable blocks are fused at load time."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from app.encoder.load import ModelSource, load_model


def test_mobileclip2_is_reparameterised_at_load_and_keeps_its_features(tmp_path: Path) -> None:
    if "MobileCLIP2-S0" not in open_clip.list_models():
        pytest.skip("this open_clip has no MobileCLIP2-S0 config")
    torch.manual_seed(0)
    source = open_clip.create_model("MobileCLIP2-S0").eval()
    weights = tmp_path / "mobileclip2-s0.pt"
    torch.save(source.state_dict(), weights)
    loaded = load_model(ModelSource.parse("MobileCLIP2-S0", str(weights)), tmp_path)
    unfused = [m for m in source.modules() if callable(getattr(m, "reparameterize", None))]
    assert unfused  # the train-time model has branches to fuse...
    assert sum(1 for _ in loaded.model.modules()) < sum(1 for _ in source.modules())  # ...and the loaded one fused them
    pixels = torch.randn(2, 3, loaded.preprocess.size, loaded.preprocess.size)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(loaded.model.encode_image(pixels), source.encode_image(pixels))
    assert float(cosine.min()) >= 0.9999
    assert loaded.preprocess.size == 256
