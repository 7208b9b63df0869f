"""What the Docker tests read: the repository's Docker files, a small Dockerfile parser, and a
.dockerignore matcher with Docker's rules. No Docker engine runs on the development machine, so these
stand in for `docker build`'s own reading of the files."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_README = REPO / "docker" / "README.md"
REQUIREMENTS_SCRIPT = REPO / "docker" / "requirements.py"
IMAGE_REQUIREMENTS = REPO / "docker" / "requirements-image.txt"
TEST_SCRIPT = REPO / "docker" / "test-image.sh"
MAKEFILE = REPO / "Makefile"


# --- the Dockerfile parser -------------------------------------------------------------------------


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


def with_defaults(text: str) -> str:
    """`${NAME:-default}` as the builder reads it when the build arg is not given."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", lambda m: m.group(1), text)


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


# --- the build context: which files .dockerignore sends to the builder -----------------------------


def dockerignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, is_exception) in file order, with the matching rules of Docker's patternmatcher."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        patterns.append((re.compile(glob_regex(line)), negated))
    return patterns


def glob_regex(glob: str) -> str:
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
    for pattern, negated in dockerignore_patterns():
        if any(pattern.fullmatch(p) for p in prefixes):
            included = negated
    return included
