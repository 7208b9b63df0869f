"""SIGKILL a process while it saves, against every backend (the contract suite's `backend`): an
acknowledged version is never lost, a half version is never visible, a killed save leaves nothing
behind that the next load does not clean or ignore."""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.store import TaskSnapshot
from tests.stores.backends import Backend
from tests.stores.snapshots import assert_identical

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KILLS = 16


def crash_loop_snapshot(version: int) -> TaskSnapshot:
    keys = np.full((200 + version % 97, 128), version, dtype=np.float32) + np.arange(128, dtype=np.float32)
    index = np.full(50_000 + version, version % 251, dtype=np.uint8)
    text = np.arange(1000, dtype=np.float32)  # never changes: a store may share it between versions
    arrays: dict[str, np.ndarray[Any, Any]] = {"keys": keys, "method/x/index": index, "text": text}
    return TaskSnapshot("acme", "cats", version, {"version": version}, arrays)


CHILD_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from app.store import LocalDirStore, TaskSnapshot
{snapshot_source}
location = sys.argv[1]
if location.startswith("postgresql://"):
    from app.store.postgres import PostgresStore
store = {child_open}
version = store.live_version("acme", "cats") or 0
print("ready", flush=True)
while True:
    version += 1
    store.save(crash_loop_snapshot(version))
    print(version, flush=True)
"""


def test_sigkill_during_saves_never_loses_an_acknowledged_version(backend: Backend) -> None:
    script = CHILD_SCRIPT.format(
        snapshot_source=textwrap.dedent(inspect.getsource(crash_loop_snapshot)), child_open=backend.child_open
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    delays = random.Random(7)
    known = 0  # the newest version known to be stored: acknowledged, or restored after the previous kill
    acknowledged_saves = 0
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", script, backend.location],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        assert child.stdout is not None
        if child.stdout.readline() != "ready\n":
            child.kill()
            raise AssertionError(f"child did not start: {child.communicate()[1]}")
        time.sleep(delays.uniform(0.02, 0.3))
        child.send_signal(signal.SIGKILL)
        # Read on through the same text stream: readline may have buffered lines past "ready", which
        # communicate() (reading the raw pipe) would lose.
        out = child.stdout.read()
        err = child.communicate(timeout=10)[1]  # the rest: stderr, then the exit
        acknowledged = [int(line) for line in out.split()]
        acknowledged_saves += len(acknowledged)
        known = max([known, *acknowledged])

        backend.settle()
        restored, damaged = backend.open().load_all()  # a restart: a new store object on the same storage
        assert damaged == []
        if known == 0 and not restored:
            continue
        assert len(restored) == 1
        version = restored[0].version
        assert known <= version <= known + 1, (acknowledged, err[-2000:])  # +1: committed, killed before the print
        assert_identical(restored[0], crash_loop_snapshot(version))
        assert backend.beyond_live("acme", "cats", version) == []  # one version, and only what it uses
        known = version
    assert acknowledged_saves >= KILLS // 2  # the children really were saving when they were killed
