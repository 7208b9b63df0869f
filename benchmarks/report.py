"""The markdown of `shotcache bench`: one section of docs/benchmarks.md between fixed markers, the targets
of issue 5 checked against the measurements, rewritten in place on every run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .accuracy import accuracy_markdown, cache_cost_markdown, int8_gap
from .cache_methods import to_markdown
from .common import table
from .encoders import decode_markdown, encoder_markdown
from .memory import memory_markdown

BEGIN = "<!-- BEGIN shotcache bench -->"
END = "<!-- END shotcache bench -->"

NOTES = """Notes on reading these tables:
- img/s (and every ms/image) is the fastest of repeated calls after a warm-up (at least 3 calls and 3 s per
  cell): one encoder call (`Encoder.encode_pixels`) on preprocessed pixels; `x` is the ratio to eager torch
  fp32 at the same batch size. On a shared machine the slower calls measure the neighbours, not the code
  (eager torch suffers most: each of its many small parallel ops waits for the second core).
- `onnx-int8` quantizes MatMul/Gemm weights to int8 (ONNX Runtime dynamic quantization). Convolutions stay
  fp32: with Conv quantized too (ConvInteger) the stand-in's image tower ran ~10x slower than fp32 (4-6 vs
  45-52 img/s, one-off trial on this machine) with min cosine 0.977 to torch. The stand-in's image tower
  (EfficientNet-Lite0) has no MatMul, so its `onnx-int8` runs the fp32 graph and reports `onnx`; its MiniLM
  text tower fails the int8 export check (min cosine ≈ 0.87, bound 0.99) and stays fp32 as well. ViT-B-32's
  text tower passes (≈ 0.999) and runs int8.
- ViT-B-32 runs with random weights (same FLOPs as the real model): its speed is real, its accuracy is not,
  so the int8 accuracy bound can only be checked on the stand-in, where int8 changes nothing. ViT-B-32's
  default `onnx-int8` is chosen on speed; its accuracy cost on real CLIP weights is unmeasured here (random
  weights give min cosine ≈ 0.9998 to torch; real CLIP activations have outliers that per-tensor int8
  handles worse). `SHOTCACHE_BACKEND=onnx` is the exact fallback.
- No bf16 backend: torch bf16 autocast was slower than fp32 eager for ViT-B-32 in every interleaved trial
  (≈ 0.7x at batch 32) and cost the stand-in 0.5-1.3 accuracy points at 16 shots; a bf16 copy of the model
  reached ≈ 2x eager at batch 32, still 2-4x slower than `onnx-int8`.
- Served numbers: `shotcache serve` in a subprocess on the same cores as the httpx load generator; one
  image per request; "outside encoder" is 1 - (encoder-call seconds / classify-request seconds), both from
  the server's /metrics, at 1 client (every request is one encoder call). "of raw encoder" divides by the
  encoder table's best call at batch 1 (1 client) or 8 (8 clients).
- Peak RSS includes ≈ 0.9 GB that `import torch, open_clip, transformers` costs before any model loads
  with the CUDA torch wheel of this venv (the Docker image's CPU wheel is smaller).
"""


def stamp(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return f"_{m['nproc']} x {m['cpu']}, {m['date']}, load {m['load']}: `{meta['command']}`_"


def targets(results: dict[str, Any]) -> list[list[object]]:
    """[target, measured, status, what limits it] rows; a missed target says by how much, from the numbers."""
    rows: list[list[object]] = []
    encoder_rows = results.get("encoder", {}).get("rows", [])
    for r in encoder_rows:
        if r["model"].startswith("ViT-B-32") and r["backend"] == "onnx-int8" and 32 in r["img_per_s"]:
            eager = next(x for x in encoder_rows if x["model"] == r["model"] and x["backend"] == "torch")
            rate, eager_rate = r["img_per_s"][32], eager["img_per_s"][32]
            rows.append(
                _target(
                    "ViT-B-32 onnx-int8 ≥ 40 img/s at batch 32", f"{rate:.1f} img/s", rate >= 40, f"by {40 - rate:.1f}"
                )
            )
            rows.append(
                _target(
                    "ViT-B-32 onnx-int8 ≥ 6x eager fp32 at batch 32",
                    f"{rate / eager_rate:.1f}x",
                    rate >= 6 * eager_rate,
                    f"by {6 - rate / eager_rate:.1f}x",
                    f"eager fp32 runs {eager_rate:.1f} img/s here (the issue's baseline: 6.8): 6x needs "
                    f"{6 * eager_rate:.0f} img/s at batch 32; int8's best here is {max(r['img_per_s'].values()):.1f} "
                    f"img/s (batch {max(r['img_per_s'], key=r['img_per_s'].get)})",
                )
            )
    for r in results.get("served", {}).get("rows", []):
        runs = {run["concurrency"]: run for run in r["runs"]}
        name = f"{r['model']} `{r['used']}`"
        if 8 in runs and runs[8]["served_vs_raw"]:
            share, run = runs[8]["served_vs_raw"], runs[8]
            rows.append(
                _target(
                    f"{name}: served img/s at 8 clients ≥ 75% of the raw encoder's at batch 8",
                    f"{100 * share:.0f}%",
                    share >= 0.75,
                    f"by {100 * (0.75 - share):.0f} points",
                    f"{run['raw_img_per_s']:.0f} img/s raw leaves {1000 / run['raw_img_per_s']:.1f} ms/image; HTTP, "
                    f"multipart, decode and the load generator's own requests share the same 2 cores; "
                    f"{run['mean_batch']:.1f} images per encoder call",
                )
            )
        if 1 in runs:
            run = runs[1]
            outside_ms = run["server_request_ms"] - run["encode_call_ms"]
            rows.append(
                _target(
                    f"{name}: time outside the encoder ≤ 10% of a request (1 client)",
                    f"{100 * run['outside_share']:.0f}% ({outside_ms:.1f} ms)",
                    run["outside_share"] <= 0.10,
                    f"by {100 * (run['outside_share'] - 0.10):.0f} points",
                    f"{outside_ms:.1f} ms of HTTP, multipart parsing, decode + preprocess and the cache per request "
                    f"beside a {run['encode_call_ms']:.1f} ms encoder call: 10% needs an encoder call "
                    f"≥ {9 * outside_ms:.0f} ms",
                )
            )
    for dataset, method, gap in int8_gap(results.get("accuracy", {})):
        rows.append(
            _target(
                f"stand-in int8 - fp32 accuracy ≥ -0.5 points ({dataset}, {method})",
                f"{gap:+.2f}",
                gap >= -0.5,
                f"by {-0.5 - gap:.2f} points",
                "the stand-in's onnx-int8 runs fp32 graphs (nothing to quantize in its image tower)",
            )
        )
    for r in results.get("memory", {}).get("rows", []):
        ratio = r["rss_x_raw"]
        rows.append(
            _target(
                f"RSS per loaded task ≤ 2x its raw key + text bytes ({r['classes']} x {r['shots']}, d={r['dim']})",
                f"{ratio:.2f}x",
                ratio <= 2.0,
                f"by {ratio - 2.0:.2f}x",
                "the fitted methods' own state (e.g. Tip-X's psi, GDA's covariance) beside the shared support",
            )
        )
    check = results.get("cluster", {}).get("store", {}).get("version_check")
    if check:
        rows.append(
            _target(
                "the version check adds ≤ 1 ms p50 to a classify request (issue 12)",
                f"{check['p50_ms']:.3f} ms",
                check["p50_ms"] <= 1.0,
                f"by {check['p50_ms'] - 1.0:.3f} ms",
                "one round trip to PostgreSQL per request on this machine",
            )
        )
    return rows


def _target(name: str, shown: str, met: bool, shortfall: str, limit: str = "") -> list[object]:
    return [name, shown, "met" if met else f"**missed** {shortfall}", "" if met else limit]


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    m = meta["machine"]
    parts = [
        BEGIN,
        "## `shotcache bench`",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']} ({', '.join(m['isa']) or 'no AVX'}); Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". Date: {m['date']}. Load average (1, 5, 15 min) at start {m['load']}, at end {meta['load_end']}. "
        f"Run time {meta['seconds'] / 60:.1f} min.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta.get("note"):
        parts += [f"**{meta['note']}**", ""]
    if meta.get("busy"):
        parts += [f"**The machine was busy (load average {m['load']} on {m['nproc']} cores): numbers are noisy.**", ""]
    sections: list[tuple[str, Callable[[], str]]] = [
        ("Targets (issue 5)", lambda: table(["target", "measured", "status", "why"], targets(results), "lrll")),
        ("Encoder throughput per backend", lambda: encoder_markdown(results["encoder"], meta["batches"])),
        (
            "Decoding and preprocessing vs the encoder",
            lambda: decode_markdown(results["decode"], results.get("encoder")),
        ),
        ("Served classify over HTTP, task builds, peak memory", lambda: _served(results["served"])),
        ("Classify cost of a big cache", lambda: cache_cost_markdown(results["cache"], results.get("encoder"))),
        ("Accuracy per backend (stand-in, ../shared/datasets)", lambda: accuracy_markdown(results["accuracy"])),
        ("Cache-method micro-benchmark", lambda: to_markdown(results["methods"]).rstrip()),
        ("Resident memory and restore time of loaded tasks", lambda: memory_markdown(results["memory"])),
        ("Cluster: the PostgreSQL store and two replicas", lambda: _cluster(results["cluster"])),
    ]
    keys = ["targets", "encoder", "decode", "served", "cache", "accuracy", "methods", "memory", "cluster"]
    for key, (title, make) in zip(keys, sections, strict=True):
        if key != "targets" and key not in results:
            continue
        parts += [f"### {title}", "", stamp(meta), "", make(), ""]
    parts += [NOTES, END]
    return "\n".join(parts) + "\n"


def _served(result: dict[str, Any]) -> str:
    from .served import served_markdown

    return served_markdown(result)


def _cluster(result: dict[str, Any]) -> str:
    from .cluster import cluster_markdown

    return cluster_markdown(result)


def write_section(path: Path, section: str) -> None:
    """Replace the text between the markers (inclusive) with `section`; append it if the markers are absent."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        new = head + section.rstrip("\n") + tail
    else:
        new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    tmp.replace(path)
