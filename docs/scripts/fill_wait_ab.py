"""The encoder queue's fill wait on (the default) against off (`SHOTCACHE_FILL_WAIT_CAP_MS=0`), interleaved.

Two `shotcache serve` processes of the same tree (the bench's own `benchmarks.served.started_server`), each
with the bench's 160-shot task of cifar10-mini; then ROUNDS rounds of `benchmarks.load_generator.drive`
(raw body, SECONDS each) at each client count, the variants' order swapped every round. Run from the
repository root (docs/benchmarks.md, "The fill wait per host"):

    .venv/bin/python docs/scripts/fill_wait_ab.py MODEL BACKEND ROUNDS SECONDS CLIENTS DATA_DIR OUT.json
    e.g. ... offline auto 6 8 1,8 /work/cache/test-data /tmp/ab.json
"""

import json
import sys
from pathlib import Path

import httpx

import benchmarks.served as served
from benchmarks.common import BenchConfig
from benchmarks.load_generator import drive
from benchmarks.server_process import load_average

model, backend, rounds, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
clients_list = [int(c) for c in sys.argv[5].split(",")]
config = BenchConfig(data_dir=Path(sys.argv[6]), threads=2)
VARIANTS: dict[str, dict[str, str]] = {"default": {}, "off": {"SHOTCACHE_FILL_WAIT_CAP_MS": "0"}}


servers = {name: served.started_server(config, model, backend, extra)[0] for name, extra in VARIANTS.items()}
tasks = {}
shots, probes = served.shots_and_probes(config, 16)
try:
    for name, server in servers.items():
        with httpx.Client(base_url=server.base, timeout=600) as client:
            files = [("images", (f"s{i}.jpg", data, "image/jpeg")) for i, (_, data) in enumerate(shots)]
            response = client.post("/v1/tasks", files=files, data={"labels": [label for label, _ in shots]})
            response.raise_for_status()
            tasks[name] = response.json()["id"]
            print(name, client.get("/v1/info").json()["model"]["backend"], flush=True)
    print("load", load_average(), flush=True)
    results = []
    for round_ in range(rounds):
        order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
        for clients in clients_list:
            for name in order:
                run = drive(servers[name].base, tasks[name], probes, clients, seconds, "raw")
                results.append({**run, "variant": name, "round": round_})
                print(
                    f"r{round_} {name:7s} c{clients} {run['throughput']:6.1f} img/s, {run['mean_batch']:.2f} per call"
                    f" of {run['encode_call_ms']:.1f} ms, p50 {run['p50_ms']:.1f} ms",
                    flush=True,
                )
    print("load", load_average())
finally:
    for server in servers.values():
        server.stop()
Path(sys.argv[7]).write_text(json.dumps(results, indent=1))
