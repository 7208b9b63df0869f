"""Small open_clip backbones by name: MobileCLIP's re-parameterisable blocks are fused at load time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from app.encoder.errors import EncoderLoadError
from app.encoder.load import ModelSource, PreprocessConfig, load_model
from app.encoder.preprocess import Preprocessor


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


def _open_clip_pixels(cfg: dict[str, object], images: list[Image.Image]) -> np.ndarray:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    keys = ("size", "mean", "std", "interpolation", "resize_mode")
    transform = image_transform_v2(PreprocessCfg(**{k: cfg[k] for k in keys}), is_train=False)  # type: ignore[arg-type]
    return np.stack([transform(img).numpy() for img in images])


@pytest.mark.parametrize(
    ("model", "tag"),
    [("MobileCLIP2-S0", "dfndr2b"), ("MobileCLIP-S1", "datacompdr"), ("ViT-B-16-SigLIP", "webli")],
)
def test_pretrained_preprocessing_is_accepted_and_matches_open_clip(model: str, tag: str) -> None:
    """MobileCLIP's pretrained configs ask for bilinear resizing and mean 0 / std 1, SigLIP's for a squash
    resize: the config is data, and the pixels are open_clip's own (within float rounding)."""
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    if not pretrained:
        pytest.skip(f"this open_clip has no {model}/{tag}")
    cfg = {"size": 256, **pretrained}
    config = PreprocessConfig.from_open_clip(cfg)
    assert (config.interpolation, config.resize_mode) == (cfg["interpolation"], cfg["resize_mode"])
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((640, 480), (333, 517), (90, 60))
    ]
    ours = Preprocessor(config).eval_pixels(images)
    np.testing.assert_allclose(ours, _open_clip_pixels(cfg, images), atol=1e-4)


def test_mobileclip_preprocessing_differs_from_the_default_one() -> None:
    """The test above could pass by ignoring the config: bilinear + mean 0 / std 1 must change the pixels."""
    cfg = {"size": 256, **open_clip.get_pretrained_cfg("MobileCLIP2-S0", "dfndr2b")}
    image = [Image.fromarray(np.random.default_rng(4).integers(0, 256, (300, 400, 3), dtype=np.uint8))]
    mobile = Preprocessor(PreprocessConfig.from_open_clip(cfg)).eval_pixels(image)
    default = _open_clip_pixels({**cfg, "interpolation": "bicubic"}, image)
    assert np.abs(mobile - default).max() > 0.01
    assert mobile.min() >= 0.0  # mean 0 / std 1: pixels stay in [0, 1]
    assert mobile.max() <= 1.0


def test_an_unimplemented_resize_mode_is_refused_by_name() -> None:
    with pytest.raises(EncoderLoadError, match="longest"):
        PreprocessConfig.from_open_clip({"size": 224, "mean": (0, 0, 0), "std": (1, 1, 1), "resize_mode": "longest"})
