"""SIGKILL replica A while it adds shots to a task; replica B, polling the whole time, only ever serves
a whole acknowledged version (the last acknowledged one, or the one A committed as it died).

CI runs 2 kills; the proof runs 20 or more on demand (each restart of A reloads its model):
    SHOTCACHE_CLUSTER_KILLS=20 python -m pytest tests/cluster/test_replica_crashes.py
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.postgres_server import PostgresServer, new_schema_url
from benchmarks.server_process import request_failures
from tests.cluster.replicas import multipart, start_replicas
from tests.cluster.test_two_replicas import create, get, shot_counts, shots

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("SHOTCACHE_CLUSTER_KILLS", "2"))
EXTRA = ("ship", "truck", "frog", "horse", "deer", "dog")


def test_sigkill_during_add_shots_leaves_the_last_acknowledged_version(
    postgres: PostgresServer, model_data_dir: Path, tmp_path: Path
) -> None:
    a, b = start_replicas(["a", "b"], tmp_path, new_schema_url(postgres, "crash"), model_data_dir)
    try:
        task = create(a)
        # version -> shot counts of that version, for every version any replica acknowledged
        expected = {1: shot_counts(task)}
        acknowledged = 1
        delays = random.Random(12)
        for kill in range(KILLS):
            live = get(b, task["id"]).json()["version"]
            addition = (EXTRA[kill % len(EXTRA)],)
            answers: list[httpx.Response | Exception] = []

            seen: list[int] = []
            problems: list[str] = []
            stop = threading.Event()
            # Each round adds 2 new images of the next EXTRA class; a class comes round again every
            # len(EXTRA) kills, with the next 2 of its images (20 kills use 8 of a class's 32 train images).
            files = multipart(shots(addition, 2, skip=(kill // len(EXTRA)) * 2))

            def add(answers: list[httpx.Response | Exception] = answers, files: dict[str, object] = files) -> None:
                try:
                    with a.client() as client:
                        answers.append(client.post(f"/v1/tasks/{task['id']}/shots", **files))  # type: ignore[arg-type]
                except httpx.HTTPError as error:
                    answers.append(error)

            def poll(seen: list[int] = seen, problems: list[str] = problems, stop: threading.Event = stop) -> None:
                # B is asked all along: never a half version, never an error.
                with b.client() as client:
                    while not stop.is_set():
                        response = client.get(f"/v1/tasks/{task['id']}")
                        if response.status_code != 200:
                            problems.append(response.text)
                            return
                        body = response.json()
                        if body["version"] in expected and shot_counts(body) != expected[body["version"]]:
                            problems.append(f"version {body['version']} is not what was acknowledged: {body}")
                        seen.append(body["version"])

            adder, poller = threading.Thread(target=add), threading.Thread(target=poll)
            adder.start()
            poller.start()
            time.sleep(delays.uniform(0.2, 2.5))
            a.kill()
            adder.join(60)
            answer = answers[0] if answers else None
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                acknowledged = answer.json()["version"]
                expected[acknowledged] = shot_counts(answer.json())
            stop.set()
            poller.join(60)
            assert problems == []
            assert seen, "B was never asked"
            final = get(b, task["id"]).json()
            # Acknowledged is live; or one more, whole, if A committed it as it died.
            assert final["version"] in (acknowledged, acknowledged + 1), (final["version"], acknowledged)
            assert final["version"] >= live
            if final["version"] == acknowledged + 1:
                counts = dict(expected[acknowledged])
                counts[addition[0]] = 2
                assert shot_counts(final) == counts
                expected[final["version"]] = counts
                acknowledged = final["version"]
            assert seen == sorted(seen)  # B never went back to an older version
            a.start()
            a.wait_ready()
        assert get(a, task["id"]).json() == get(b, task["id"]).json()
    finally:
        a.stop()
        b.stop()
    assert request_failures(b.log_path.read_text(errors="replace")) == []
