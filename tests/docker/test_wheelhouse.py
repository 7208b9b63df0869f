"""What an air-gapped build needs: `make wheelhouse` downloads exactly what the image installs
(docker/requirements.py, for Linux x86_64 / CPython 3.11), and docker/test-image.sh, the full image
proof, never pulls and keeps the service on loopback."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .dockerfile import DOCKERFILE, IMAGE_REQUIREMENTS, MAKEFILE, REPO, REQUIREMENTS_SCRIPT, TEST_SCRIPT


def requirements(*args: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, str(REQUIREMENTS_SCRIPT), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return run.stdout.splitlines()


TORCH_STACK = {"torch", "torchvision", "open-clip-torch", "timm", "transformers", "onnx", "onnxscript"}


def names(lines: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]).lower() for line in lines}


def test_requirements_of_each_stage() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dependencies = pyproject["project"]["dependencies"]
    builder, runtime, build = (requirements("--part", p) for p in ("builder", "runtime", "build"))
    # The builder builds and exports the model: every dependency, torch included.
    assert builder == dependencies
    assert build == pyproject["build-system"]["requires"]
    # The runtime serves from exports: pyproject's own specifiers for the names it keeps, plus the init.
    image_only = [line.split("#")[0].strip() for line in IMAGE_REQUIREMENTS.read_text().splitlines()]
    image_only = [r for r in image_only if r]
    assert runtime[len(runtime) - len(image_only) :] == image_only
    assert set(runtime[: len(runtime) - len(image_only)]) <= set(dependencies)
    assert not names(runtime) & TORCH_STACK, "the runtime image is torch-free"
    assert {"onnxruntime", "tokenizers", "fastapi", "uvicorn", "faiss-cpu", "numpy", "pillow"} <= names(runtime)
    # The wheelhouse holds every stage's wheels.
    everything = requirements()
    assert set(everything) == set(builder + runtime + build)
    assert len(everything) == len(set(everything))


def test_requirements_of_another_pyproject(tmp_path: Path) -> None:
    # The Dockerfile runs it on its own copy of pyproject.toml (/opt/build), not on the repository's.
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\ndependencies = ["a>=1"]\n[build-system]\nrequires = ["b"]\n')
    assert requirements("--part", "build", str(other)) == ["b"]
    assert requirements("--part", "builder", str(other)) == ["a>=1"]
    # A runtime name pyproject.toml does not depend on is an error, not a silently unpinned install.
    run = subprocess.run(
        [sys.executable, str(REQUIREMENTS_SCRIPT), "--part", "runtime", str(other)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0
    assert "numpy" in run.stderr


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make to dry-run the wheelhouse target")


@needs_make
def test_make_wheelhouse_downloads_the_image_requirements_for_linux_cp311(tmp_path: Path) -> None:
    make = ["make", "-n", "--no-print-directory", "-f", str(MAKEFILE), "-C", str(REPO)]
    run = subprocess.run(
        [*make, "wheelhouse", f"WHEELHOUSE={tmp_path}/w", "PYTHON=py"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    commands = [shlex.split(line) for line in run.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    (listing,) = [c for c in commands if c[:2] == ["py", "docker/requirements.py"]]
    assert listing[2:] == [">", f"{tmp_path}/w/requirements.txt"], "all parts: deps and build backend"
    (download,) = [c for c in commands if c[:4] == ["py", "-m", "pip", "download"]]
    options = " ".join(download)
    for option in ("--only-binary=:all:", "--implementation cp", "--python-version 3.11", "--abi cp311"):
        assert option in options
    assert f"-r {tmp_path}/w/requirements.txt" in options
    assert f"--dest {tmp_path}/w" in options
    platforms = re.findall(r"--platform (\S+)", options)
    assert platforms
    assert all(p.endswith("_x86_64") for p in platforms)
    # pip download takes only the tags it is given: every glibc up to bookworm's 2.36 must be named.
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"} <= set(platforms)
    # The image installs these lists, binaries only, so it needs nothing the wheelhouse could not hold.
    text = DOCKERFILE.read_text()
    for part in ("builder", "runtime"):
        assert f"requirements.py --part {part} /opt/build/pyproject.toml > /opt/build/{part}.txt" in text
        assert re.search(rf"pip install --only-binary=:all: (-c \S+ )?-r /opt/build/{part}.txt", text)


def _commands(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))


def test_image_test_script_never_pulls_and_binds_loopback() -> None:
    assert shutil.which("bash"), "bash runs the script"
    subprocess.run(["bash", "-n", str(TEST_SCRIPT)], check=True, timeout=30)
    commands = _commands(TEST_SCRIPT.read_text())
    assert "docker pull" not in commands
    assert "podman pull" not in commands
    # The only --pull is podman's and buildah's "never" (their default would pull a missing base).
    assert set(re.findall(r"--pull\S*", commands)) == {"--pull=never"}
    # Builds see no network at all; the container shares the host's, so the service binds 127.0.0.1.
    builds = re.findall(r"exec (docker build|podman build|buildah bud)( [^\n]*)", commands)
    assert {tool for tool, _ in builds} == {"docker build", "podman build", "buildah bud"}
    assert re.search(r"local args=\(--network none ", commands), "every builder gets --network none"
    assert re.search(r'"\$ENGINE" run -d .*--network host', commands)
    assert "-e SHOTCACHE_HOST=127.0.0.1" in commands
    # Its own daemon is stopped by the PID it started, never by name.
    assert 'kill "$DOCKERD_PID"' in commands
    assert "pkill" not in commands
    assert "killall" not in commands


def test_image_test_script_proves_podman_with_the_health_check_kept() -> None:
    commands = _commands(TEST_SCRIPT.read_text())
    # --format docker keeps HEALTHCHECK; --layers=false keeps the disk use to one commit per stage.
    for tool in ("podman build", "buildah bud"):
        assert re.search(rf"exec {tool} --format docker --layers=false --pull=never ", commands), tool
    # podman exits 0 when signalled mid-build: success is the image being there, not the exit status.
    assert re.search(r'"\$ENGINE" image inspect "\$TAG-\$builder"', commands)
    # Its own store and temp dir, overlay storage, and a store reset only when its own config is in force.
    assert 'driver = "overlay"' in commands
    assert "export CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf" in commands
    assert "export TMPDIR=$PODMAN_DIR/tmp" in commands
    reset = commands.index("podman system reset -f")
    guard = commands.rindex('"${CONTAINERS_STORAGE_CONF:-}" = "$PODMAN_DIR/storage.conf"', 0, reset)
    assert guard < reset
    # Without systemd nothing runs podman's health check on its interval: the script runs it.
    assert "podman healthcheck run" in commands
    # A build is stopped before the disk fills.
    assert re.search(r"MIN_FREE_GB=\$\{SHOTCACHE_MIN_FREE_GB:-\d+\}", commands)
