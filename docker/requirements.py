"""Print what a stage of the image installs with pip, one requirement a line, from pyproject.toml (the
project's dependencies and its build backend) and docker/requirements-*.txt (what the image adds, what
its runtime keeps).

The Dockerfile installs these lists and `make wheelhouse` downloads all of them, so an air-gapped build
(`--build-arg WHEELHOUSE=...`) finds every wheel it asks for. Stdlib only: it runs in the bare builder
before anything is installed.

    python docker/requirements.py [--part all|builder|runtime|build] [PYPROJECT]

`builder`: every dependency (torch included: the builder builds and exports the model); `runtime`: the
dependencies serving from exports needs (docker/requirements-runtime.txt) and the image's additions
(docker/requirements-image.txt: the init); `build`: the build backend that building the project's wheel
puts into its isolated build environment; `all` (default): the union, for the wheelhouse.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("all", "builder", "runtime", "build")


def listed(path: Path) -> list[str]:
    """The non-comment lines of a requirements-style file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(0))


def image_requirements(pyproject: Path, part: str) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    dependencies: list[str] = list(data["project"]["dependencies"])
    build = list(data["build-system"]["requires"])
    if part == "builder":
        return dependencies
    if part == "build":
        return build
    by_name = {requirement_name(r): r for r in dependencies}
    runtime_names = [canonical(n) for n in listed(HERE / "requirements-runtime.txt")]
    unknown = [n for n in runtime_names if n not in by_name]
    if unknown:
        raise SystemExit(f"docker/requirements-runtime.txt names what pyproject.toml does not depend on: {unknown}")
    runtime = [by_name[n] for n in runtime_names] + listed(HERE / "requirements-image.txt")
    if part == "runtime":
        return runtime
    return list(dict.fromkeys(dependencies + runtime + build))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, default="all")
    parser.add_argument("pyproject", nargs="?", type=Path, default=HERE.parent / "pyproject.toml")
    args = parser.parse_args()
    print("\n".join(image_requirements(args.pyproject, args.part)))


if __name__ == "__main__":
    main()
