"""docker/entrypoint.sh, run here with sh on temporary directories: it links the baked model into the
data volume, leaves the volume's own models alone, and sizes thread pools to the container's CPU limit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .dockerfile import ENTRYPOINT

SH = shutil.which("sh")
needs_sh = pytest.mark.skipif(SH is None, reason="no POSIX sh to run docker/entrypoint.sh with")


def run_entrypoint(tmp_path: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    assert SH is not None
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SHOTCACHE_BAKED_DIR": str(tmp_path / "baked"),
        "SHOTCACHE_DATA_DIR": str(tmp_path / "data"),
        # An empty cgroup folder unless a test writes one: the host's own limits must not leak in.
        "SHOTCACHE_CGROUP_ROOT": str(tmp_path / "cgroup"),
    }
    (tmp_path / "cgroup").mkdir(exist_ok=True)
    return subprocess.run(
        [SH, str(ENTRYPOINT), *command], env={**base, **env}, capture_output=True, text=True, timeout=30, check=False
    )


def show_threads() -> tuple[str, ...]:
    return ("sh", "-c", 'echo "${SHOTCACHE_THREADS-unset} ${OMP_NUM_THREADS-unset} ${OPENBLAS_NUM_THREADS-unset}"')


@needs_sh
def test_entrypoint_links_the_baked_model_into_the_data_dir(tmp_path: Path) -> None:
    standin = tmp_path / "baked/models/offline-standin"
    weights = tmp_path / "baked/hub-cache/models--timm--vit_base_patch32_clip_224.openai"
    for folder in (standin, weights, tmp_path / "baked/hub-cache/.locks"):
        folder.mkdir(parents=True)
    (standin / "shotcache_recipe.json").write_text("{}")
    run = run_entrypoint(tmp_path, "sh", "-c", "exit 7")
    assert run.returncode == 7, run.stderr  # exec'd: the command's own exit status comes back
    data = tmp_path / "data"
    assert (data / "models/offline-standin").resolve() == standin
    assert (data / "models/offline-standin/shotcache_recipe.json").is_file()
    assert (data / "hub-cache" / weights.name).resolve() == weights
    assert not (data / "hub-cache/.locks").exists(), "hub lock folders are not model data"
    # A second start finds its links in place and changes nothing.
    assert run_entrypoint(tmp_path, "true").returncode == 0
    assert (data / "models/offline-standin").resolve() == standin


@needs_sh
def test_entrypoint_leaves_the_volumes_own_models_alone(tmp_path: Path) -> None:
    (tmp_path / "baked/models/offline-standin").mkdir(parents=True)
    own = tmp_path / "data/models/offline-standin"
    own.mkdir(parents=True)
    (own / "mine").write_text("built in this volume")
    assert run_entrypoint(tmp_path, "true").returncode == 0
    assert not own.is_symlink()
    assert (own / "mine").read_text() == "built in this volume"


@needs_sh
def test_entrypoint_drops_links_to_models_the_image_no_longer_has(tmp_path: Path) -> None:
    (tmp_path / "baked/hub-cache").mkdir(parents=True)
    (tmp_path / "data/hub-cache").mkdir(parents=True)
    stale = tmp_path / "data/hub-cache/models--gone"
    stale.symlink_to(tmp_path / "baked/hub-cache/models--gone")
    foreign = tmp_path / "data/hub-cache/models--elsewhere"
    foreign.symlink_to(tmp_path / "somewhere-else")
    assert run_entrypoint(tmp_path, "true").returncode == 0
    assert not stale.is_symlink()
    assert foreign.is_symlink(), "links the image did not make are not the entrypoint's to remove"


@needs_sh
def test_entrypoint_says_why_when_the_data_dir_is_not_usable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    run = run_entrypoint(tmp_path, "true", SHOTCACHE_DATA_DIR=str(tmp_path / "a-file/data"))
    assert run.returncode != 0
    assert "not writable" in run.stderr
    assert "chown" in run.stderr


@needs_sh
@pytest.mark.parametrize(
    ("cgroup_files", "env", "expected"),
    [
        ({}, {}, "unset unset unset"),  # no limit known: the service's own default (CPU count)
        ({"cpu.max": "max 100000\n"}, {}, "unset unset unset"),
        ({"cpu.max": "200000 100000\n"}, {}, "2 2 2"),  # docker run --cpus 2
        ({"cpu.max": "150000 100000\n"}, {}, "1 1 1"),  # rounded down, never above the quota
        ({"cpu.max": "50000 100000\n"}, {}, "1 1 1"),  # at least one
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, {}, "4 4 4"),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, {}, "unset unset unset"),
        ({"cpu.max": "200000 100000\n"}, {"SHOTCACHE_THREADS": "3"}, "3 3 3"),  # the setting wins
        ({}, {"SHOTCACHE_THREADS": "2", "OMP_NUM_THREADS": "1"}, "2 1 2"),  # and explicit pools win over it
    ],
)
def test_entrypoint_sizes_thread_pools_to_the_cpu_limit(
    tmp_path: Path, cgroup_files: dict[str, str], env: dict[str, str], expected: str
) -> None:
    for name, text in cgroup_files.items():
        path = tmp_path / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    run = run_entrypoint(tmp_path, *show_threads(), **env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
