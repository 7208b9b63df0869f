"""`shotcache task ...` and `shotcache classify` (api.cli) against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import main
from tests.conftest import REPO

from .conftest import ALICE_KEY, CLASSES, SHOTS, Server, images


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_task_commands(open_server: Server, shot_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = ("--url", open_server.url)
    code, out, err = run(
        "task",
        "create",
        "--from-folder",
        str(shot_folder),
        "--name",
        "cli",
        "--method",
        "auto",
        "--json",
        *url,
        capsys=capsys,
    )
    assert code == 0, err
    task = json.loads(out)
    assert {c["name"]: c["shots"] for c in task["classes"]} == dict.fromkeys(CLASSES, SHOTS)
    assert "uploading" in err  # the tqdm bars go to stderr
    assert "encoding shots" in err

    code, out, _ = run("task", "list", *url, capsys=capsys)
    assert code == 0
    header, _, *rows = out.splitlines()
    assert header.split() == ["id", "name", "classes", "shots", "method", "loo", "version"]
    assert [r.split()[:4] for r in rows] == [[task["id"], "cli", str(len(CLASSES)), str(len(CLASSES) * SHOTS)]]

    code, out, _ = run("task", "show", task["id"], *url, capsys=capsys)
    assert code == 0
    assert f"task {task['id']} (cli), version 1" in out
    # `auto` at SHOTS >= BLEND_FROM_SHOTS shots per class serves the ensemble of its two best methods: shown with them.
    assert task["method"] == "ensemble"
    first, second = task["methods"]["ensemble"]["members"]
    summary = next(line for line in out.splitlines() if line.startswith("method "))
    assert summary.startswith(f"method ensemble of {first} + {second} (")
    assert all(f"{key}=" in summary for key in task["hyperparams"])
    assert any(key.startswith(f"{first}.") for key in task["hyperparams"])
    for name in CLASSES:
        assert any(line.split()[:2] == [name, str(SHOTS)] for line in out.splitlines()), out
    # ... and why: auto's ranking, best first, the two it blends starred
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("auto (blend): "))
    shown = [line.split() for line in lines[start + 3 : start + 3 + len(task["selection"]["ranking"])]]
    assert [row[0] for row in shown] == [r["method"] for r in task["selection"]["ranking"]]
    assert [row[1] == "*" for row in shown] == [r["method"] in (first, second) for r in task["selection"]["ranking"]]

    probes = [p for ps in images("test", 1).values() for p in ps]
    code, out, _ = run("classify", task["id"], *map(str, probes), "--json", "--top-k", "2", *url, capsys=capsys)
    assert code == 0
    answer = json.loads(out)
    assert [r["filename"] for r in answer["results"]] == [p.name for p in probes]
    code, out, _ = run("classify", task["id"], *map(str, probes), "--quiet", *url, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["image", "label", "probability", "next"]
    assert [line.split()[:2] for line in lines[2:]] == [[r["filename"], r["label"]] for r in answer["results"]]

    code, out, _ = run("task", "delete", task["id"], *url, capsys=capsys)
    assert (code, out.strip()) == (0, f"deleted {task['id']}")
    code, _, err = run("task", "show", task["id"], *url, capsys=capsys)
    assert code == 1
    assert err.strip() == f"error (task_not_found): task {task['id']} not found"


def test_task_update(open_server: Server, shot_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`task update`: another method chosen from the stored shots, a new name, or none; the client's
    update_task behind it (PATCH)."""
    url = ("--url", open_server.url)
    code, out, err = run(
        "task", "create", "--from-folder", str(shot_folder), "--method", "ape", "--json", *url, capsys=capsys
    )
    assert code == 0, err
    task = json.loads(out)
    code, out, err = run("task", "update", task["id"], "--method", "auto", "--name", "renamed", *url, capsys=capsys)
    assert code == 0, err
    assert f"task {task['id']} (renamed), version 2" in out
    assert any(line.startswith("auto (blend): ") for line in out.splitlines()), out
    code, out, _ = run("task", "update", task["id"], "--clear-name", "--json", *url, capsys=capsys)
    assert code == 0
    cleared = json.loads(out)
    assert (cleared["name"], cleared["version"], cleared["method"]) == (None, 3, "ensemble")
    code, _, err = run("task", "update", task["id"], "--method", "magic", *url, capsys=capsys)
    assert code == 1
    assert err.startswith("error (unknown_method): unknown method 'magic'")
    code, _, err = run("task", "update", task["id"], *url, capsys=capsys)
    assert code == 1
    assert "nothing to change" in err
    run("task", "delete", task["id"], *url, capsys=capsys)


def test_console_script_reads_url_and_key_from_the_environment(keyed_server: Server) -> None:
    """`python -m api.cli` (the `shotcache` script's module) with SHOTCACHE_URL and SHOTCACHE_API_KEY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
    env.update(PYTHONPATH=str(REPO), SHOTCACHE_URL=keyed_server.url)
    command = [sys.executable, "-m", "api.cli", "task", "list"]
    refused = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error (unauthorized):"), refused.stderr
    env["SHOTCACHE_API_KEY"] = ALICE_KEY
    listed = subprocess.run([*command, "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"tasks": [], "building": []}
    # The service's own commands are still there.
    helped = subprocess.run(
        [sys.executable, "-m", "api.cli", "--help"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert all(word in helped.stdout for word in ("serve", "eval", "bench", "task", "classify"))


def test_serving_imports_neither_httpx_nor_the_benchmarks() -> None:
    """httpx is an extra (`client`, `bench`): the `shotcache` command's parser and the served app run without it."""
    code = (
        "import sys; import api.cli, api.main; api.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'httpx' or m == 'api.client' "
        "or (m.startswith('benchmarks.') and m != 'benchmarks.options')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["task", "list"], "api.client", "shotcache[client]"),
        (["classify", "some-task", "a.jpg"], "api.client", "shotcache[client]"),
        (["bench", "--only", "memory"], "benchmarks.runner", "shotcache[bench]"),
        (["bench", "--only", "memory"], "httpx", "shotcache[bench]"),
    ],
)
def test_a_missing_extra_is_named(
    argv: list[str], module: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError, as without the extra
    code, _, err = run(*argv, capsys=capsys)
    assert code == 2
    assert f"`shotcache {' '.join(argv[:2]) if argv[0] == 'task' else argv[0]}` needs" in err
    assert f"pip install '{extra}'" in err
