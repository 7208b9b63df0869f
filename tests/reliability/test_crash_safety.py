"""SIGKILL the real `shotcache serve` during task creation and while adding shots, restart it, and check
that every acknowledged task is intact and classifies as before, and that no half-written task is visible.

What exactly is accepted after each restart is in tests/reliability/crash_loop.py. A restart costs
12-20 s here (model load and warm-up on 2 busy cores), so CI runs a few iterations; the full loop is

    SHOTCACHE_CRASH_ITERATIONS=60 .venv/bin/pytest tests/reliability/test_crash_safety.py
    .venv/bin/python -m tests.reliability.crash_loop --iterations 60     # the same code, with progress
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .crash_loop import CrashLoop
from .images import DatasetMissingError, dataset_root

ITERATIONS = int(os.environ.get("SHOTCACHE_CRASH_ITERATIONS", "8"))


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_acknowledged(model_data_dir: Path, tmp_path: Path) -> None:
    try:
        dataset_root()
    except DatasetMissingError as exc:
        pytest.skip(str(exc))
    # A fixed seed by default keeps CI's kill schedule reproducible; set SHOTCACHE_CRASH_SEED=random to explore.
    chosen = os.environ.get("SHOTCACHE_CRASH_SEED", "20261126")
    seed = random.SystemRandom().randrange(2**32) if chosen == "random" else int(chosen)
    lines: list[str] = []
    loop = CrashLoop(tmp_path / "data", model_data_dir, seed=seed, log=lines.append)
    report = loop.run(ITERATIONS)
    print(f"seed {seed}\n" + "\n".join(lines) + "\n" + report.summary())

    assert report.iterations == ITERATIONS
    # Both kinds of write were killed while in flight (the first of each kind is killed early on purpose;
    # the others land anywhere, about 70% of them in flight over the 60-kill runs).
    killed_in_flight = {kind for kind in ("create", "shots") if report.outcomes[f"{kind}: killed in flight"]}
    assert killed_in_flight == ({"create", "shots"} if ITERATIONS >= 2 else {"create"}), report.summary()
    # Every restart verified the acknowledged tasks (at least the seed task, acknowledged before any kill).
    assert report.tasks_checked >= ITERATIONS
    assert len(report.ready_seconds) == ITERATIONS + 1
