"""Load a vision-language model through open_clip's factory, by name + pretrained tag, from a local
directory, or the offline stand-in; record its identity so stored features are never mixed across models.

Every failure is an `EncoderLoadError` naming the stage: "resolve" (which model), "weights" (download or
read the checkpoint), "build" (open_clip could not construct it), "tokenizer".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import EncoderLoadError
from .standin import CONFIG_FILE, RECIPE_FILE, STANDIN_NAME, ensure_standin, recipe_digest

log = logging.getLogger(__name__)

SourceKind = Literal["standin", "local-dir", "named"]
LOCAL_DIR_PREFIX = "local-dir:"
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `name` is the open_clip model name, or the directory for local-dir."""

    kind: SourceKind
    name: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, model: str, pretrained: str | None) -> ModelSource:
        model = model.strip()
        if model in ("offline", STANDIN_NAME):
            return cls("standin", STANDIN_NAME)
        if model.startswith(LOCAL_DIR_PREFIX):
            path = model.removeprefix(LOCAL_DIR_PREFIX).strip()
            if not path:
                raise EncoderLoadError("resolve", "`local-dir:` needs a directory path", "e.g. local-dir:/models/clip")
            return cls("local-dir", path)
        if not model:
            raise EncoderLoadError("resolve", "no model name given", "set SHOTCACHE_MODEL")
        return cls("named", model, pretrained or None)


@dataclass(frozen=True)
class ModelIdentity:
    """What features were computed with. Features of different identities must never share a task."""

    name: str  # open_clip model name, "offline-standin", or "local-dir:<folder name>"
    pretrained: str | None
    weights_sha256: str  # these exact weights: what an export is checked against
    dim: int
    # A model built here from a recipe (the stand-in) is named by its recipe, not by its weights, whose last
    # bits depend on the host's BLAS (standin.py); None for weights that come as a file.
    recipe_sha256: str | None = None

    @property
    def is_standin(self) -> bool:
        return self.name == STANDIN_NAME

    @property
    def model_id(self) -> str:
        tag = f"/{self.pretrained}" if self.pretrained else ""
        return f"{self.name}{tag}@{(self.recipe_sha256 or self.weights_sha256)[:12]}"

    def to_dict(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "recipe_sha256": self.recipe_sha256,
            "dim": self.dim,
            "standin": self.is_standin,
        }


# The eval preprocessing open_clip's configs name that preprocess.py implements exactly (pixel for pixel with
# open_clip's own transform): the resampling filter, and how the image becomes a square ("shortest": the short
# side to `size`, then a centre crop; "squash": both sides to `size`, aspect not kept). open_clip's "longest"
# (pad to a square) is not implemented.
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS or self.resize_mode not in RESIZE_MODES:
            raise EncoderLoadError(
                "build",
                f"unsupported preprocessing {self.interpolation}/{self.resize_mode}",
                f"interpolation one of {', '.join(INTERPOLATIONS)}; resize mode one of {', '.join(RESIZE_MODES)}",
            )
        if self.size < 1 or min(self.std) <= 0:
            raise EncoderLoadError("build", f"unusable preprocessing: size {self.size}, std {self.std}")

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg["size"]
        side = int(size if isinstance(size, int) else size[0])
        if not isinstance(size, int) and len(set(size)) != 1:
            raise EncoderLoadError("build", f"non-square input size {size} is not supported")
        mean = tuple(float(v) for v in cfg["mean"])
        std = tuple(float(v) for v in cfg["std"])
        interpolation = str(cfg.get("interpolation", "bicubic"))
        resize_mode = str(cfg.get("resize_mode", "shortest"))
        return cls(side, mean, std, interpolation, resize_mode)  # type: ignore[arg-type]


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with what the encoder needs around it."""

    model: Any  # open_clip CLIP / CustomTextCLIP (torch.nn.Module)
    tokenizer: Any
    preprocess: PreprocessConfig
    identity: ModelIdentity
    logit_scale: float
    config_key: str  # key into configs/models.json

    def tokenize(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """[n, context length] token ids by open_clip's own tokenizer."""
        return np.ascontiguousarray(self.tokenizer(list(texts)).numpy(), dtype=np.int64)


def load_model(source: ModelSource, data_dir: Path, *, cache_dir: Path | None = None) -> LoadedModel:
    """Load `source`; the stand-in is built under `data_dir` on first use."""
    if source.kind == "standin":
        folder = ensure_standin(data_dir)
        return _load_local_dir(folder, identity_name=STANDIN_NAME, config_key=STANDIN_NAME)
    if source.kind == "local-dir":
        folder = Path(source.name).expanduser().resolve()
        recipe = folder / RECIPE_FILE
        if recipe.is_file():  # a copy of the stand-in (e.g. baked into an image)
            return _load_local_dir(folder, identity_name=STANDIN_NAME, config_key=STANDIN_NAME)
        return _load_local_dir(folder, identity_name=f"local-dir:{folder.name}", config_key="*")
    return _load_named(source, cache_dir)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect; without it a download would hang in retries."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_named(source: ModelSource, cache_dir: Path | None) -> LoadedModel:
    import open_clip

    name = source.name
    if name not in open_clip.list_models():
        raise EncoderLoadError("resolve", f"open_clip has no model named {name!r}", "see open_clip.list_models()")
    pretrained = source.pretrained
    kwargs: dict[str, Any] = {}
    if pretrained and Path(pretrained).is_file():
        # open_clip cannot know which activation a bare file was trained with: OpenAI's checkpoints need
        # the `-quickgelu` model names (e.g. ViT-B-32-quickgelu), as the README says.
        weights_desc = f"file {pretrained}"
    elif pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise EncoderLoadError(
                "resolve", f"{pretrained!r} is neither a pretrained tag of {name} nor a file", f"tags: {tags}"
            )
        # OpenAI's weights were trained with QuickGELU; building them with GELU silently costs accuracy.
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        weights_desc = f"pretrained tag {pretrained!r}"
    else:
        raise EncoderLoadError(
            "resolve", f"no pretrained weights given for {name}", "set SHOTCACHE_PRETRAINED to a tag or a file"
        )
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, cache_dir=str(cache_dir) if cache_dir else None, **kwargs
        )
    except Exception as exc:  # open_clip raises RuntimeError/OSError/ValueError variously
        raise EncoderLoadError(
            "weights",
            f"could not load {name} with {weights_desc}: {exc}",
            "without internet, put the weights in a file and set SHOTCACHE_PRETRAINED to its path, "
            "or use SHOTCACHE_MODEL=local-dir:PATH, or SHOTCACHE_MODEL=offline for the stand-in",
        ) from exc
    tokenizer = _tokenizer(name)
    # A weights file is identified by its name (the hash identifies its content), not its location.
    label = Path(pretrained).name if weights_desc.startswith("file") else pretrained
    return _finish(model, tokenizer, name, label, config_key=name)


def _load_local_dir(folder: Path, *, identity_name: str, config_key: str) -> LoadedModel:
    import open_clip

    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise EncoderLoadError(
            "resolve", f"{config_path} not found", "a local-dir model needs open_clip_config.json and its weights"
        )
    try:
        config = json.loads(config_path.read_text())
        text_cfg = dict(config["model_cfg"]["text_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EncoderLoadError("resolve", f"unreadable {config_path}: {exc}") from exc
    overrides: dict[str, Any] = {}
    # A Hugging Face text tower named relative to the folder ("."), as the stand-in does, is made
    # absolute here so the folder can be moved or baked into an image.
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) == ".":
            text_cfg[key] = str(folder)
            # The full checkpoint in the folder holds the text weights; transformers must not look for its own.
            text_cfg["hf_model_pretrained"] = False
            overrides["text_cfg"] = text_cfg
    try:
        model = open_clip.create_model(f"{LOCAL_DIR_PREFIX}{folder}", **overrides)
    except Exception as exc:
        raise EncoderLoadError("weights", f"open_clip could not load {folder}: {exc}") from exc
    tokenizer = _tokenizer(f"{LOCAL_DIR_PREFIX}{folder}")
    recipe_sha256 = recipe_digest(folder) if identity_name == STANDIN_NAME else None
    return _finish(model, tokenizer, identity_name, None, config_key=config_key, recipe_sha256=recipe_sha256)


def _tokenizer(name: str) -> Any:
    import open_clip

    try:
        return open_clip.get_tokenizer(name)
    except Exception as exc:
        raise EncoderLoadError("tokenizer", f"could not load the tokenizer of {name}: {exc}") from exc


def _finish(
    model: Any, tokenizer: Any, name: str, pretrained: str | None, *, config_key: str, recipe_sha256: str | None = None
) -> LoadedModel:
    model.eval()
    model = _reparameterize(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    preprocess = PreprocessConfig.from_open_clip(model.visual.preprocess_cfg)
    dim = _embed_dim(model, preprocess.size)
    identity = ModelIdentity(name, pretrained, weights_sha256(model), dim, recipe_sha256)
    logit_scale = float(math.exp(float(model.logit_scale.detach().reshape(-1)[0])))
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise EncoderLoadError("build", f"the checkpoint's logit scale {logit_scale} is unusable")
    log.info("loaded %s (dim %d, logit scale %.2f)", identity.model_id, dim, logit_scale)
    return LoadedModel(model, tokenizer, preprocess, identity, logit_scale, config_key)


def _reparameterize(model: Any) -> Any:
    """Fuse the train-time branches of re-parameterisable blocks (MobileCLIP's FastViT / MobileOne) into the
    single convolutions they are at inference: fewer ops to run and to export. Before hashing, so the identity
    names the weights that actually run."""
    if not any(callable(getattr(m, "reparameterize", None)) for m in model.modules()):
        return model
    from timm.utils.model import reparameterize_model

    log.info("re-parameterising %s for inference", type(model.visual).__name__)
    return reparameterize_model(model, inplace=True)


def _embed_dim(model: Any, size: int) -> int:
    import torch

    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])


def weights_sha256(model: Any) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order.

    Hashing the loaded tensors rather than a file identifies the weights whatever format they came in.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
