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


def test_requirements_are_the_projects_dependencies_its_build_backend_and_the_init() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps, build = requirements("--part", "deps"), requirements("--part", "build")
    assert deps[: len(pyproject["project"]["dependencies"])] == pyproject["project"]["dependencies"]
    image_only = [line.split("#")[0].strip() for line in IMAGE_REQUIREMENTS.read_text().splitlines()]
    assert [r for r in image_only if r] == deps[len(pyproject["project"]["dependencies"]) :]
    assert build == pyproject["build-system"]["requires"]
    assert requirements() == deps + build, "the wheelhouse holds both lists"


def test_requirements_of_another_pyproject(tmp_path: Path) -> None:
    # The Dockerfile runs it on its own copy of pyproject.toml (/opt/build), not on the repository's.
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\ndependencies = ["a>=1"]\n[build-system]\nrequires = ["b"]\n')
    assert requirements("--part", "build", str(other)) == ["b"]
    assert requirements("--part", "deps", str(other))[0] == "a>=1"


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
    # The image installs binaries only too, so it needs nothing the wheelhouse could not hold.
    assert "pip install --only-binary=:all: -r /opt/build/requirements.txt" in DOCKERFILE.read_text()


def _commands(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))


def test_image_test_script_never_pulls_and_binds_loopback() -> None:
    assert shutil.which("bash"), "bash runs the script"
    subprocess.run(["bash", "-n", str(TEST_SCRIPT)], check=True, timeout=30)
    commands = _commands(TEST_SCRIPT.read_text())
    assert "docker pull" not in commands
    assert "--pull" not in commands
    # Builds see no network at all; the container shares the host's, so the service binds 127.0.0.1.
    assert re.search(r"docker build --network none", commands)
    assert re.search(r"docker run -d .*--network host", commands)
    assert "-e SHOTCACHE_HOST=127.0.0.1" in commands
    # Its own daemon is stopped by the PID it started, never by name.
    assert 'kill "$DOCKERD_PID"' in commands
    assert "pkill" not in commands
    assert "killall" not in commands
