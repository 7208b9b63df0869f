"""What `docker build` is sent: everything the Dockerfile copies, and none of the local state (venv,
data, caches, secrets)."""

from __future__ import annotations

import re

import pytest

from .dockerfile import REPO, Dockerfile, glob_regex, in_context, with_defaults


def test_dockerignore_matcher_follows_docker_rules() -> None:
    # Pinned against docker's own rules so the context checks below mean something.
    assert not in_context("app/__pycache__/x.cpython-311.pyc")
    assert not in_context("app/encoder/stray.pyc")
    assert in_context("app/encoder/configs/models.json")
    assert in_context("docker/entrypoint.sh")
    assert not in_context("docker/Dockerfile")
    assert re.fullmatch(glob_regex("a/*/c"), "a/b/c")
    assert not re.fullmatch(glob_regex("a/*/c"), "a/b/x/c")
    assert re.fullmatch(glob_regex("**/c"), "c")
    assert re.fullmatch(glob_regex("**/c"), "a/b/c")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/tasks/acme/cats/manifest.json",
        ".cache/test-data/models/offline-standin/open_clip_model.safetensors",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/app.json",
        "shotcache.egg-info/PKG-INFO",
        "tests/conftest.py",
        ".env",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_build_context(path: str) -> None:
    assert not in_context(path)


def test_every_copied_path_is_in_the_build_context(dockerfile: Dockerfile) -> None:
    copies = [i for s in dockerfile.stages for i in s.all("COPY") if "from" not in i.flags()[0]]
    assert copies
    for instruction in copies:
        # A build arg's default is what a plain build copies (the wheelhouse placeholder).
        *sources, _dest = with_defaults(instruction.flags()[1]).split()
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            needed = [f.relative_to(REPO).as_posix() for f in files if "__pycache__" not in f.parts]
            needed = [f for f in needed if not f.endswith(".pyc")]
            assert needed, f"COPY {source}: nothing to copy"
            missing = [f for f in needed if not in_context(f)]
            assert not missing, f"COPY {source}: .dockerignore leaves out {missing[:5]}"


def test_a_wheelhouse_in_the_repository_reaches_the_builder() -> None:
    # `make wheelhouse` fills ./wheelhouse by default; --build-arg WHEELHOUSE=wheelhouse copies it.
    assert in_context("wheelhouse/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert in_context("wheelhouse/requirements.txt")
    assert "/wheelhouse/" in (REPO / ".gitignore").read_text().split(), "the wheels are never committed"
