"""The parsed Dockerfile, shared by the Docker tests."""

from __future__ import annotations

import pytest

from .dockerfile import DOCKERFILE, Dockerfile, parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())
