"""docker/compose.yaml: builds this repository, keeps tasks in a named volume, takes keys from the
environment, sizes threads to its CPU limit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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


def test_compose_passes_every_build_arg_through(compose: dict[str, Any]) -> None:
    from .conftest import parse_dockerfile

    parsed = parse_dockerfile(DOCKERFILE.read_text())
    names = set(parsed.global_args)
    for stage in parsed.stages:
        names |= {i.args.partition("=")[0] for i in stage.all("ARG")}
    args = _service(compose)["build"]["args"]
    assert set(args) == names, f"not passed through: {sorted(names - set(args))}"
    # From the caller's environment, defaulting to the Dockerfile's own default (or unset = empty).
    assert all(str(v).startswith("${") for v in args.values())
    assert args["PYTHON_IMAGE"].endswith(":-python:3.11-slim}"), "an empty FROM would not build"


def test_compose_file_parses_in_compose_v1(compose: dict[str, Any]) -> None:
    # docker-compose 1.x rejects a top-level `name:`; docker/README.md gives `-p shotcache` instead.
    assert "name" not in compose
    assert "-p shotcache" in COMPOSE.read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_v1_accepts_the_file() -> None:
    run = subprocess.run(
        ["docker-compose", "-p", "shotcache", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PIP_INDEX_URL": "https://mirror.example/simple"},
    )
    assert run.returncode == 0, run.stderr
    assert "PIP_INDEX_URL: https://mirror.example/simple" in run.stdout, "build args from the environment"


def _compose_v2() -> list[str] | None:
    """A Compose v2 command: $SHOTCACHE_COMPOSE_V2 (a docker-compose v2 binary), `docker compose`, or a
    `docker-compose` that is v2; None when there is none (Debian 12 packages only v1)."""
    candidates = [[path] for path in (os.environ.get("SHOTCACHE_COMPOSE_V2"), shutil.which("docker-compose")) if path]
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for command in candidates:
        try:
            run = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if run.returncode == 0 and re.match(r"v?2\.", run.stdout.strip()):
            return command
    return None


COMPOSE_V2 = _compose_v2()


@pytest.mark.skipif(
    COMPOSE_V2 is None,
    reason="no Compose v2: neither `docker compose` nor SHOTCACHE_COMPOSE_V2=<a docker-compose v2 binary> "
    "(docker/README.md, Compose, says where to get one)",
)
def test_docker_compose_v2_accepts_the_file() -> None:
    assert COMPOSE_V2 is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PIP_INDEX_URL": "https://mirror.example/simple",
        "SHOTCACHE_BUILD_WHEELHOUSE": "wheelhouse",
        "SHOTCACHE_API_KEYS": "acme:secret",
    }
    run = subprocess.run(
        [*COMPOSE_V2, "-p", "shotcache", "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    service = json.loads(run.stdout)["services"]["shotcache"]
    args = service["build"]["args"]
    assert args["PIP_INDEX_URL"] == "https://mirror.example/simple", "build args from the environment"
    assert args["WHEELHOUSE"] == "wheelhouse"
    assert service["environment"]["SHOTCACHE_API_KEYS"] == "acme:secret"
    assert service["deploy"]["resources"]["limits"]["cpus"] in (2, 2.0, "2")
    assert [(p["host_ip"], str(p["published"]), p["target"]) for p in service["ports"]] == [("127.0.0.1", "8000", 8000)]
