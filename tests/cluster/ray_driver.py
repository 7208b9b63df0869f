"""Runs INSIDE a private network namespace (see test_ray.py): Ray + Serve with 2 shotcache task replicas
and the shared encoder deployment, on a PostgreSQL store reached over its unix socket; create + classify
through Ray's HTTP proxy; two tasks served by the two replicas stream classify requests into the one
encoder deployment (its batch counts say who sent what); SIGKILL one task replica during the streams;
then a new task is served by the replacement. Prints one JSON line with what happened.

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
REPLICA_HEADER = "x-shotcache-replica"  # api.ray_serve.REPLICA_HEADER (this module imports ray late)


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


CLASS_SETS = (("airplane", "bird", "cat"), ("deer", "dog", "frog"), ("horse", "ship", "truck"))


def encoder_counts() -> dict[str, Any]:
    from ray import serve

    from api.ray_encoder import ENCODER
    from api.ray_serve import INGRESS

    counts: dict[str, Any] = serve.get_deployment_handle(ENCODER, app_name=INGRESS).counts.remote().result()
    return counts["images"]


def rows_by_caller_since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    rows = {k: v - before["rows_by_caller"].get(k, 0) for k, v in after["rows_by_caller"].items()}
    return {k: v for k, v in rows.items() if v > 0}


class Tasks:
    """Creates tasks through the proxy and finds which replica serves each (the replica header)."""

    def __init__(self, client: httpx.Client, root: Path) -> None:
        self.client = client
        self.root = root
        self.made = 0

    def create(self) -> str:
        classes = CLASS_SETS[self.made % len(CLASS_SETS)]
        self.made += 1
        shots = [img for name in classes for img in sorted((self.root / name).glob("*.jpg"))[:3]]
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in shots]
        created = self.client.post("/v1/tasks", files=files, data={"labels": [p.parent.name for p in shots]})
        if created.status_code != 201:
            raise RuntimeError(f"create answered {created.status_code}: {created.text}")
        return str(created.json()["id"])

    def replica_of(self, task_id: str, probe: list[Any]) -> str:
        answer = self.client.post(f"/v1/tasks/{task_id}/classify", files=probe)
        if answer.status_code != 200:
            raise RuntimeError(f"classify answered {answer.status_code}: {answer.text}")
        return answer.headers[REPLICA_HEADER]

    def on_a_replica_other_than(self, taken: set[str], probe: list[Any], attempts: int = 6) -> tuple[str, str]:
        """A new task whose classify requests a replica not in `taken` serves (Serve sends a new task id
        to a replica holding the fewest tasks; the replicas report theirs every few seconds)."""
        for _ in range(attempts):
            time.sleep(2)
            task_id = self.create()
            replica = self.replica_of(task_id, probe)
            if replica not in taken:
                return task_id, replica
        raise RuntimeError(f"no new task reached a replica other than {taken} in {attempts} tries")


def main(store_url: str, data_dir: str, port: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from api.ray_serve import INGRESS, app_builder, replica_env

    # The onnx backend named, not `auto`: its first start on a host measures every backend (minutes).
    settings = {"STORE": store_url, "MODEL": "offline", "BACKEND": "onnx", "THREADS": "1", "DATA_DIR": data_dir}
    os.environ.update({f"SHOTCACHE_{name}": value for name, value in settings.items()})
    # Logical CPUs: 1 per task replica and 1 for the encoder deployment; the ingress takes 0. Ray's
    # session files (logs, sockets) go to the test's own temp dir, not /tmp/ray.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=os.environ["SHOTCACHE_TEST_RAY_TMP"])
    result: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # A 50 ms batch window: the two tasks' requests meet in the encoder's batches even at this low load.
        encoder = {"batch_wait_timeout_s": 0.05}
        application = app_builder({"replicas": 2, "env": replica_env(), "encoder": encoder})
        serve.run(application, name=INGRESS, route_prefix="/", blocking=False)
        result["ready_s"] = wait_for(lambda: running_replicas() == 2, 300, "2 replicas running")
        base = f"http://127.0.0.1:{port}"
        root = Path(os.environ["SHOTCACHE_TEST_IMAGES"])
        probe_paths = sorted((root / "airplane").glob("*.jpg"))[3:4] + sorted((root / "cat").glob("*.jpg"))[3:4]
        probe = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in probe_paths]
        with httpx.Client(base_url=base, timeout=300) as client:
            tasks = Tasks(client, root)
            info = client.get("/v1/info").json()
            result["backend"] = info["model"]["backend"]
            task_a = tasks.create()
            result["create_status"] = 201
            answers = [client.post(f"/v1/tasks/{task_a}/classify", files=probe) for _ in range(8)]
            result["classify_statuses"] = sorted({a.status_code for a in answers})
            result["labels"] = sorted(
                {json.dumps([r["label"] for r in a.json()["results"]]) for a in answers if a.status_code == 200}
            )
            if result["classify_statuses"] != [200]:
                raise RuntimeError(f"classify answered {[a.text for a in answers if a.status_code != 200][:1]}")
            replica_a = answers[-1].headers[REPLICA_HEADER]
            task_b, replica_b = tasks.on_a_replica_other_than({replica_a}, probe)
            result["task_replicas"] = [replica_a, replica_b]

            statuses: list[int | str] = []
            served_by: list[str] = []
            stop = threading.Event()

            def stream(task_id: str) -> None:
                with httpx.Client(base_url=base, timeout=120) as own:
                    while not stop.is_set():
                        try:
                            answer = own.post(f"/v1/tasks/{task_id}/classify", files=probe)
                            statuses.append(answer.status_code)
                            served_by.append(answer.headers.get(REPLICA_HEADER, ""))
                        except httpx.HTTPError as error:
                            statuses.append(type(error).__name__)

            counts_before = encoder_counts()
            streams = [threading.Thread(target=stream, args=(task,)) for task in (task_a, task_b) * 2]
            for thread in streams:
                thread.start()
            time.sleep(4)
            counts_during = encoder_counts()
            result["encoder_rows_by_replica"] = rows_by_caller_since(counts_before, counts_during)
            result["encoder_mixed_batches"] = counts_during["mixed_batches"] - counts_before["mixed_batches"]
            result["encoder_batches"] = counts_during["batches"] - counts_before["batches"]
            pids = replica_pids()
            result["replica_pids"] = pids
            os.kill(pids[0], signal.SIGKILL)
            killed_at = len(statuses)
            result["replaced_after_s"] = wait_for(
                lambda: running_replicas() == 2 and pids[0] not in replica_pids() and len(replica_pids()) == 2,
                300,
                "the killed replica replaced",
            )
            after_replacement = len(statuses)
            time.sleep(3)
            stop.set()
            for thread in streams:
                thread.join(120)
            result["requests"] = len(statuses)
            result["requests_before_kill"] = killed_at
            result["requests_after_replacement"] = len(statuses) - after_replacement
            result["failures"] = [s for s in statuses if s != 200]
            result["replicas_after"] = replica_pids()
            # The replacement serves: a new task goes to the replica holding the fewest tasks.
            _, result["replacement"] = tasks.on_a_replica_other_than({replica_a, replica_b}, probe)
            result["served_by_during_streams"] = sorted(set(served_by))
    finally:
        serve.shutdown()
        ray.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
