"""Image preprocessing for the encoder, in PIL + numpy (no torchvision), so every backend shares it.

- eval transform: open_clip's, as the model's config names it: shortest side -> input size then a centre crop
  (`shortest`, open_clip's default) or both sides -> input size (`squash`), with its resampling filter (bicubic,
  or bilinear as MobileCLIP's pretrained configs say), then normalise with its mean / std;
- augmented views (methods.md): RandomResizedCrop(size, scale 0.5-1, ratio 3/4-4/3, bicubic) then a
  horizontal flip with p = 0.5, drawn from a numpy generator seeded per image, so the same shot always
  gets the same views (a task rebuilt from its shots gives the same keys).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.images import resize_center_crop

from .load import PreprocessConfig

Pixels = npt.NDArray[np.float32]  # [n, 3, H, W], normalised
Crops = npt.NDArray[np.uint8]  # [n, H, W, 3] RGB: the transform's S x S images before normalisation


def check_crops(crops: npt.NDArray[np.generic], size: int) -> None:
    """What every image entering the encoder must be: uint8 [n, size, size, 3] (ValueError otherwise)."""
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(f"crops must be uint8 [n, {size}, {size}, 3], got {crops.dtype} {list(crops.shape)}")


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}  # load.INTERPOLATIONS

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class Preprocessor:
    config: PreprocessConfig

    @property
    def size(self) -> int:
        return self.config.size

    def eval_pixels(self, images: Sequence[Image.Image]) -> Pixels:
        """[n, 3, S, S] normalised pixels of the eval transform."""
        return self.normalise(self.eval_crops(images))

    def eval_crops(self, images: Sequence[Image.Image]) -> Crops:
        """[n, S, S, 3] uint8: the eval transform before normalisation (a quarter of the float bytes; the
        encoder queue normalises a batch of them into its own reused buffer)."""
        return self._crops([self.eval_crop(img) for img in images])

    def normalise(self, crops: Crops, out: Pixels | None = None) -> Pixels:
        """(x / 255 - mean) / std of each crop, channels first, as torchvision's ToTensor + Normalize, into
        `out` (shape [n, 3, S, S]; a new array when None)."""
        n = crops.shape[0]
        if out is None:
            out = np.empty((n, 3, self.size, self.size), dtype=np.float32)
        elif out.shape != (n, 3, self.size, self.size) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(n, 3, self.size, self.size)}, got {out.dtype} {out.shape}")
        scale, offset = self._affine
        for i in range(n):
            # Straight from the uint8 view (no float copy of the image): x * scale - offset, in place.
            np.multiply(crops[i].transpose(2, 0, 1), scale, out=out[i])
            out[i] -= offset
        return out

    @functools.cached_property
    def _affine(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(1 / (255 std), mean / std), shaped [3, 1, 1]: normalisation as one multiply and one subtract."""
        std = np.asarray(self.config.std, dtype=np.float32).reshape(3, 1, 1)
        mean = np.asarray(self.config.mean, dtype=np.float32).reshape(3, 1, 1)
        return 1.0 / (255.0 * std), mean * (1.0 / std)

    def eval_crop(self, image: Image.Image) -> Image.Image:
        """The eval transform's S x S image, before normalisation."""
        resample = RESAMPLING[self.config.interpolation]
        if self.config.resize_mode == "squash":
            return image.resize((self.size, self.size), resample)
        return resize_center_crop(image, self.size, resample)

    def view_crops(self, images: Sequence[Image.Image], views: int, seeds: Sequence[int]) -> Crops:
        """[n * views, S, S, 3] uint8: rows i*views .. i*views+views-1 are image i's views.

        views == 1 is the eval transform (no randomness), as in the papers' 'no augmentation' setting.
        """
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        if views == 1:
            return self.eval_crops(images)
        crops: list[Image.Image] = []
        for image, seed in zip(images, seeds, strict=True):
            rng = np.random.default_rng(seed)
            crops.extend(random_resized_crop(image, self.size, rng) for _ in range(views))
        return self._crops(crops)

    def _crops(self, crops: Sequence[Image.Image]) -> Crops:
        out = np.empty((len(crops), self.size, self.size, 3), dtype=np.uint8)
        for i, crop in enumerate(crops):
            out[i] = np.asarray(crop)
        return out


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop then RandomHorizontalFlip, drawn from `rng`. Crop, then resize, as
    torchvision does: resizing with a `box` would filter in the pixels just outside it."""
    box, flip = sample_view(image.size, rng)
    crop = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop


def sample_view(image_size: tuple[int, int], rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """One view's crop box (left, top, right, bottom) and whether it is flipped: torchvision's RandomResizedCrop
    sampling (10 tries, then a centre crop within the ratio range), then a flip with p = 0.5."""
    width, height = image_size
    area = width * height
    box = None
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            w, h = width, round(width / CROP_RATIO[0])
        elif in_ratio > CROP_RATIO[1]:
            w, h = round(height * CROP_RATIO[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    return box, bool(rng.uniform() < FLIP_PROBABILITY)
