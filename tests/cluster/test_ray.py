"""Ray Serve with 2 replicas, in a private network namespace (Ray binds every interface; inside
`unshare --net` only a loopback exists): create + classify through Ray's HTTP proxy, then SIGKILL one
replica during a stream of classify requests: no request fails and the replacement serves.

Needs the `ray` extra, which the dev environment does not install (it is ~500 MB and brings uvloop and
httptools, which uvicorn would then pick for every server): run on demand from an environment that has
it, e.g. `python -m pytest tests/cluster/test_ray.py` with shotcache[ray] installed (docs/scaling.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.replicas import REPO, free_port
from tests.conftest import dataset_dir, link_model
from tests.stores.postgres_server import PostgresServer, new_schema_url

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the `ray` extra is not installed"),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a private netns"
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
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHOTCACHE_TEST_IMAGES": str(images)}
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, "sh", *driver, str(free_port())],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=1500,
        check=False,
    )
    (tmp_path / "driver.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["create_status"] == 201
    assert outcome["classify_statuses"] == [200]
    assert len(outcome["labels"]) == 1  # every replica gives the same answer
    assert len(outcome["replica_pids"]) == 2
    assert outcome["failures"] == [], outcome
    assert outcome["requests_before_kill"] > 0
    assert outcome["requests_after_replacement"] > 0
    assert len(outcome["replicas_after"]) == 2
    assert outcome["replica_pids"][0] not in outcome["replicas_after"]
