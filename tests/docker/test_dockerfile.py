"""The image docker/Dockerfile builds keeps docker/README.md's promises: it builds with every builder
(no BuildKit-only syntax), every pip step takes one set of index build args, non-root runtime without a
package manager, health check on /readyz, port 8000, the /data volume, `shotcache serve` under an init,
the baked model where the service looks. Checked by parsing the file; the health check's probe is run
against a local HTTP server. docker/test-image.sh builds and runs the real image (docker/README.md)."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from .dockerfile import (
    DOCKER_README,
    DOCKERFILE,
    ENTRYPOINT,
    IMAGE_REQUIREMENTS,
    REPO,
    Dockerfile,
    Instruction,
    Stage,
    parse_dockerfile,
)


def test_parser_reads_continuations_comments_and_stages() -> None:
    # The checks below are only as good as the parser: it must see through what Dockerfiles use.
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG IMG=python:3.11-slim\nFROM ${IMG} AS a\nRUN echo one \\\n"
        "    # a comment inside the continuation\n    && echo two\nFROM a\nUSER 10001:10001\n"
        'CMD ["x", "y"]\n'
    )
    assert parsed.global_args == {"IMG": "python:3.11-slim"}
    assert [s.name for s in parsed.stages] == ["a", None]
    assert parsed.stages[0].instructions == [Instruction("RUN", "echo one     && echo two")]
    assert parsed.image_of(parsed.runtime) == "python:3.11-slim"
    assert parsed.runtime.all("CMD")[0].exec_form == ["x", "y"]


# --- the runtime image -----------------------------------------------------------------------------


def test_runtime_is_python_311_slim_built_in_stages(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "multi-stage: build tools and caches stay out of the runtime image"
    assert dockerfile.image_of(dockerfile.runtime) == "python:3.11-slim"
    copied_from = {i.flags()[0].get("from") for i in dockerfile.runtime.all("COPY")}
    assert {"builder"} <= copied_from, "the runtime takes the virtualenv and model from the builder"
    assert not any("pip install" in i.args for i in dockerfile.runtime.all("RUN")), "pip runs in the builder only"


def test_runtime_runs_as_an_unprivileged_numeric_user(dockerfile: Dockerfile) -> None:
    users = dockerfile.runtime.all("USER")
    assert users, "the runtime stage must set USER (the default is root)"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0")
    assert group not in ("root", "0")
    # Numeric, so runtimes can verify non-root (Kubernetes runAsNonRoot) before starting anything.
    assert user.isdigit(), f"USER {users[-1].args}"
    created = " ".join(i.args for i in dockerfile.runtime.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {user}\b", created), f"uid {user} is never created"
    assert re.search(r"chown \S*\s+/data\b", created), "/data must belong to the service user"


def test_ports_data_dir_and_bind_address(dockerfile: Dockerfile) -> None:
    env = dockerfile.runtime.env()
    exposed = " ".join(i.args for i in dockerfile.runtime.all("EXPOSE")).split()
    assert "8000" in exposed or "8000/tcp" in exposed
    assert env["SHOTCACHE_PORT"] == "8000"
    # Inside a container the loopback default would make the published port unreachable.
    assert env["SHOTCACHE_HOST"] == "0.0.0.0"
    volumes: list[str] = []
    for instruction in dockerfile.runtime.all("VOLUME"):
        volumes += instruction.exec_form or instruction.args.split()
    assert "/data" in volumes
    assert env["SHOTCACHE_DATA_DIR"] == "/data"
    # The model is baked in: the running container must not reach for the hub.
    assert env["HF_HUB_OFFLINE"] == "1"


def test_the_container_runs_shotcache_serve_under_an_init(dockerfile: Dockerfile) -> None:
    cmd = dockerfile.runtime.all("CMD")[-1].exec_form
    entrypoint = dockerfile.runtime.all("ENTRYPOINT")[-1].exec_form
    assert cmd == ["shotcache", "serve"], "exec form, so no shell stands between the init and the server"
    assert entrypoint is not None
    # dumb-init forwards SIGTERM; it comes as a wheel into the venv (no apt in the runtime stage).
    assert entrypoint[:2] == ["/opt/venv/bin/dumb-init", "--"]
    assert any(line.startswith("dumb-init==") for line in IMAGE_REQUIREMENTS.read_text().splitlines())
    # The script is run by sh, so it needs no executable bit (COPY --chmod is BuildKit-only).
    shell, script_path = entrypoint[2:]
    assert shell == "/bin/sh"
    sources = {i.flags()[1].split()[-1]: i.flags()[1].split()[:-1] for i in dockerfile.runtime.all("COPY")}
    assert sources.get(script_path) == ["docker/entrypoint.sh"], f"{script_path} is not docker/entrypoint.sh"
    commands = [
        line.strip()
        for line in ENTRYPOINT.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == 'exec "$@"', "the entrypoint must hand the process over to the command"
    # `shotcache serve` is the installed console script's real subcommand.
    from app.cli import build_parser

    assert "shotcache = " in (REPO / "pyproject.toml").read_text()
    assert build_parser().parse_args(["serve"]).command == "serve"


def test_runtime_stage_runs_no_package_manager(dockerfile: Dockerfile) -> None:
    # Nothing in the runtime stage needs a Debian mirror or an index: an air-gapped build must get through.
    runs = " ".join(i.args for i in dockerfile.runtime.all("RUN"))
    for tool in ("apt-get", "apt ", "dpkg", "apk", "dnf", "yum", "pip", "curl", "wget"):
        assert tool not in runs, f"the runtime stage runs {tool.strip()}"
    assert not dockerfile.runtime.all("ADD"), "ADD may fetch URLs"


def test_no_buildkit_only_syntax() -> None:
    # A `# syntax=` line makes BuildKit pull a frontend image (fails air-gapped); the classic builder and
    # buildah reject RUN --mount, COPY --chmod/--link/--parents/--exclude and heredocs.
    text = DOCKERFILE.read_text()
    directives = [line for line in text.splitlines() if re.match(r"#\s*(syntax|check)\s*=", line, re.IGNORECASE)]
    assert not directives, directives
    parsed = parse_dockerfile(text)
    for stage in parsed.stages:
        for instruction in stage.instructions:
            flags, rest = instruction.flags()
            if instruction.keyword == "RUN":
                assert not flags, f"RUN flags are BuildKit-only: {flags}"
                assert "<<" not in rest, "heredocs are BuildKit-only"
            if instruction.keyword in ("COPY", "ADD"):
                assert set(flags) <= {"from", "chown"}, f"{instruction.keyword} {flags}"


def test_healthcheck_probes_readyz_and_gives_the_model_time_to_load(dockerfile: Dockerfile) -> None:
    (healthcheck,) = dockerfile.runtime.all("HEALTHCHECK")
    flags, rest = healthcheck.flags()
    assert rest.startswith("CMD ")
    probe = json.loads(rest.removeprefix("CMD ").strip())
    assert "/readyz" in " ".join(probe)
    assert _seconds(flags["start-period"]) >= 60, "loading and warming up the model takes a while"
    # The probe must give up before Docker abandons it, or a hung server reads as a timeout.
    (probe_timeout,) = re.findall(r"timeout=(\d+)", " ".join(probe))
    assert int(probe_timeout) < _seconds(flags["timeout"])


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, f"unexpected duration {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 503
    paths: list[str] = []  # noqa: RUF012  (shared on purpose: the test reads what the probe asked)

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_healthcheck_probe_passes_only_when_ready(dockerfile: Dockerfile) -> None:
    # The probe runs as written in the Dockerfile, against a local server on the port it is told.
    (healthcheck,) = dockerfile.runtime.all("HEALTHCHECK")
    probe = json.loads(healthcheck.flags()[1].removeprefix("CMD ").strip())
    assert probe[0] == "python", "the runtime has no curl; the probe is stdlib Python"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "SHOTCACHE_PORT": str(server.server_address[1])}
        results = {}
        for status in (503, 200):
            _Readyz.status = status
            run = subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True, timeout=30, check=False)
            results[status] = run.returncode
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _Readyz.paths == ["/readyz", "/readyz"]
    assert results[503] != 0, "a starting server (503) must not count as healthy"
    assert results[200] == 0


# --- the builder: CPU torch, layer order, the baked model ------------------------------------------


INDEX_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "WHEELHOUSE")


def _ancestry(dockerfile: Dockerfile, stage: Stage) -> list[str]:
    """The stage names a stage is built on, nearest first."""
    names = {s.name for s in dockerfile.stages}
    chain: list[str] = []
    while stage.base in names:
        chain.append(stage.base)
        stage = dockerfile.stage(stage.base)
    return chain


def test_every_pip_step_takes_the_one_set_of_index_args(dockerfile: Dockerfile) -> None:
    pip = dockerfile.stage("pip")
    order = pip.instructions
    first_run = next(n for n, i in enumerate(order) if i.keyword == "RUN")
    declared = {i.args.partition("=")[0] for i in order[:first_run] if i.keyword == "ARG"}
    assert set(INDEX_ARGS) <= declared
    # No default: an unset ARG is no environment variable at all, so pip keeps its own index.
    assert all("=" not in i.args for i in order if i.keyword == "ARG" and i.args.partition("=")[0] in INDEX_ARGS)
    env = pip.env()
    (wheel_copy,) = [i for i in pip.all("COPY") if "${WHEELHOUSE" in i.args]
    source, dest = wheel_copy.args.split()
    assert source == "${WHEELHOUSE:-docker/no-wheelhouse}"
    assert (REPO / "docker/no-wheelhouse").is_dir()
    assert env["PIP_NO_INDEX"] == "${WHEELHOUSE:+1}"
    assert env["PIP_FIND_LINKS"] == "${WHEELHOUSE:+" + dest.rstrip("/") + "}"
    pip_stages = [s for s in dockerfile.stages if any("pip " in i.args for i in s.all("RUN"))]
    assert {s.name for s in pip_stages} >= {"project", "builder", "serving"}
    for stage in pip_stages:
        # Every stage that runs pip is built on `pip`, so it has these ENV values and nothing overrides them.
        assert stage is pip or "pip" in _ancestry(dockerfile, stage), f"stage {stage.name} runs pip outside `pip`"
        assert not {k for k in stage.env() if k.startswith("PIP_")} - set(env) or stage is pip
        for instruction in stage.all("RUN"):
            # pip reads PIP_* from the environment; a step naming its own index would escape the build args.
            for flag in ("--index-url", "--extra-index-url", "-i ", "--find-links", "--no-index", "--isolated"):
                assert flag not in instruction.args, f"a pip step sets {flag} itself: {instruction.args[:80]}"
    assert "pip" not in _ancestry(dockerfile, dockerfile.runtime), "the runtime image does not carry pip's settings"


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel, `shotcache-probe 1.0`, for pip to find in a folder."""
    import zipfile

    info = "shotcache_probe-1.0.dist-info"
    files = {
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: shotcache-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    with zipfile.ZipFile(folder / "shotcache_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.mark.parametrize("wheelhouse", [True, False])
def test_pip_obeys_the_environment_the_builder_sets(tmp_path: Path, wheelhouse: bool) -> None:
    # What the builder's ENV gives pip, with WHEELHOUSE set (PIP_NO_INDEX=1, PIP_FIND_LINKS=<folder>:
    # the folder alone, the index never asked) and unset (both empty: pip must ignore them, not fail).
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1" if wheelhouse else "",
        "PIP_FIND_LINKS": str(wheels) if wheelhouse else "",
        # An index that cannot answer: with the wheelhouse pip must not need it.
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path / "out"), "shotcache-probe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if wheelhouse:
        assert run.returncode == 0, run.stdout + run.stderr
        assert (tmp_path / "out/shotcache_probe-1.0-py3-none-any.whl").is_file()
        assert "127.0.0.1:9" not in run.stdout + run.stderr, "the index was asked"
    else:
        # No wheelhouse: empty PIP_NO_INDEX/PIP_FIND_LINKS are ignored, so pip asks the index it is given.
        assert run.returncode != 0
        assert "127.0.0.1:9" in run.stdout + run.stderr, run.stdout + run.stderr


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Dockerfile) -> None:
    # Layer caching: editing code must not reinstall torch and friends. The source goes only into the
    # `project` stage (which builds the wheel); the stages that install dependencies get the wheel after.
    context_copies = {
        s.name: [src for i in s.all("COPY") if "from" not in i.flags()[0] for src in i.flags()[1].split()[:-1]]
        for s in dockerfile.stages
    }
    assert sorted(context_copies["pip"]) == sorted(
        [
            "${WHEELHOUSE:-docker/no-wheelhouse}",
            "pyproject.toml",
            "docker/requirements.py",
            "docker/requirements-image.txt",
            "docker/requirements-runtime.txt",
        ]
    )
    assert {"app", "api", "cache_models"} <= set(context_copies["project"])
    for name in ("builder", "serving"):
        stage = dockerfile.stage(name)
        assert not context_copies[name], f"{name} copies {context_copies[name]} from the context"
        order = [(i.keyword, i.args) for i in stage.instructions]
        deps = next(
            n
            for n, (k, a) in enumerate(order)
            if k == "RUN" and f"--part {'builder' if name == 'builder' else 'runtime'}" in a
        )
        wheel = next(n for n, (k, a) in enumerate(order) if k == "COPY" and a.startswith("--from=project"))
        install = next(n for n, (k, a) in enumerate(order) if k == "RUN" and "pip install --no-deps /opt/dist/" in a)
        assert deps < wheel < install


def test_runtime_takes_the_serving_venv_and_the_baked_model(dockerfile: Dockerfile) -> None:
    copies = {i.flags()[1].split()[0]: i.flags()[0].get("from") for i in dockerfile.runtime.all("COPY")}
    assert copies["/opt/venv"] == "serving", "the torch-free venv, not the builder's"
    assert copies["/opt/shotcache"] == "builder"
    # The build proves the runtime opens the baked model without torch, as the service user.
    users = [n for n, i in enumerate(dockerfile.runtime.instructions) if i.keyword == "USER"]
    checks = [
        n for n, i in enumerate(dockerfile.runtime.instructions) if i.keyword == "RUN" and "create_encoder" in i.args
    ]
    assert checks, "no start check in the runtime stage"
    assert users
    assert users[0] < checks[0], "the start check runs as the service user"
    check = dockerfile.runtime.instructions[checks[0]].args
    assert "shotcache-entrypoint" in check
    assert "'torch'" in check
    assert "sys.modules" in check


def test_baked_model_sits_where_the_service_looks(dockerfile: Dockerfile, tmp_path: Path) -> None:
    # The entrypoint links <baked>/<folder>/* into <data dir>/<folder>/; the builder must bake in the
    # layout the service itself reads, for both kinds of model.
    from app.encoder import factory
    from app.encoder.standin import standin_dir
    from app.settings import Settings

    baked = _entrypoint_default("SHOTCACHE_BAKED_DIR")
    assert dockerfile.stage("builder").env()["SHOTCACHE_DATA_DIR"] == baked
    builder_text = " ".join(i.args for i in dockerfile.stage("builder").instructions)
    assert "shotcache build-offline-model" in builder_text  # default --out: standin_dir(SHOTCACHE_DATA_DIR)
    assert standin_dir(Path("D")) == Path("D/models/offline-standin")
    seen: dict[str, Any] = {}

    def fake_load_model(source: object, data_dir: Path, *, cache_dir: Path | None = None) -> object:
        seen["cache_dir"] = cache_dir
        return object()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(factory, "load_model", fake_load_model)
        factory.resolve_model(Settings(model="ViT-B-32", pretrained="openai", data_dir=tmp_path))
    hub_cache = seen["cache_dir"]
    assert isinstance(hub_cache, Path)
    assert f"cache_dir='{baked}/{hub_cache.relative_to(tmp_path)}'" in builder_text


def _entrypoint_default(name: str) -> str:
    match = re.search(rf'"\$\{{{name}:-([^}}]+)\}}"', ENTRYPOINT.read_text())
    assert match, f"{name} has no default in the entrypoint"
    return match.group(1)


def test_every_build_arg_is_documented(dockerfile: Dockerfile) -> None:
    readme = DOCKER_README.read_text()
    names = set(dockerfile.global_args)
    for stage in dockerfile.stages:
        names |= {i.args.partition("=")[0] for i in stage.all("ARG")}
    assert {"MODEL", "PRETRAINED", *INDEX_ARGS} <= names
    undocumented = sorted(n for n in names if f"`{n}`" not in readme)
    assert not undocumented, f"build args missing from docker/README.md: {undocumented}"
