"""The Docker image keeps the promises docker/README.md makes, checked without a Docker engine.

The Dockerfile, .dockerignore and compose.yaml are parsed and their promises asserted (non-root runtime,
health check on /readyz, CPU torch wheels before the project, port 8000, /data volume, `shotcache
serve`); the parts that run code are run here too: the health check's probe against a local HTTP
server, and the entrypoint script on temporary directories.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_README = REPO / "docker" / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# --- a small Dockerfile parser ---------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # everything after the keyword, continuation lines joined

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of exec-form CMD/ENTRYPOINT/RUN, else None."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list), self.args
            return [str(v) for v in value]
        return None

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` flags and the rest."""
        flags: dict[str, str] = {}
        rest = self.args.strip()
        while match := re.match(r"--([\w-]+)(?:=(\S*))?\s*", rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
        return flags, rest


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                key, sep, value = token.partition("=")
                assert sep, f"legacy `ENV key value` form: {instruction.args}"
                values[key] = value
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def image_of(self, stage: Stage) -> str:
        """The registry image a stage is ultimately built on, following stage names and global ARGs."""
        base = re.sub(r"\$\{(\w+)\}", lambda m: self.global_args[m.group(1)], stage.base)
        names = {s.name for s in self.stages}
        return self.image_of(self.stage(base)) if base in names else base


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with their continuation lines joined; comment and blank lines dropped (also
    inside a continuation, as Docker does)."""
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        yield (pending + raw).strip()
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {line!r}"
            key, _, default = args.strip().partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


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
    assert cmd == ["shotcache", "serve"], "exec form, so no shell stands between tini and the server"
    assert entrypoint is not None
    assert Path(entrypoint[0]).name == "tini", "an init forwards SIGTERM"
    script_path = entrypoint[-1]
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


def test_torch_comes_from_the_cpu_index_before_the_project(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stage("builder")
    runs = [i.args for i in builder.all("RUN")]
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in builder.all("ARG")}
    assert args["TORCH_INDEX_URL"] == CPU_INDEX

    def first(predicate_text: str) -> int:
        return next(n for n, run in enumerate(runs) if predicate_text in run)

    torch_step = first('--index-url "$TORCH_INDEX_URL"')
    assert '"torch==$TORCH_VERSION"' in runs[torch_step]
    assert '"torchvision==$TORCHVISION_VERSION"' in runs[torch_step]
    deps_step = first("-r /opt/requirements.txt")
    project_step = first("pip install --no-deps /src")
    assert torch_step < deps_step < project_step
    # Plain PyPI for the rest, held to the CPU build by the constraints the torch step wrote.
    assert "--index-url" not in runs[deps_step]
    assert "-c /opt/torch-constraints.txt" in runs[deps_step]
    assert "/opt/torch-constraints.txt" in runs[torch_step]
    # A pair that belongs together: torchvision 0.N+15 goes with torch 2.N.
    torch_minor = int(args["TORCH_VERSION"].split(".")[1])
    assert args["TORCHVISION_VERSION"].split(".")[:2] == ["0", str(torch_minor + 15)]


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Dockerfile) -> None:
    # Layer caching: editing code must not reinstall torch and friends.
    builder = dockerfile.stage("builder").instructions
    order = [(i.keyword, i.args) for i in builder]
    deps = next(n for n, (k, a) in enumerate(order) if k == "RUN" and "-r /opt/requirements.txt" in a)
    copies = [(n, a) for n, (k, a) in enumerate(order) if k == "COPY"]
    before = [a.split()[0] for n, a in copies if n < deps]
    assert before == ["pyproject.toml"], f"only pyproject.toml may be copied before the deps install, not {before}"


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
    assert {"MODEL", "PRETRAINED"} <= names
    undocumented = sorted(n for n in names if f"`{n}`" not in readme)
    assert not undocumented, f"build args missing from docker/README.md: {undocumented}"


# --- the build context -----------------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, is_exception) in file order, with the matching rules of Docker's patternmatcher."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        patterns.append((re.compile(_glob_regex(line)), negated))
    return patterns


def _glob_regex(glob: str) -> str:
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            out, i = out + "[" + glob[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return out


def in_context(path: str) -> bool:
    """Whether a repository-relative path is sent to the builder: the last pattern matching the path
    or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for pattern, negated in _dockerignore_patterns():
        if any(pattern.fullmatch(p) for p in prefixes):
            included = negated
    return included


def test_dockerignore_matcher_follows_docker_rules() -> None:
    # Pinned against docker's own rules so the context checks below mean something.
    assert not in_context("app/__pycache__/x.cpython-311.pyc")
    assert not in_context("app/encoder/stray.pyc")
    assert in_context("app/encoder/configs/models.json")
    assert in_context("docker/entrypoint.sh")
    assert not in_context("docker/Dockerfile")
    assert re.fullmatch(_glob_regex("a/*/c"), "a/b/c")
    assert not re.fullmatch(_glob_regex("a/*/c"), "a/b/x/c")
    assert re.fullmatch(_glob_regex("**/c"), "c")
    assert re.fullmatch(_glob_regex("**/c"), "a/b/c")


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
        *sources, _dest = instruction.flags()[1].split()
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            needed = [f.relative_to(REPO).as_posix() for f in files if "__pycache__" not in f.parts]
            needed = [f for f in needed if not f.endswith(".pyc")]
            assert needed, f"COPY {source}: nothing to copy"
            missing = [f for f in needed if not in_context(f)]
            assert not missing, f"COPY {source}: .dockerignore leaves out {missing[:5]}"


# --- the entrypoint script -------------------------------------------------------------------------

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


# --- compose.yaml ----------------------------------------------------------------------------------


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
