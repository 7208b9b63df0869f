"""Few-shot accuracy of every backend with the stand-in on ../shared/datasets (`shotcache eval`'s code), the
cosine between each backend's features and torch fp32's on those real images, and the classify cost a
1000-class x 16-shot cache adds per query."""

from __future__ import annotations

import gc
import logging
import statistics
import time
from typing import Any

from app.encoder.backends.export import compare
from app.encoder.factory import ModelDefaults
from app.evaluation.datasets import load_folder_dataset
from app.evaluation.run import encode_dataset, evaluate
from cache_models import METHODS, get_method

from .cache_methods import clustered_task
from .common import (
    BACKENDS,
    DATASET_NAMES,
    BenchConfig,
    backend_encoders,
    load_bench_model,
    model_label,
    per_second,
    table,
    time_calls,
)

log = logging.getLogger(__name__)

SHOTS = 16
SEEDS = (1, 2, 3)


def bench_accuracy(config: BenchConfig) -> dict[str, Any]:
    """Per dataset and backend: accuracy (mean over seeds, %) of the default method and zero-shot at 16 shots,
    and the per-image cosine of the test features to torch fp32's. Skipped when the datasets are absent."""
    present = [n for n in DATASET_NAMES if (config.datasets / n / "train").is_dir()]
    if not present:
        return {"skipped": f"no datasets under {config.datasets}"}
    loaded = load_bench_model("offline", config)
    default_method = ModelDefaults.for_key(loaded.config_key).default_method
    methods = [default_method, "zero-shot"]
    shots = 4 if config.quick else SHOTS
    seeds = SEEDS[:1] if config.quick else SEEDS
    datasets = [load_folder_dataset(config.datasets / n) for n in present]
    rows = []
    reference: dict[str, Any] = {}
    for backend, encoder, _ in backend_encoders(loaded, BACKENDS, config):
        for dataset in datasets:
            started = time.perf_counter()
            encoded = encode_dataset(encoder, dataset, views=1, progress=False)
            encode_s = time.perf_counter() - started
            reference.setdefault(dataset.name, encoded.test_features)
            cosine = compare(encoded.test_features, reference[dataset.name])
            results = evaluate(encoded, shots=[shots], seeds=seeds, methods=methods, scale=encoder.logit_scale)
            accuracy = {m: 100 * statistics.mean(r.accuracy for r in results if r.method == m) for m in methods}
            rows.append(
                {
                    "dataset": dataset.name,
                    "images": len(dataset.train) + len(dataset.test),
                    "backend": backend,
                    "used": encoder.backend,
                    "accuracy": accuracy,
                    "mean_cosine": cosine["mean_cosine"],
                    "min_cosine": cosine["min_cosine"],
                    "encode_s": encode_s,
                }
            )
            log.info("bench accuracy %s %s: %s", dataset.name, backend, accuracy)
        del encoder
    return {"rows": rows, "methods": methods, "shots": shots, "seeds": list(seeds)}


def backend_gaps(result: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """(dataset, backend, method, backend - fp32 accuracy points) for every row beside the fp32 `onnx` one: issue
    15's eligibility rule (within 0.5 points at 16 shots), checked on every backend the bench ran."""
    out = []
    by_key = {(r["dataset"], r["backend"]): r for r in result.get("rows", [])}
    for (dataset, backend), row in by_key.items():
        if backend in ("onnx", "torch") or (dataset, "onnx") not in by_key:
            continue
        label = backend if row["used"] == backend else f"{backend} → {row['used']}"  # a fallback says so
        for method in result["methods"]:
            gap = row["accuracy"][method] - by_key[(dataset, "onnx")]["accuracy"][method]
            out.append((dataset, label, method, gap))
    return out


def accuracy_markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}."
    methods = result["methods"]
    rows = []
    for r in result["rows"]:
        used = r["backend"] if r["used"] == r["backend"] else f"{r['backend']} → {r['used']}"
        rows.append(
            [
                r["dataset"],
                used,
                *[f"{r['accuracy'][m]:.1f}" for m in methods],
                f"{r['mean_cosine']:.5f} / {r['min_cosine']:.5f}",
                f"{r['images'] / r['encode_s']:.1f}",
            ]
        )
    header = [
        "dataset",
        "backend",
        *[f"{m} % ({result['shots']} shots, seeds {','.join(map(str, result['seeds']))})" for m in methods],
        "test-feature cosine to torch fp32, mean / min",
        "decode + encode img/s",
    ]
    return table(header, rows, "ll" + "r" * (len(header) - 2))


# ---- the cost of a big cache --------------------------------------------------------------------
def bench_cache_cost(config: BenchConfig, dims: dict[str, int]) -> dict[str, Any]:
    """ms per query of each method's predict on a 1000-class x 16-shot cache (synthetic unit keys of the
    model's dimension, default hyper-parameters: tuning time is in the cache-method table), at 1 and 8
    queries per call (what interactive classify sends)."""
    n_classes = 100 if config.quick else 1000
    rows = []
    for label, dim in dims.items():
        keys, labels, text, queries = clustered_task(n_classes, SHOTS, dim, 8, seed=0)
        for name in METHODS:
            method = get_method(name)().fit(keys, labels, text)
            row: dict[str, Any] = {"model": label, "dim": dim, "method": name, "classes": n_classes}
            for batch in (1, 8):
                times = time_calls(
                    lambda q=queries[:batch], m=method: m.predict(q),  # type: ignore[misc]
                    min_seconds=config.min_seconds / 6,
                    min_calls=5,
                )
                row[f"ms_{batch}"] = 1000 / per_second(batch, times)
            rows.append(row)
        del keys
        gc.collect()
    return {"rows": rows, "shots": SHOTS}


def cache_cost_markdown(result: dict[str, Any], encoder: dict[str, Any] | None) -> str:
    rows = [
        [
            r["model"],
            r["dim"],
            r["method"],
            f"{r['classes']} x {result['shots']}",
            f"{r['ms_1']:.2f}",
            f"{r['ms_8']:.2f}",
        ]
        for r in result["rows"]
    ]
    text = table(["model", "d", "method", "classes x shots", "ms/query (1 per call)", "ms/query (8 per call)"], rows)
    lines = []
    for r in (encoder or {}).get("rows", []):
        if r["default"]:
            lines.append(
                f"- encoder, {r['model']} `{r['used']}`: {1000 / r['img_per_s'][1]:.1f} ms/image at batch 1, "
                f"{1000 / r['img_per_s'][max(r['img_per_s'])]:.1f} ms/image at batch {max(r['img_per_s'])}"
            )
    return text + ("\n\n" + "\n".join(lines) if lines else "")


def model_dims(config: BenchConfig, encoder: dict[str, Any] | None) -> dict[str, int]:
    """Feature dimension of each benchmarked model: from the encoder section, else by loading the model."""
    dims = {str(r["model"]): int(r["dim"]) for r in (encoder or {}).get("rows", [])}
    if not dims:
        for name in config.models:
            loaded = load_bench_model(name, config)
            dims[model_label(loaded)] = loaded.identity.dim
    return dims
