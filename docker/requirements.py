"""Print what the image installs with pip, one requirement a line, from pyproject.toml (the project's
dependencies and its build backend) and docker/requirements-image.txt (what only the image adds).

The Dockerfile installs these lists and `make wheelhouse` downloads all of them, so an air-gapped build
(`--build-arg WHEELHOUSE=...`) finds every wheel it asks for. Stdlib only: it runs in the bare builder
before anything is installed.

    python docker/requirements.py [--part all|deps|build] [PYPROJECT]

`deps`: what the virtualenv gets (dependencies + image additions); `build`: the build backend that
`pip install /src` puts into its isolated build environment; `all` (default): both, for the wheelhouse.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def image_requirements(pyproject: Path, part: str) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    lines: list[str] = []
    if part in ("all", "deps"):
        lines += data["project"]["dependencies"]
        for line in (HERE / "requirements-image.txt").read_text().splitlines():
            requirement = line.split("#", 1)[0].strip()
            if requirement:
                lines.append(requirement)
    if part in ("all", "build"):
        lines += data["build-system"]["requires"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "deps", "build"), default="all")
    parser.add_argument("pyproject", nargs="?", type=Path, default=HERE.parent / "pyproject.toml")
    args = parser.parse_args()
    print("\n".join(image_requirements(args.pyproject, args.part)))


if __name__ == "__main__":
    main()
