"""Encoder throughput per backend and batch size, and image decoding + preprocessing against it."""

from __future__ import annotations

import gc
import io
import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from app.encoder.backends.export import compare
from app.encoder.encoder import Encoder
from app.encoder.factory import ModelDefaults, available_backends
from app.images import ImageLimits, decode_image

from .common import (
    SUSTAINED_ROUNDS,
    BenchConfig,
    backend_encoders,
    load_bench_model,
    model_label,
    per_second,
    sustained_per_second,
    table,
    time_calls,
)

log = logging.getLogger(__name__)


def real_images(config: BenchConfig, count: int, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """`count` real test images (cifar10-mini, then textile-defects), resized to `size` if given; random
    smooth images when the datasets are absent."""
    paths = sorted((config.datasets / "cifar10-mini" / "test").glob("*/*.jpg"))[::7]
    paths += sorted((config.datasets / "textile-defects" / "test").glob("*/*.jpg"))[::5]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        if paths:
            with Image.open(paths[i * 7 % len(paths)]) as img:
                image = img.convert("RGB")
        else:
            image = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64))
        out.append(image.resize(size, Image.Resampling.BICUBIC) if size else image)
    return out


def gemm_peaks() -> dict[str, float]:
    """GFLOP/s of a large square matmul in fp32 and bf16 (AMX where the CPU has it): the compute limits."""
    import torch

    out = {}
    n = 2048
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        out[label] = 2 * n**3 / best / 1e9
    return out


def image_gflops(loaded: Any) -> float:
    """GFLOP of one image through the image tower (2 x multiply-accumulates of matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = loaded.preprocess.size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        loaded.model.encode_image(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops()) / 1e9


def bench_encoders(config: BenchConfig) -> dict[str, Any]:
    """img/s per (model, backend, batch), text/s, cosine to torch fp32 on real images, export time, and the
    fp32 / bf16 compute limits (GEMM peak / model FLOPs) measured in the same run."""
    rng = np.random.default_rng(0)
    peaks = gemm_peaks()
    out: dict[str, Any] = {"rows": [], "gemm_gflops": peaks}
    backends = ("torch", *available_backends())
    for name in config.models:
        loaded = load_bench_model(name, config)
        default = ModelDefaults.for_key(loaded.config_key).default_backend
        gflops = image_gflops(loaded)
        probes = None
        reference = None
        for backend, encoder, prepare in backend_encoders(loaded, backends, config):
            if probes is None:
                probes = encoder.preprocessor.eval_crops(real_images(config, config.probes))
            features = encoder.encode_crops(probes)
            if reference is None:
                reference = features
            cosine = compare(features, reference)
            row: dict[str, Any] = {
                "model": model_label(loaded),
                "model_id": loaded.identity.model_id,
                "dim": loaded.identity.dim,
                "backend": backend,
                "used": encoder.backend,
                "default": backend == default,
                "prepare_s": prepare,
                "min_cosine": cosine["min_cosine"],
                "mean_cosine": cosine["mean_cosine"],
                "image_gflops": gflops,
                "bf16_limit_img_per_s": peaks["bf16"] / gflops,
                "fp32_limit_img_per_s": peaks["fp32"] / gflops,
            }
            row["img_per_s"], row["img_per_s_sustained"], row["text_per_s"] = _speeds(encoder, config, rng)
            log.info("bench %s %s -> %s: %s img/s", name, backend, encoder.backend, row["img_per_s"])
            out["rows"].append(row)
            del encoder
        del loaded
        gc.collect()
    return out


def _speeds(
    encoder: Encoder, config: BenchConfig, rng: np.random.Generator
) -> tuple[dict[int, float], dict[int, float], float]:
    """img/s at each batch size (random uint8 crops, normalised by the tower as served: speed does not depend on
    content) of the fastest call and of the best round of calls (`sustained_per_second`), and texts/s at the
    largest batch."""
    size = encoder.input_size
    images, sustained = {}, {}
    for batch in config.batches:
        crops = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        times = time_calls(
            lambda c=crops: encoder.encode_crops(c),  # type: ignore[misc]
            min_seconds=config.min_seconds,
            min_calls=config.min_calls,
        )
        images[batch] = per_second(batch, times)
        sustained[batch] = sustained_per_second(batch, times)
    prompts = [f"a photo of a {i}-th thing." for i in range(max(config.batches))]
    times = time_calls(
        lambda: encoder.encode_texts(prompts), min_seconds=config.min_seconds / 2, min_calls=config.min_calls
    )
    return images, sustained, per_second(len(prompts), times)


def encoder_markdown(result: dict[str, Any], batches: tuple[int, ...]) -> str:
    rows = []
    eager: dict[tuple[str, int], float] = {}
    for r in result["rows"]:
        if r["backend"] == "torch":
            for b in batches:
                eager[(r["model"], b)] = r["img_per_s"][b]
    for r in result["rows"]:
        used = r["backend"] if r["used"] == r["backend"] else f"{r['backend']} → {r['used']}"
        cells: list[object] = [r["model"], used + (" (default)" if r["default"] else "")]
        for b in batches:
            ratio = r["img_per_s"][b] / eager[(r["model"], b)]
            cells.append(f"{r['img_per_s'][b]:.1f} ({ratio:.1f}x)")
        top = max(batches)
        limit = r.get("bf16_limit_img_per_s")
        cells.append(f"{r['img_per_s'][top] / limit:.0%} of {limit:.0f}" if limit else "n/a")
        sustained = r.get("img_per_s_sustained")  # absent from runs before the sixth session
        cells.append(" / ".join(f"{sustained[b]:.1f}" for b in batches) if sustained else "n/a")
        cells += [f"{r['text_per_s']:.1f}", f"{r['mean_cosine']:.5f} / {r['min_cosine']:.5f}", f"{r['prepare_s']:.1f}"]
        rows.append(cells)
    header = [
        "model",
        "backend",
        *[f"img/s batch {b} (x eager fp32)" for b in batches],
        f"batch {max(batches)} of the bf16 limit (img/s)",
        f"img/s batch {' / '.join(map(str, batches))}, best of {SUSTAINED_ROUNDS} rounds",
        f"texts/s batch {max(batches)}",
        "cosine to torch fp32, mean / min (real images)",
        "load + export s",
    ]
    text = table(header, rows, "ll" + "r" * (len(header) - 2))
    peaks = result.get("gemm_gflops")
    if peaks:
        flops = {r["model"]: r["image_gflops"] for r in result["rows"] if "image_gflops" in r}
        models = ", ".join(f"{m} {g:.2f}" for m, g in flops.items())
        text += (
            f"\n\nCompute limits measured in this run: 2048² GEMM peak {peaks['fp32']:.0f} GFLOP/s fp32, "
            f"{peaks['bf16']:.0f} GFLOP/s bf16; image-tower GFLOP per image: {models}. The bf16 limit is the bf16 "
            "peak over the model's FLOPs."
        )
    return text


# ---- decoding -----------------------------------------------------------------------------------
def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_inputs(config: BenchConfig) -> dict[str, list[bytes]]:
    """JPEG files of several sizes; large ones are real images scaled up with mild sensor-like noise."""
    rng = np.random.default_rng(1)
    out: dict[str, list[bytes]] = {}
    small = sorted((config.datasets / "cifar10-mini" / "test").glob("*/*.jpg"))[:16]
    if small:
        out["32x32 (cifar10-mini)"] = [p.read_bytes() for p in small]
    textile = sorted((config.datasets / "textile-defects" / "test").glob("*/*.jpg"))[:16]
    if textile:
        out["250x250 (textile-defects)"] = [p.read_bytes() for p in textile]
    for width, height in ((640, 480), (1920, 1080)):
        files = []
        for image in real_images(config, 8, (width, height)):
            noisy = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3))
            files.append(jpeg_bytes(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))))
        out[f"{width}x{height} (scaled-up photo + noise)"] = files
    return out


def bench_decode(config: BenchConfig, input_size: int = 224) -> dict[str, Any]:
    """ms per image for decode (with `Image.draft`, as the service does) and for the eval preprocessing."""
    from app.encoder.load import PreprocessConfig
    from app.encoder.preprocess import Preprocessor

    preprocessor = Preprocessor(PreprocessConfig(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest"))
    limits = ImageLimits(max_file_bytes=50 * 1024 * 1024)
    rows = []
    for label, files in decode_inputs(config).items():
        decoded = [decode_image(data, limits, min_decode_side=2 * input_size) for data in files]
        decode_times = time_calls(
            lambda f=files: [decode_image(d, limits, min_decode_side=2 * input_size) for d in f],  # type: ignore[misc]
            min_seconds=config.min_seconds / 3,
            min_calls=2,
        )
        pre_times = time_calls(
            lambda d=decoded: preprocessor.eval_crops(d),  # type: ignore[misc]
            min_seconds=config.min_seconds / 3,
            min_calls=2,
        )
        rows.append(
            {
                "input": label,
                "decoded_size": f"{decoded[0].size[0]}x{decoded[0].size[1]}",
                "kb": sum(len(f) for f in files) / len(files) / 1024,
                "decode_ms": 1000 / per_second(len(files), decode_times),
                "preprocess_ms": 1000 / per_second(len(files), pre_times),
            }
        )
    return {"rows": rows, "input_size": input_size}


def decode_markdown(result: dict[str, Any], encoder: dict[str, Any] | None) -> str:
    """The decode table, with the default backends' encoder ms/image beside it."""
    rows = [
        [
            r["input"],
            f"{r['kb']:.0f}",
            r["decoded_size"],
            f"{r['decode_ms']:.2f}",
            f"{r['preprocess_ms']:.2f}",
            f"{r['decode_ms'] + r['preprocess_ms']:.2f}",
        ]
        for r in result["rows"]
    ]
    text = table(["input JPEG", "KB", "decoded at (draft)", "decode ms/img", "eval crop ms/img", "total ms/img"], rows)
    if encoder:
        lines = []
        for r in encoder["rows"]:
            if r["default"]:
                per_image = {b: 1000 / v for b, v in r["img_per_s"].items()}
                cells = ", ".join(f"{v:.1f} ms at batch {b}" for b, v in per_image.items())
                lines.append(f"- encoder time per image, {r['model']} with its default `{r['used']}`: {cells}")
        text += "\n\n" + "\n".join(lines)
    return text


def raw_rate(
    encoder: dict[str, Any] | None, model_prefix: str, backend: str, batch: int, *, sustained: bool = False
) -> float | None:
    """Raw img/s of a model on `backend` (the one a server ended up using) at `batch`, from the encoder section:
    of its fastest call, or with `sustained` of its best round of calls (None where the run has no such rate)."""
    key = "img_per_s_sustained" if sustained else "img_per_s"
    for r in (encoder or {}).get("rows", []):
        rates = r.get(key) or {}
        if r["used"] == backend and r["model"].startswith(model_prefix) and batch in rates:
            return float(rates[batch])
    return None
