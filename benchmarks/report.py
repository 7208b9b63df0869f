"""The markdown of `shotcache bench`: one section of docs/benchmarks.md between fixed markers, the targets
of issue 15 checked against the measurements, rewritten in place on every run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .accuracy import accuracy_markdown, backend_gaps, cache_cost_markdown
from .cache_methods import to_markdown
from .common import SUSTAINED_ROUNDS, table
from .encoders import decode_markdown, encoder_markdown
from .memory import memory_markdown

BEGIN = "<!-- BEGIN shotcache bench -->"
END = "<!-- END shotcache bench -->"

NOTES = """Notes on reading these tables:
- img/s (and every ms/image) is the fastest of repeated calls after a warm-up (at least 3 calls and 3 s per
  cell): one encoder call (`Encoder.encode_crops`) on uint8 crops, the tower's normalisation included (in
  the graph for OpenVINO, numpy for torch and ONNX Runtime; runs before 2026-12-01 21:45 UTC timed normalised
  float pixels, without it); `x` is the ratio to eager torch fp32 at the same batch size. On a shared
  machine the slower calls measure the neighbours, not the code (eager torch suffers most: each of its many
  small parallel ops waits for the second core).
- `onnx-int8` quantizes MatMul/Gemm weights to int8 (ONNX Runtime dynamic quantization). Convolutions stay
  fp32: with Conv quantized too (ConvInteger) the stand-in's image tower ran ~10x slower than fp32 (4-6 vs
  45-52 img/s, one-off trial on this machine) with min cosine 0.977 to torch. The stand-in's image tower
  (EfficientNet-Lite0) has no MatMul, so its `onnx-int8` runs the fp32 graph and reports `onnx`; its MiniLM
  text tower fails the int8 export check (min cosine ≈ 0.87, bound 0.99) and stays fp32 as well. ViT-B-32's
  text tower passes (≈ 0.999) and runs int8.
- ViT-B-32 and MobileCLIP2-S0 run with random weights (same FLOPs as the real models): their speed is real,
  their accuracy is not; the cosine column (real images, against torch fp32) is the fidelity evidence.
  `auto` keeps a backend only at min cosine ≥ 0.999 to fp32 (app/encoder/choice.py), so an int8 or bf16
  path that is faster but below it is listed here and not served. Real CLIP activations have outliers that
  random weights lack: int8 is riskier on real weights than these cosines say, bf16 (fp32's exponent range)
  much less so.
- Served numbers: `shotcache serve` in a subprocess on the same cores as the load generator (one keep-alive
  `http.client` connection per client thread, ~0.4-0.7 ms of its CPU per request; httpx, ~1.3-1.9 ms, until
  2026-12-01: docs/benchmarks.md, request path); one image per request; "outside encoder" is
  1 - (encoder-call seconds / classify-request seconds), both from the server's /metrics, at 1 client (every
  request is one encoder call). "of raw encoder" divides by the encoder table's rates on the backend the
  server runs, at batch 1 (1 client) or 8 (8 clients): its best round of calls ("best of 6 rounds": each
  cell's calls split into 6 consecutive rounds, a round's rate its calls over their summed time; the
  8-client target is judged on it, a served rate being a throughput too), and its fastest call. The
  host's speed drifts by 10-35% within an hour here, so a served row is only fair against raw rows
  measured minutes before it, in the same run.
- Peak RSS includes ≈ 0.9 GB that `import torch, open_clip, transformers` costs before any model loads
  with the CUDA torch wheel of this venv (the Docker image's CPU wheel is smaller).
"""


def stamp(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return f"_{m['nproc']} x {m['cpu']}, {m['date']}, load {m['load']}: `{meta['command']}`_"


VIT_BATCH32_IMG_PER_S = 140.0  # issue 15: ViT-B-32 at batch 32, at cosine >= FIDELITY to torch fp32
VIT_X_EAGER = 4.3
FIDELITY = 0.999
OUTSIDE_SHARE = {"ViT-B-32": 0.10, "offline-standin": 0.20}  # issue 15, 1 client
SERVED_VS_RAW = 0.75  # issue 15, 8 clients
TORCH_FREE_RSS_MB = {"ViT-B-32": 600.0, "offline-standin": 400.0}  # issue 15, after warm-up
TORCH_FREE_READY_S = 5.0  # issue 15, from a warm data dir


def targets(results: dict[str, Any]) -> list[list[object]]:
    """[target, measured, status, what limits it] rows (issue 15); a missed target says by how much."""
    rows: list[list[object]] = []
    encoder_rows = results.get("encoder", {}).get("rows", [])
    vit = [r for r in encoder_rows if r["model"].startswith("ViT-B-32") and 32 in r["img_per_s"]]
    eager = next((r for r in vit if r["backend"] == "torch"), None)
    faithful = [r for r in vit if r["backend"] == r["used"] and r["min_cosine"] >= FIDELITY]
    if eager and faithful:
        best = max(faithful, key=lambda r: r["img_per_s"][32])
        rate, eager_rate = best["img_per_s"][32], eager["img_per_s"][32]
        fastest = max(vit, key=lambda r: r["img_per_s"][32])
        limit = f"fastest within cosine {FIDELITY}: {best['backend']}"
        if fastest is not best:
            limit += (
                f"; {fastest['backend']} runs {fastest['img_per_s'][32]:.1f} img/s at min cosine "
                f"{fastest['min_cosine']:.5f}"
            )
        rows.append(
            _target(
                f"ViT-B-32 ≥ {VIT_BATCH32_IMG_PER_S:.0f} img/s at batch 32, min cosine ≥ {FIDELITY} "
                f"({best['backend']})",
                f"{rate:.1f} img/s (min cosine {best['min_cosine']:.5f})",
                rate >= VIT_BATCH32_IMG_PER_S,
                f"by {VIT_BATCH32_IMG_PER_S - rate:.1f} img/s",
                limit,
            )
        )
        rows.append(
            _target(
                f"ViT-B-32 ≥ {VIT_X_EAGER}x eager fp32 at batch 32 ({best['backend']})",
                f"{rate / eager_rate:.1f}x (eager {eager_rate:.1f} img/s)",
                rate >= VIT_X_EAGER * eager_rate,
                f"by {VIT_X_EAGER - rate / eager_rate:.1f}x",
            )
        )
    for r in results.get("served", {}).get("rows", []):
        name = f"{r['model']} `{r['used']}`"
        bound = next((v for k, v in OUTSIDE_SHARE.items() if r["model"].startswith(k)), None)
        rss_bound = next((v for k, v in TORCH_FREE_RSS_MB.items() if r["model"].startswith(k)), None)
        if rss_bound is not None and r["backend"] == "auto" and "rss_ready_mb" in r:
            torch_free = r.get("torch_mapped") is False
            rows.append(
                _target(
                    f"{name}: torch-free start ≤ {TORCH_FREE_READY_S:.0f} s from a warm data dir, RSS after warm-up "
                    f"≤ {rss_bound:.0f} MB",
                    f"{r['ready_s']:.1f} s, {r['rss_ready_mb']:.0f} MB" + ("" if torch_free else ", torch mapped"),
                    torch_free and r["ready_s"] <= TORCH_FREE_READY_S and r["rss_ready_mb"] <= rss_bound,
                    f"by {max(r['rss_ready_mb'] - rss_bound, 0):.0f} MB / "
                    f"{max(r['ready_s'] - TORCH_FREE_READY_S, 0):.1f} s" + ("" if torch_free else " (not torch-free)"),
                    "the text tower is closed after warm-up and opened by builds (backends/on_demand.py); "
                    f"peak while serving {r['peak_rss_mb']:.0f} MB",
                )
            )
        for run in r["runs"]:
            body = run.get("body", "multipart")
            if (
                run["concurrency"] == 8
                and (run.get("served_vs_raw") or run.get("served_vs_next"))
                and r["backend"] == "auto"
            ):
                rows.append(_served_target(name, body, run))
            if run["concurrency"] == 1 and bound is not None and r["backend"] == "auto":
                outside_ms = run["server_request_ms"] - run["encode_call_ms"]
                rows.append(
                    _target(
                        f"{name}, {body}: time outside the encoder ≤ {bound:.0%} of a request (1 client)",
                        f"{100 * run['outside_share']:.0f}% ({outside_ms:.1f} ms)",
                        run["outside_share"] <= bound,
                        f"by {100 * (run['outside_share'] - bound):.0f} points",
                        f"{outside_ms:.1f} ms of HTTP, decode + preprocess and the cache per request beside a "
                        f"{run['encode_call_ms']:.1f} ms encoder call",
                    )
                )
    for dataset, backend, method, gap in backend_gaps(results.get("accuracy", {})):
        rows.append(
            _target(
                f"stand-in {backend} - fp32 accuracy ≥ -0.5 points ({dataset}, {method})",
                f"{gap:+.2f}",
                gap >= -0.5,
                f"by {-0.5 - gap:.2f} points",
                "not eligible: `auto` keeps it out by its fidelity bound (min cosine, choice.py)",
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
                "what a loaded task holds: the shared support and its own method's derived arrays; "
                + (
                    f"with every method used (each fitted on first use) {r['all_methods_rss_x_raw']:.2f}x"
                    if "all_methods_rss_x_raw" in r
                    else "other methods add theirs on first use"
                ),
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


def _served_target(name: str, body: str, run: dict[str, Any]) -> list[object]:
    """Served img/s at 8 clients against the raw encoder at batch 8, judged on the fairest reference the run has:
    the raw rate measured right after it in the same process (`served.RawReference`, sixth session on), else the
    encoder table's sustained rate (best of SUSTAINED_ROUNDS rounds), else its fastest call (older runs). The
    other references the run has are shown beside it."""
    references: list[tuple[float | None, str, float | None]] = [  # (share, reference, img/s), fairest first
        (
            run.get("served_vs_next"),
            "its best round measured right after the served run",
            run.get("raw_next_img_per_s"),
        ),
        (
            run.get("served_vs_sustained"),
            f"the encoder table's best of {SUSTAINED_ROUNDS} rounds",
            run.get("raw_sustained_img_per_s"),
        ),
        (run.get("served_vs_raw"), "the encoder table's fastest call", run.get("raw_img_per_s")),
    ]
    present = [(float(s), what, float(r)) for s, what, r in references if s and r]
    (share, reference, rate), *others = present
    shown = f"{100 * share:.0f}% of {rate:.0f}"
    if others:
        shown += " (" + "; ".join(f"{100 * s:.0f}% of {what}, {r:.0f}" for s, what, r in others) + ")"
    return _target(
        f"{name}, {body}: served img/s at 8 clients ≥ {SERVED_VS_RAW:.0%} of the raw encoder's at batch 8 "
        f"({reference})",
        shown,
        share >= SERVED_VS_RAW,
        f"by {100 * (SERVED_VS_RAW - share):.0f} points",
        f"{run['mean_batch']:.1f} images per encoder call ({run['encode_call_ms']:.1f} ms each); "
        "HTTP, decode and the load generator share the same 2 cores",
    )


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
        ("Targets (issue 15)", lambda: table(["target", "measured", "status", "why"], targets(results), "lrll")),
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
