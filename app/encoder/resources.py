"""Read the JSON configs shipped with the package (model defaults, prompt templates, stand-in recipe)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def read_config(name: str) -> dict[str, Any]:
    text = resources.files("app.encoder").joinpath("configs", name).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
