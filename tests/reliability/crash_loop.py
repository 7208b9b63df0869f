"""SIGKILL the real server while it creates tasks and adds shots; restart it; check that nothing acknowledged
was lost or changed and that nothing half-written is visible. Repeat.

The CI test (tests/reliability/test_crash_safety.py) runs a few iterations; the full loop runs with

    .venv/bin/python -m tests.reliability.crash_loop --iterations 60

Each iteration: start `shotcache serve` on the same data dir, verify the state (below), send one create (6
shots, 2 classes; every other one with method=auto, i.e. the ensemble) or one add-shots (2 shots, sometimes a
new class), alternately, and SIGKILL the server. When, is drawn per kill, a third each: anywhere (uniform in
[0, 1.15] x the measured duration of that kind of request); near the end, where the task is written and the
answer sent ([0.8, 1.2] x); or during the write itself (as soon as the store's temp dir or temp manifest
appears on disk, plus 0-30 ms). The first create and the first add-shots are killed early ([0, 0.25] x), so
both kinds surely die in flight. Most kills land while the request is being decoded, encoded, tuned or
written; some just after the answer.

What is accepted after a restart (anything else fails the run):

* Every task acknowledged before the kill (its 201/200 answer reached the client) is listed, and
  `GET /v1/tasks/{id}` returns exactly the acknowledged body (version, classes, shot counts, method,
  hyper-parameters, leave-one-out figures, timestamps). Classifying the 4 probe images returns the same
  labels, in the same order, with probabilities within 1e-6 of those measured before the kill.
* The list holds nothing else, with one exception: a create in flight whose answer was lost (the kill
  came first). Its task may be listed if and only if it is complete: version 1, exactly the requested
  classes with the requested shot counts, and it classifies. Then it counts as acknowledged from here on.
* An add-shots in flight whose answer was lost leaves its task either at the acknowledged version,
  unchanged (same body, same probabilities), or at the next version holding every new shot (shot counts
  = old + added), never in between.
* No task is reported damaged (`/v1/info` `damaged_tasks` is empty), nothing is building, and after the
  restore every task directory on disk holds exactly `current.json` and `v<version>`: the residue of an
  interrupted save (temp dirs, unreferenced versions, `current.json.tmp`) is gone and no `.damaged/`
  quarantine exists.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from benchmarks.server_process import Server, load_average, prepare_data_dir, request_failures

from .images import CLASSES, parts, shots

TOLERANCE = 1e-6
PROBES = (("airplane", 0), ("cat", 1), ("frog", 2), ("ship", 3))  # (class, index) in cifar10-mini test/
TIMEOUT = 180.0

Answer = list[list[tuple[str, float]]]


class CrashLoopError(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CrashLoopError(message)


@dataclass
class Acked:
    """A task as last acknowledged to the client, and its probe answer (None until measured)."""

    body: dict[str, Any]
    answer: Answer | None = None

    @property
    def task_id(self) -> str:
        return str(self.body["id"])


@dataclass
class Request:
    kind: Literal["create", "shots"]
    url: str
    files: list[Any]
    data: dict[str, Any]
    expected_shots: dict[str, int]  # class -> shot count of the task if the request commits
    target: Acked | None = None  # add shots: the task as acknowledged before


@dataclass
class Report:
    iterations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    ready_seconds: list[float] = field(default_factory=list)
    kill_delays: dict[str, list[float]] = field(default_factory=lambda: {"create": [], "shots": []})
    kill_modes: Counter[str] = field(default_factory=Counter)
    partial_saves: int = 0  # kills that left a half-written save (temp dir or temp manifest) on disk
    tasks_checked: int = 0  # task verifications (GET + classify) over all restarts
    final_tasks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        ready = sorted(self.ready_seconds)
        lines = [
            f"{self.iterations} SIGKILLs, {len(ready)} restarts in {self.seconds:.0f} s "
            f"(ready after {ready[0]:.1f}-{ready[-1]:.1f} s, median {ready[len(ready) // 2]:.1f} s)",
            f"{self.tasks_checked} task verifications (GET body equal + 4-image classify within {TOLERANCE}); "
            f"{self.final_tasks} tasks at the end",
        ]
        for kind, delays in self.kill_delays.items():
            if delays:
                lines.append(f"kills during {kind}: {len(delays)}, delay {min(delays):.2f}-{max(delays):.2f} s")
        lines.append(
            "kill timing: "
            + ", ".join(f"{mode} {n}" for mode, n in sorted(self.kill_modes.items()))
            + f"; {self.partial_saves} kills left a half-written save on disk (cleaned up by the restart)"
        )
        lines.extend(f"  {name}: {count}" for name, count in sorted(self.outcomes.items()))
        return "\n".join(lines)


def _probe_parts() -> list[Any]:
    from .images import image_paths

    return parts([image_paths("test", label)[index] for label, index in PROBES])


def _shot_counts(body: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["shots"] for c in body["classes"]}


def classify_probes(client: httpx.Client, task_id: str) -> Answer:
    response = client.post(f"/v1/tasks/{task_id}/classify", files=_probe_parts(), data={"top_k": 10})
    check(response.status_code == 200, f"classify {task_id} answered {response.status_code}: {response.text}")
    return [[(e["label"], float(e["probability"])) for e in r["top_k"]] for r in response.json()["results"]]


def same_answer(a: Answer, b: Answer) -> bool:
    return all(
        [label for label, _ in x] == [label for label, _ in y]
        and all(abs(p - q) <= TOLERANCE for (_, p), (_, q) in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    ) and len(a) == len(b)


class CrashLoop:
    def __init__(self, data_dir: Path, model_data_dir: Path, *, seed: int, log: Callable[[str], None] = print) -> None:
        self.data_dir = data_dir
        self.tasks_root = data_dir / "tasks"
        self.log_dir = data_dir.parent / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        prepare_data_dir(data_dir, model_data_dir)
        self.rng = random.Random(seed)
        self.log = log
        self.acked: dict[str, Acked] = {}
        self.report = Report()
        self.estimate = {"create": 2.5, "shots": 2.0}  # seconds; replaced by measurements
        self.starts = 0

    # ---- server ---------------------------------------------------------------------------------
    def start(self) -> Server:
        self.starts += 1
        server = Server(self.data_dir, self.log_dir / f"server-{self.starts:03d}.log")
        self.report.ready_seconds.append(server.wait_ready())
        return server

    # ---- requests -------------------------------------------------------------------------------
    def next_request(self, iteration: int) -> Request:
        if iteration % 2 == 0 or not self.acked:  # alternate: kills during both kinds of write
            labels = self.rng.sample(CLASSES, 2)
            items = shots("train", labels, 3, skip=self.rng.randrange(32))
            data: dict[str, Any] = {"labels": [label for _, label in items], "name": f"crash-{iteration}"}
            if iteration % 4 == 0:  # every other create: `auto`, which stores the two-method ensemble at 3 shots
                data["method"] = "auto"
            return Request("create", "/v1/tasks", parts(items), data, {label: 3 for label in labels})
        target = self.acked[self.rng.choice(sorted(self.acked))]
        counts = _shot_counts(target.body)
        added = [self.rng.choice(sorted(counts))]
        if self.rng.random() < 0.5:
            added.append(self.rng.choice([c for c in CLASSES if c not in counts]))
        else:
            added.append(added[0])
        items = [shots("train", [label], 1, skip=self.rng.randrange(32))[0] for label in added]
        expected = dict(counts)
        for label in added:
            expected[label] = expected.get(label, 0) + 1
        return Request(
            "shots",
            f"/v1/tasks/{target.task_id}/shots",
            parts(items),
            {"labels": added},
            expected,
            target,
        )

    def send_and_kill(
        self, server: Server, request: Request, *, early: bool = False
    ) -> tuple[httpx.Response | None, float]:
        """Send `request`, SIGKILL the server after a random delay; the answer if it came first. `early`:
        within the first quarter of the request's expected duration, so the kill surely finds it in flight."""
        result: dict[str, Any] = {}

        def send() -> None:
            try:
                with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
                    result["response"] = client.post(request.url, files=request.files, data=request.data)
            except httpx.TransportError as exc:  # the kill cut the connection
                result["error"] = exc

        # A third of the kills anywhere in the request; a third near its end, where the task is written and
        # the answer sent; a third while the store is writing: once a temp dir or manifest of a save shows
        # up on disk, after 0-30 ms (a save's fsyncs take tens of ms here).
        mode = "early" if early else self.rng.choice(["anywhere", "near the end", "during the write"])
        low, high = {"early": (0.0, 0.25), "anywhere": (0.0, 1.15)}.get(mode, (0.8, 1.2))
        delay = self.rng.uniform(low, high) * self.estimate[request.kind]
        started = time.monotonic()
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        if mode == "during the write":
            deadline = started + 3 * self.estimate[request.kind] + 5
            while thread.is_alive() and time.monotonic() < deadline and not self._save_in_progress():
                time.sleep(0.0003)
            if thread.is_alive():
                time.sleep(self.rng.uniform(0.0, 0.03))
            delay = time.monotonic() - started
        else:
            thread.join(timeout=delay)
        self.report.kill_modes[mode] += 1
        answered_in_time = not thread.is_alive()
        if answered_in_time and "response" in result:
            # The answer beat the kill: measure the acknowledged version's answers before killing.
            duration = time.monotonic() - started
            self.estimate[request.kind] = 0.7 * self.estimate[request.kind] + 0.3 * duration
            response = result["response"]
            if response.status_code in (200, 201):
                with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
                    answer = classify_probes(client, response.json()["id"])
                result["answer"] = answer
        server.kill()
        if self._save_in_progress():  # the kill interrupted a save: its residue is on disk until the restart
            self.report.partial_saves += 1
        thread.join(timeout=TIMEOUT)
        check(not thread.is_alive(), "the request thread hung after the kill")
        self.report.kill_delays[request.kind].append(delay)
        response = result.get("response")
        if response is None:
            return None, delay
        check(
            response.status_code in (200, 201),
            f"{request.kind} answered {response.status_code} before the kill: {response.text}",
        )
        body = response.json()
        check(_shot_counts(body) == request.expected_shots, f"{request.kind} acknowledged the wrong shots: {body}")
        self.acked[body["id"]] = Acked(body, result.get("answer"))
        self.report.outcomes[f"{request.kind}: acknowledged before the kill"] += 1
        return response, delay

    # ---- verification ---------------------------------------------------------------------------
    def verify(self, server: Server, lost: Request | None) -> None:
        """Check the restarted server against everything acknowledged (see the module docstring)."""
        with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
            info = client.get("/v1/info").json()
            check(info["damaged_tasks"] == [], f"damaged tasks after a restart: {info['damaged_tasks']}")
            listing = client.get("/v1/tasks").json()
            check(listing["building"] == [], f"builds listed after a restart: {listing['building']}")
            listed = {t["id"]: t for t in listing["tasks"]}
            if lost is not None:
                self._resolve_lost(client, listed, lost)
            check(
                set(listed) == set(self.acked),
                f"listed tasks differ from the acknowledged ones: extra {sorted(set(listed) - set(self.acked))}, "
                f"missing {sorted(set(self.acked) - set(listed))}",
            )
            for task_id, acked in self.acked.items():
                check(listed[task_id] == acked.body, f"task {task_id} listed differently from its ack")
                got = client.get(f"/v1/tasks/{task_id}")
                check(got.status_code == 200 and got.json() == acked.body, f"task {task_id} changed: {got.text}")
                answer = classify_probes(client, task_id)
                if acked.answer is None:
                    acked.answer = answer  # first measurement of a version whose ack came at the kill
                check(
                    same_answer(answer, acked.answer),
                    f"task {task_id} v{acked.body['version']} classifies differently after the restart:\n"
                    f"  before {acked.answer}\n  after  {answer}",
                )
                self.report.tasks_checked += 1
        self._check_disk()
        failures = request_failures(server.log_path.read_text(errors="replace"))
        check(not failures, f"requests failed on the server: {failures[:5]}")

    def _resolve_lost(self, client: httpx.Client, listed: dict[str, Any], lost: Request) -> None:
        if lost.kind == "create":
            extra = [task_id for task_id in listed if task_id not in self.acked]
            check(len(extra) <= 1, f"more than one unacknowledged task appeared: {extra}")
            if not extra:
                self.report.outcomes["create: answer lost, not committed"] += 1
                return
            body = listed[extra[0]]
            check(
                body["version"] == 1
                and body["name"] == lost.data["name"]
                and _shot_counts(body) == lost.expected_shots,
                f"an unacknowledged create is visible but incomplete: {body}",
            )
            self.acked[body["id"]] = Acked(body)  # answer measured by the caller's loop
            self.report.outcomes["create: answer lost, committed (complete)"] += 1
            return
        assert lost.target is not None
        old = lost.target
        body = listed.get(old.task_id)
        check(body is not None, f"task {old.task_id} vanished after a killed add-shots")
        assert body is not None
        if body["version"] == old.body["version"]:
            check(body == old.body, f"task {old.task_id} changed without a new version: {body}")
            self.report.outcomes["shots: answer lost, not committed"] += 1
        else:
            check(
                body["version"] == old.body["version"] + 1 and _shot_counts(body) == lost.expected_shots,
                f"task {old.task_id} after a killed add-shots is neither the old nor the complete new "
                f"version: {_shot_counts(body)} v{body['version']}, expected {lost.expected_shots}",
            )
            self.acked[old.task_id] = Acked(body)
            self.report.outcomes["shots: answer lost, committed (complete)"] += 1

    def _save_in_progress(self) -> bool:
        """A save has started and not finished: a temp version dir or a temp manifest exists."""
        try:
            with os.scandir(self.tasks_root / "public") as tasks:
                for task in tasks:
                    with os.scandir(task.path) as entries:
                        if any(e.name.startswith(".tmp-") or e.name == "current.json.tmp" for e in entries):
                            return True
        except FileNotFoundError:  # no tenant dir yet, or a task dir removed meanwhile
            return False
        return False

    def _check_disk(self) -> None:
        check(not (self.tasks_root / ".damaged").exists(), "a task was quarantined as damaged")
        tenants = [p for p in self.tasks_root.iterdir()] if self.tasks_root.exists() else []
        on_disk = {}
        for tenant_dir in tenants:
            check(tenant_dir.name == "public", f"unexpected entry in the store: {tenant_dir}")
            for task_dir in tenant_dir.iterdir():
                on_disk[task_dir.name] = sorted(os.listdir(task_dir))
        expected = {task_id: sorted(["current.json", f"v{a.body['version']}"]) for task_id, a in self.acked.items()}
        check(on_disk == expected, f"store residue after the restore:\n  on disk {on_disk}\n  expected {expected}")

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, iterations: int) -> Report:
        started = time.monotonic()
        lost: Request | None = None
        server = self.start()
        try:
            # Seed: one create and one add-shots, acknowledged and measured (how long each takes).
            with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
                for seed_iteration in (-2, -1):
                    request = self.next_request(seed_iteration)
                    t0 = time.monotonic()
                    seeded = client.post(request.url, files=request.files, data=request.data)
                    check(seeded.status_code in (200, 201), seeded.text)
                    self.estimate[request.kind] = time.monotonic() - t0
                    body = seeded.json()
                    self.acked[body["id"]] = Acked(body, classify_probes(client, body["id"]))
            for iteration in range(iterations):
                request = self.next_request(iteration)
                # The first create and the first add-shots are killed early: both kinds surely die in flight.
                response, delay = self.send_and_kill(server, request, early=iteration < 2)
                lost = request if response is None else None
                self.report.iterations += 1
                if response is None:
                    self.report.outcomes[f"{request.kind}: killed in flight"] += 1
                server = self.start()
                self.verify(server, lost)
                self.log(
                    f"[{iteration + 1}/{iterations}] {request.kind} killed after {delay:.2f} s "
                    f"({'acknowledged first' if response is not None else 'in flight'}); restart ready in "
                    f"{self.report.ready_seconds[-1]:.1f} s; {len(self.acked)} tasks verified; "
                    f"load {load_average()}"
                )
        finally:
            server.kill()
        self.report.final_tasks = len(self.acked)
        self.report.seconds = time.monotonic() - started
        return self.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and server logs")
    args = parser.parse_args(argv)
    from app.encoder.standin import ensure_standin
    from tests.conftest import MODEL_DATA_DIR

    ensure_standin(MODEL_DATA_DIR)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    work = Path(tempfile.mkdtemp(prefix="shotcache-crash-"))
    print(f"seed {seed}; data and logs under {work}; load {load_average()}; {os.cpu_count()} CPUs", flush=True)
    loop = CrashLoop(work / "data", MODEL_DATA_DIR, seed=seed, log=lambda line: print(line, flush=True))
    try:
        report = loop.run(args.iterations)
    except CrashLoopError as failure:
        print(f"FAILED (seed {seed}, logs in {work / 'logs'}): {failure}", file=sys.stderr)
        return 1
    print(report.summary())
    print(json.dumps({"seed": seed, "outcomes": dict(report.outcomes), "ready_seconds": report.ready_seconds}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
