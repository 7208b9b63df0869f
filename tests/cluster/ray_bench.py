"""Classify throughput through Ray Serve: 2 task replicas on the shared encoder deployment vs each replica
with its own model (`encoder: false`). On demand, not in CI; numbers in docs/scaling.md.

    python -m tests.cluster.ray_bench [SECONDS] [CLIENTS] [THREADS]

Each configuration runs in private network + PID namespaces (as tests/cluster/test_ray.py does), on a
PostgreSQL store over its unix socket, with the offline stand-in model on the onnx backend. Two tasks,
served by the two replicas; CLIENTS threads each alternate between them, 4 images per classify request,
for SECONDS after a 5 s warm-up. Prints one JSON line per configuration and a markdown table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.ray_driver import Tasks, encoder_counts, running_replicas, wait_for

PORT = 19001
PER_REQUEST = 4


def inside(mode: str, store_url: str, data_dir: str, seconds: float, clients: int, threads: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from api.ray_serve import INGRESS, app_builder, replica_env

    settings = {"STORE": store_url, "MODEL": "offline", "BACKEND": "onnx", "THREADS": str(threads)}
    os.environ.update({f"SHOTCACHE_{name}": value for name, value in {**settings, "DATA_DIR": data_dir}.items()})
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=os.environ["SHOTCACHE_TEST_RAY_TMP"])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        encoder: dict[str, Any] | bool = {} if mode == "shared-encoder" else False
        serve.run(
            app_builder({"replicas": 2, "env": replica_env(), "encoder": encoder}), name=INGRESS, route_prefix="/"
        )
        wait_for(lambda: running_replicas() == 2, 300, "2 replicas running")
        root = Path(os.environ["SHOTCACHE_TEST_IMAGES"])
        probe_paths = [p for name in ("airplane", "cat") for p in sorted((root / name).glob("*.jpg"))[3:5]]
        probe = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in probe_paths]
        base = f"http://127.0.0.1:{PORT}"
        with httpx.Client(base_url=base, timeout=300) as client:
            tasks = Tasks(client, root)
            task_a = tasks.create()
            task_b, _ = tasks.on_a_replica_other_than({tasks.replica_of(task_a, probe)}, probe)
        latencies: list[float] = []
        failures: list[int | str] = []
        measuring = threading.Event()
        stop = threading.Event()

        def client_loop(offset: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as own:
                turn = offset
                while not stop.is_set():
                    task = (task_a, task_b)[turn % 2]
                    turn += 1
                    started = time.monotonic()
                    try:
                        answer = own.post(f"/v1/tasks/{task}/classify", files=probe)
                        status: int | str = answer.status_code
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    if not measuring.is_set() or stop.is_set():
                        continue
                    if status == 200:
                        latencies.append(time.monotonic() - started)
                    else:
                        failures.append(status)

        workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
        for worker in workers:
            worker.start()
        time.sleep(5)
        before = encoder_counts() if mode == "shared-encoder" else None
        measuring.set()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join(120)
        result: dict[str, Any] = {
            "mode": mode,
            "threads": threads,
            "clients": clients,
            "seconds": seconds,
            "requests": len(latencies),
            "failures": failures,
            "images_per_s": round(len(latencies) * PER_REQUEST / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        }
        if before is not None:
            after = encoder_counts()
            batches = after["batches"] - before["batches"]
            result["encoder_rows_per_batch"] = round((after["rows"] - before["rows"]) / max(1, batches), 1)
            result["encoder_mixed_batches_share"] = round(
                (after["mixed_batches"] - before["mixed_batches"]) / max(1, batches), 2
            )
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def main(seconds: float, clients: int, threads: int) -> list[dict[str, Any]]:
    from app.encoder.standin import ensure_standin
    from benchmarks import postgres_server
    from benchmarks.server_process import link_model
    from tests.conftest import MODEL_DATA_DIR, dataset_dir

    ensure_standin(MODEL_DATA_DIR)
    server = postgres_server.acquire()
    results = []
    try:
        for mode in ("shared-encoder", "per-replica-encoder"):
            work = Path(tempfile.mkdtemp(prefix="shotcache-ray-bench-"))
            try:
                link_model(work / "data", MODEL_DATA_DIR)
                env = {
                    **os.environ,
                    "SHOTCACHE_TEST_IMAGES": str(dataset_dir("cifar10-mini") / "train"),
                    "SHOTCACHE_TEST_RAY_TMP": str(work / "ray"),
                }
                inner = [sys.executable, "-m", "tests.cluster.ray_bench", "--inside", mode]
                inner += [postgres_server.new_schema_url(server, "raybench"), str(work / "data")]
                inner += [str(seconds), str(clients), str(threads)]
                namespaces = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
                script = 'ip link set lo up && exec "$@"'
                done = subprocess.run(
                    [*namespaces, "sh", "-c", script, "sh", *inner],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=900,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{mode} failed: {done.stderr[-3000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        postgres_server.release()
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        mode, store, data, secs, n, t = sys.argv[2:8]
        print(json.dumps(inside(mode, store, data, float(secs), int(n), int(t))), flush=True)
    else:
        args = [float(a) for a in sys.argv[1:4]]
        rows = main(
            args[0] if args else 20.0, int(args[1]) if len(args) > 1 else 4, int(args[2]) if len(args) > 2 else 1
        )
        print("| engine | SHOTCACHE_THREADS | clients | images/s | p50 ms | failures |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['mode']} | {row['threads']} | {row['clients']} | {row['images_per_s']} | {row['p50_ms']} |"
                f" {len(row['failures'])} |"
            )
