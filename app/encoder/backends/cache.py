"""The on-disk cache of exported towers, read without torch (the serving path opens it torch-free).

Layout: `<data_dir>/exports/<model key>/<backend>/{manifest.json, image.*, text.*}`, where the model key is the
identity's `model_id` (name, pretrained tag, weights hash) made path-safe, and the manifest repeats the full
weights hash, the format version and each file's SHA-256. A folder is used only if all of those match;
anything else (a truncated file, a foreign model, an older format) is exported again (export.py, with torch).
An export whose check failed leaves `<backend>.failed.json` beside the folder instead (export.py: not retried
for the same weights, format and libraries).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..folders import sha256_file
from ..load import ModelIdentity

MANIFEST = "manifest.json"
ONNX_BACKENDS = ("onnx", "onnx-int8")
OPENVINO_BACKENDS = ("openvino", "openvino-int8")  # the `openvino` extra
EXPORTED_BACKENDS = ONNX_BACKENDS + OPENVINO_BACKENDS
# The recipe version per backend: bump one when its recipe changes, and only that backend's older folders are
# exported again. OpenVINO 2: converted from torch rather than from the ONNX file, int8 keeps attention outputs;
# openvino-int8 3: its text tower with int8 weights; openvino 3: bf16 kept only at `auto`'s bf16 bound, else fp32.
EXPORT_FORMATS = {"onnx": 1, "onnx-int8": 1, "openvino": 3, "openvino-int8": 3}
INPUT_NAMES = {"image": "pixels", "text": "tokens"}
# Prompts an export's text tower is checked on against torch, and `auto` checks backends on against fp32.
CHECK_PROMPTS = (
    "a photo of a dog.",
    "a photo of a red sports car.",
    "a close-up photo of a scratched metal surface.",
    "an aerial photo of a harbour with many small boats.",
)

Tower = Literal["image", "text"]


class ExportError(RuntimeError):
    """A backend could not be prepared; `stage` names the step (export, verify, quantize, load)."""

    def __init__(self, stage: str, detail: str) -> None:
        self.stage = stage
        self.detail = detail
        super().__init__(f"{stage}: {detail}")


@dataclass(frozen=True)
class TowerExport:
    path: Path
    precision: str  # "fp32", "int8", "bf16"...
    check: dict[str, float]  # min_cosine, mean_cosine, max_abs_diff against torch at export time
    note: str | None = None
    extra_files: tuple[str, ...] = ()  # files beside `path` that belong to it (OpenVINO's weights .bin)


@dataclass(frozen=True)
class Export:
    backend: str
    folder: Path
    image: TowerExport
    text: TowerExport


def model_key(identity: ModelIdentity) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", identity.model_id)


def model_folder(identity: ModelIdentity, data_dir: Path) -> Path:
    """Everything exported for one model identity: a folder per backend, the model card, the tokenizer."""
    return data_dir / "exports" / model_key(identity)


def export_dir(identity: ModelIdentity, backend: str, data_dir: Path) -> Path:
    return model_folder(identity, data_dir) / backend


def read_valid(folder: Path, weights_sha256: str) -> Export | str:
    """The export in `folder` if complete and intact for these weights, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    try:
        wanted = EXPORT_FORMATS.get(manifest["backend"])
        if manifest["format"] != wanted:
            return f"format {manifest['format']} of {manifest['backend']!r} is not {wanted}"
        if manifest["weights_sha256"] != weights_sha256:
            return "it was exported from other weights"
        towers = {}
        for tower in ("image", "text"):
            entry = manifest["towers"][tower]
            path = folder / entry["file"]
            if not path.is_file():
                return f"{path.name} is missing"
            extras = entry.get("extra_files", [])
            for extra in extras:
                if not (folder / extra["file"]).is_file() or sha256_file(folder / extra["file"]) != extra["sha256"]:
                    return f"{extra['file']} is missing or does not match its checksum"
            if sha256_file(path) != entry["sha256"]:
                return f"{path.name} does not match its checksum"
            towers[tower] = TowerExport(
                path, entry["precision"], dict(entry["check"]), entry.get("note"), tuple(e["file"] for e in extras)
            )
        return Export(manifest["backend"], folder, towers["image"], towers["text"])
    except (KeyError, TypeError) as exc:
        return f"incomplete manifest: {exc!r}"
