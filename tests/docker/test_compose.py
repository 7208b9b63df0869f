"""docker/compose.yaml: builds this repository, keeps tasks in a named volume, takes keys from the
environment, sizes threads to its CPU limit."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .dockerfile import COMPOSE, DOCKERFILE, REPO


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML comes with transformers and timm; no dependency of its own for one test file.
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with transformers) is needed to read compose.yaml")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_builds_this_repository_with_the_dockerfile(compose: dict[str, Any]) -> None:
    service = _service(compose)
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_publishes_8000_and_keeps_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    service = _service(compose)
    assert any(str(port).endswith(":8000") for port in service["ports"])
    mounts = [str(v).split(":") for v in service["volumes"]]
    data_mounts = [m for m in mounts if len(m) >= 2 and m[1] == "/data"]
    assert data_mounts, "tasks must outlive the container"
    volumes = compose.get("volumes")
    assert isinstance(volumes, dict)
    assert data_mounts[0][0] in volumes, "a named volume, declared at top level"


def test_compose_takes_secrets_from_the_environment(compose: dict[str, Any]) -> None:
    env = _service(compose)["environment"]
    assert env["SHOTCACHE_API_KEYS"] == "${SHOTCACHE_API_KEYS:-}"
    assert all(str(v).startswith("${") for k, v in env.items() if "KEY" in k), "no key written into the file"


def test_compose_sizes_threads_to_its_cpu_limit_and_restarts(compose: dict[str, Any]) -> None:
    service = _service(compose)
    cpus = float(service["deploy"]["resources"]["limits"]["cpus"])
    threads = re.fullmatch(r"\$\{SHOTCACHE_THREADS:-(\d+)\}", str(service["environment"]["SHOTCACHE_THREADS"]))
    assert threads
    assert int(threads.group(1)) == int(cpus)
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    # The image's HEALTHCHECK on /readyz is the one in force unless compose replaces it with another.
    if "healthcheck" in service:
        assert "/readyz" in json.dumps(service["healthcheck"])


def _service(compose: dict[str, Any]) -> Any:
    services = compose["services"]
    assert isinstance(services, dict)
    assert list(services) == ["shotcache"]
    return services["shotcache"]
