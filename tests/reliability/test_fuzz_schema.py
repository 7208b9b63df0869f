"""Schemathesis against the service's own OpenAPI schema, in process: no 5xx, and every answer (status,
content type, headers, body) as the schema documents it. Once with the API open, once with API keys.

Cases are generated from the schema (positive and negative), then some are steered so the fuzzer also
reaches the code behind the 404s: a real task id instead of a random one, real image bytes (valid images
and the hostile corpus) instead of random bytes, labels matching the images, another tenant's or a
forged key. Checks: every schemathesis check except `positive_data_acceptance` (the schema cannot say
"one label per image" or "at least 2 classes", so schema-valid requests are rightly refused with 422),
and `negative_data_rejection` only for cases left as generated (a steered case may have been made valid).

    SHOTCACHE_FUZZ_EXAMPLES=1200 .venv/bin/pytest tests/reliability/test_fuzz_schema.py -s   # the full run
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from tests.app.hostile_images import all_hostile_files

from .conftest import FuzzApp
from .hostile_extra import extra_files
from .images import image_bytes, image_paths

# Generated requests over both apps (the open one and the one with keys get half each).
BUDGET = int(os.environ.get("SHOTCACHE_FUZZ_EXAMPLES", "400"))
CLASSES = ("cat", "dog")  # the base tasks' classes


@cache
def valid_images() -> tuple[bytes, ...]:
    return tuple(image_bytes(p) for label in (*CLASSES, "bird") for p in image_paths("train", label)[10:13])


@cache
def corpus(*, accepted: bool | None = None) -> tuple[bytes, ...]:
    """Hostile files under 1 MB (the 6-10 MB ones go through test_hostile_corpus.py): all of them, or only
    those that must decode (`accepted=True`)."""
    files = [(f.data, f.expected_status == 200) for f in all_hostile_files()]
    files += [(f.data, f.accepted) for f in extra_files()]
    return tuple(data for data, ok in files if len(data) < 1_000_000 and accepted in (None, ok))


@dataclass
class Stats:
    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # distinct failure -> first example

    def table(self) -> str:
        rows = sorted(self.statuses.items())
        return "\n".join(f"  {label:40s} {status}: {count}" for (label, status), count in rows)


def _operation(result: Any) -> Any:
    """The operation of a schemathesis `Result`, or the schema error it holds raised."""
    if hasattr(result, "err"):
        raise result.err()
    return result.ok()


def _has_inputs(operation: Any) -> bool:
    """Whether a case of `operation` can differ from another: a body, a path parameter or an auth header."""
    return bool(operation.body or operation.path_parameters or operation.definition.raw.get("security"))


def _weight(operation: Any) -> int:
    """Share of the budget: operations taking uploads get most, then those naming a task."""
    if operation.body:
        return 6
    return 2 if operation.path_parameters else 1


@dataclass
class Steered:
    changed: bool = False  # the case may no longer be what its generation mode says
    real_key: bool = False  # it carries a valid API key (schemathesis may think it forged one)


def _steer(case: Any, draw: Callable[[Any], Any], fuzz: FuzzApp, *, valid: bool = False) -> Steered:
    """Point some generated cases at real things (see the module docstring); `valid`: make it a request that
    should succeed (the owner's key, the base task, real images, matching labels)."""
    steered = Steered()
    headers = dict(case.headers or {})
    if fuzz.name == "keys":
        # None keeps the generated Authorization header; the owner is drawn more often to get past the 401s.
        caller = fuzz.owner if valid else draw(st.sampled_from([None, fuzz.owner, fuzz.owner, *fuzz.headers]))
        if caller is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"} | fuzz.headers[caller]
            case.headers = headers
            steered.changed = True
            steered.real_key = caller in fuzz.valid_callers
    params = case.path_parameters or {}
    if "task_id" in params:
        pool = list(fuzz.throwaway) if case.method.upper() == "DELETE" else [*fuzz.tasks, *fuzz.throwaway]
        if valid:
            params["task_id"] = fuzz.tasks[0]
            steered.changed = True
        elif pool and draw(st.booleans()):
            params["task_id"] = draw(st.sampled_from(pool))
            steered.changed = True
    body = case.body
    multipart = case.media_type == "multipart/form-data"  # those routes all take `images`; PATCH takes JSON
    if not isinstance(body, dict) or not case.operation.body or not multipart:
        return steered
    level = "valid" if valid else draw(st.sampled_from(["generated", "files", "valid"]))
    if level == "files" and isinstance(body.get("images"), list) and body["images"]:
        files = valid_images() + corpus()
        body["images"] = [draw(st.sampled_from(files)) if draw(st.booleans()) else item for item in body["images"]]
        steered.changed = True
    elif level == "valid":
        path = case.operation.path
        count = draw(st.integers(min_value=1, max_value=3))
        images = [draw(st.sampled_from(valid_images() + corpus(accepted=True))) for _ in range(count)]
        if path.endswith("/classify"):
            case.body = {"images": images, "top_k": draw(st.integers(min_value=1, max_value=5))}
            if draw(st.booleans()):
                case.body["abstain"] = draw(st.booleans())
        else:
            labels = [draw(st.sampled_from((*CLASSES, "bird"))) for _ in images]
            if path == "/v1/tasks":  # a create needs two classes
                images, labels = [*images, *valid_images()[:1], *valid_images()[3:4]], [*labels, *CLASSES]
                if not valid and draw(st.booleans()):  # one refused file: the build fails (now or in the background)
                    images[-1] = draw(st.sampled_from(corpus(accepted=False)))
                case.body = {"images": images, "labels": labels, "wait": draw(st.booleans())}
            else:
                case.body = {"images": images, "labels": labels}
        steered.changed = True
    return steered


def _fuzz_operation(
    fuzz: FuzzApp, operation: Any, mode: Any, examples: int, stats: Stats, *, valid: bool = False
) -> None:
    import schemathesis.checks as checks
    from schemathesis.core.failures import Failure, FailureGroup

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,  # failures are collected and reported below, not raised
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy(generation_mode=mode))
        steered = _steer(case, data.draw, fuzz, valid=valid)
        excluded = [checks.positive_data_acceptance]
        if steered.changed:
            excluded.append(checks.negative_data_rejection)
        if steered.real_key:
            excluded.append(checks.ignored_auth)
        stats.requests += 1
        try:
            response = case.call_and_validate(excluded_checks=excluded)
        except (Failure, FailureGroup) as exc:
            found = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
            for failure in found:
                title = getattr(failure, "title", type(failure).__name__)
                key = f"{fuzz.name} {mode.value} {operation.label}: {title}"
                stats.failures.setdefault(key, f"{failure}\n{case.as_curl_command()}"[:3000])
            return
        stats.statuses[(operation.label, response.status_code)] += 1
        if response.status_code in (201, 202) and operation.label == "POST /v1/tasks":
            fuzz.throwaway.append(response.json()["id"])

    before = stats.requests
    try:
        run()
    except Unsatisfiable:
        # Nothing to break: e.g. a free-form string path parameter is the only input. Spend the share on
        # positive cases instead.
        if stats.requests == before and mode.value == "negative":
            _fuzz_operation(fuzz, operation, type(mode).POSITIVE, examples, stats, valid=valid)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["open", "keys"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_apps: dict[str, FuzzApp], which: str) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    fuzz = fuzz_apps[which]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz.app)
    operations = [_operation(result) for result in schema.get_all_operations()]
    # Operations without inputs (healthz, readyz, metrics; and the GETs of the open app) have one possible
    # request: sent once, outside the budget. The budget is shared by the rest, in both generation modes.
    plan = [
        (operation, mode)
        for operation in operations
        if _has_inputs(operation)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    total_weight = sum(_weight(operation) for operation, _ in plan)
    stats = Stats()
    started = time.monotonic()
    for operation in operations:
        if not _has_inputs(operation):
            _fuzz_operation(fuzz, operation, GenerationMode.POSITIVE, 1, stats)
    fixed = stats.requests
    for operation, mode in plan:
        examples = math.ceil(BUDGET / 2 * _weight(operation) / total_weight)
        _fuzz_operation(fuzz, operation, mode, examples, stats)
    generated = stats.requests - fixed
    # A few requests per upload route made valid, so success answers are always schema-checked as well.
    for operation in operations:
        if operation.body:
            _fuzz_operation(fuzz, operation, GenerationMode.POSITIVE, 3, stats, valid=True)
    elapsed = time.monotonic() - started
    print(f"\n{which}: {stats.requests} requests ({generated} from the budget) in {elapsed:.0f} s\n{stats.table()}")

    assert not stats.failures, "\n\n".join(f"{key}\n{example}" for key, example in stats.failures.items())
    assert generated >= 0.95 * BUDGET / 2, generated
    # Success answers were produced and schema-checked too.
    reached = {label for (label, status), _ in stats.statuses.items() if status < 300}
    assert {"POST /v1/tasks", "POST /v1/tasks/{task_id}/classify", "POST /v1/tasks/{task_id}/shots"} <= reached, (
        stats.table()
    )
    # With keys, calls without a known key were refused.
    if which == "keys":
        assert any(status == 401 for (_, status) in stats.statuses), stats.table()
