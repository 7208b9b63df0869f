"""Runs INSIDE a private network namespace (see test_ray.py): Ray + Serve with 2 shotcache replicas on
a PostgreSQL store reached over its unix socket; create + classify through Ray's HTTP proxy; SIGKILL one
replica during a stream of classify requests. Prints one JSON line with what happened.

Usage: python -m tests.cluster.ray_driver STORE_URL DATA_DIR PORT
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPLICA_TITLE = "ServeReplica:shotcache:shotcache-replica"


def replica_pids() -> list[int]:
    """PIDs of this driver's own Ray Serve replicas (descendants of this process, by their title)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if REPLICA_TITLE in title:
            found.append(pid)
    return sorted(found)


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications.get("shotcache")
    if status is None or "shotcache-replica" not in status.deployments:
        return 0
    deployment = status.deployments["shotcache-replica"]
    return int(deployment.replica_states.get("RUNNING", 0))


def wait_for(condition: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.5)
    return time.monotonic() - started


def main(store_url: str, data_dir: str, port: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from api.ray_serve import INGRESS, app_builder, replica_env

    os.environ.update({"SHOTCACHE_STORE": store_url, "SHOTCACHE_MODEL": "offline", "SHOTCACHE_THREADS": "1"})
    os.environ["SHOTCACHE_DATA_DIR"] = data_dir
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # 1 per replica; the ingress takes 0
    result: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"replicas": 2, "env": replica_env()}), name=INGRESS, route_prefix="/", blocking=False)
        result["ready_s"] = wait_for(lambda: running_replicas() == 2, 300, "2 replicas running")
        base = f"http://127.0.0.1:{port}"
        root = Path(os.environ["SHOTCACHE_TEST_IMAGES"])
        shots = [img for name in ("airplane", "bird", "cat") for img in sorted((root / name).glob("*.jpg"))[:3]]
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in shots]
        with httpx.Client(base_url=base, timeout=300) as client:
            created = client.post("/v1/tasks", files=files, data={"labels": [p.parent.name for p in shots]})
            result["create_status"] = created.status_code
            if created.status_code != 201:
                raise RuntimeError(f"create answered {created.status_code}: {created.text}")
            task_id = created.json()["id"]
            probe = files[:2]
            answers = [client.post(f"/v1/tasks/{task_id}/classify", files=probe) for _ in range(8)]
            result["classify_statuses"] = sorted({a.status_code for a in answers})
            result["labels"] = sorted(
                {json.dumps([r["label"] for r in a.json()["results"]]) for a in answers if a.status_code == 200}
            )
            if result["classify_statuses"] != [200]:
                raise RuntimeError(f"classify answered {[a.text for a in answers if a.status_code != 200][:1]}")

            statuses: list[int | str] = []
            stop = threading.Event()

            def stream() -> None:
                with httpx.Client(base_url=base, timeout=120) as own:
                    while not stop.is_set():
                        try:
                            statuses.append(own.post(f"/v1/tasks/{task_id}/classify", files=probe).status_code)
                        except httpx.HTTPError as error:
                            statuses.append(type(error).__name__)

            streams = [threading.Thread(target=stream) for _ in range(2)]
            for thread in streams:
                thread.start()
            time.sleep(3)
            pids = replica_pids()
            result["replica_pids"] = pids
            os.kill(pids[0], signal.SIGKILL)
            killed_at = len(statuses)
            result["replaced_after_s"] = wait_for(
                lambda: running_replicas() == 2 and pids[0] not in replica_pids() and len(replica_pids()) == 2,
                600,
                "the killed replica replaced",
            )
            after_replacement = len(statuses)
            time.sleep(5)
            stop.set()
            for thread in streams:
                thread.join(120)
            result["requests"] = len(statuses)
            result["requests_before_kill"] = killed_at
            result["requests_after_replacement"] = len(statuses) - after_replacement
            result["failures"] = [s for s in statuses if s != 200]
            result["replicas_after"] = replica_pids()
    finally:
        serve.shutdown()
        ray.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
