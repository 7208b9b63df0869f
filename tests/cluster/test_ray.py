"""Ray Serve: 2 task replicas and the shared encoder deployment, in private network and PID namespaces.

Ray binds every interface; inside `unshare --net` only a loopback exists, so nothing it opens is reachable
from outside. In its own PID namespace (`--pid --fork --mount-proc --kill-child`) the driver is PID 1:
when it exits, or this test kills `unshare` (timeout), the kernel kills every process Ray started.

Shown (tests/cluster/ray_driver.py): create + classify through Ray's HTTP proxy; the replicas hold no
model (their backend is the encoder deployment); classify streams of two tasks, served by the two
replicas, reach the one encoder deployment, whose `@serve.batch` batches mix them; SIGKILL of one task
replica during the streams: no request fails, and the replacement serves a new task.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.postgres_server import PostgresServer, new_schema_url
from benchmarks.server_process import link_model
from tests.cluster.replicas import REPO
from tests.conftest import dataset_dir

PORT = 19000  # Ray's HTTP proxy, inside the private network namespace (any port is free there)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the `ray` extra (in `dev`) is not installed"),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
        reason="needs root, unshare and ip (iproute2; `make system-packages`) for private namespaces",
    ),
]


def test_two_ray_replicas_serve_through_the_proxy_and_survive_a_replica_kill(
    postgres: PostgresServer, model_data_dir: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    images = dataset_dir("cifar10-mini") / "train"
    driver = [sys.executable, "-m", "tests.cluster.ray_driver", new_schema_url(postgres, "ray"), str(data_dir)]
    script = 'ip link set lo up && exec "$@"'
    namespaces = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
    # Ray's sockets live in its temp dir: a short path (AF_UNIX paths are at most 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="shotcache-ray-")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SHOTCACHE_TEST_IMAGES": str(images),
        "SHOTCACHE_TEST_RAY_TMP": ray_tmp,
    }
    try:
        result = subprocess.run(
            [*namespaces, "sh", "-c", script, "sh", *driver, str(PORT)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
            check=False,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (tmp_path / "driver.log").write_text(result.stderr)
    (tmp_path / "outcome.json").write_text(result.stdout)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["create_status"] == 201
    assert outcome["backend"].startswith("ray-encoder:")  # the replicas hold no model of their own
    assert outcome["classify_statuses"] == [200]
    assert len(outcome["labels"]) == 1  # every replica gives the same answer
    replica_a, replica_b = outcome["task_replicas"]
    assert replica_a != replica_b
    # Both tasks' classify batches reached the one encoder deployment, and some were encoded together.
    assert set(outcome["encoder_rows_by_replica"]) == {replica_a, replica_b}, outcome
    assert 0 < outcome["encoder_mixed_batches"] <= outcome["encoder_batches"], outcome
    assert len(outcome["replica_pids"]) == 2
    assert outcome["failures"] == [], outcome
    assert outcome["requests_before_kill"] > 0
    assert outcome["requests_after_replacement"] > 0
    assert len(outcome["replicas_after"]) == 2
    assert outcome["replica_pids"][0] not in outcome["replicas_after"]
    assert outcome["replacement"] not in (replica_a, replica_b)
