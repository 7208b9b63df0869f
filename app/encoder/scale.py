"""Refit the stand-in's logit scale on a folder of unlabelled photos (`build-offline-model
--fit-scale-images DIR`): the original ImageNet classifier is the teacher, so no labels are needed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from app.images import ImageError, ImageLimits, decode_image

from .load import ModelSource, load_model
from .preprocess import Preprocessor
from .standin import build_standin, fit_logit_scale

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def refit_standin_scale(folder: Path, images_dir: Path, *, threads: int) -> float:
    """Fit the scale on every image under `images_dir` and rebuild `folder` with it; returns it."""
    torch.set_num_threads(threads)
    loaded = load_model(ModelSource("local-dir", str(folder)), folder.parent)
    preprocessor = Preprocessor(loaded.preprocess)
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images under {images_dir}")
    features = []
    for start in range(0, len(files), 64):
        images = []
        for path in files[start : start + 64]:
            try:
                images.append(decode_image(path.read_bytes(), ImageLimits(max_file_bytes=1 << 30)))
            except ImageError as exc:
                log.warning("skipped %s: %s", path, exc)
        if images:
            with torch.inference_mode():
                pixels = torch.from_numpy(preprocessor.eval_pixels(images))
                features.append(loaded.model.encode_image(pixels).numpy())
    scale = fit_logit_scale(np.concatenate(features).astype(np.float32), folder)
    log.info("fitted logit scale %.3f on %d images", scale, sum(f.shape[0] for f in features))
    build_standin(folder, logit_scale=scale)
    return scale
