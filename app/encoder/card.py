"""What serving a model needs besides its exported towers, written at export time and read without torch.

- the model card, `exports/<model key>/model.json`: identity (name, tag, weights hash, recipe hash, dim), logit scale,
  preprocessing config, the models.json key and how to tokenise; the tokenizer file beside it (tokenize.py);
- the source index, `exports/sources/<hash>.json`: which model key a configured source (`offline`, a name +
  tag, a weights file, a local dir) resolved to, with a fingerprint of the files it was loaded from (size +
  mtime), so a changed weights file is loaded with torch again instead of being served from stale exports;
- for `SHOTCACHE_MODEL=auto`, `exports/sources/auto-<hash>.json`: the real model's hub repository, so a
  torch-free start can tell whether its weights have appeared in the hub cache since the fallback.

Every file is replaced atomically (write + rename); a reader sees the old content or the new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.cache import model_folder, model_key
from .errors import EncoderLoadError
from .load import LoadedModel, ModelIdentity, ModelSource, PreprocessConfig
from .standin import CONFIG_FILE, RECIPE_FILE, WEIGHTS_FILE, standin_dir
from .tokenize import TOKENIZER_FILE, TokenizerSpec, write_tokenizer_file

log = logging.getLogger(__name__)

CARD_FILE = "model.json"
CARD_FORMAT = 1
SOURCES_DIR = "sources"


@dataclass(frozen=True)
class ModelCard:
    identity: ModelIdentity
    preprocess: PreprocessConfig
    logit_scale: float
    config_key: str
    tokenizer: TokenizerSpec

    def to_dict(self) -> dict[str, Any]:
        identity = self.identity
        return {
            "format": CARD_FORMAT,
            "identity": {
                "name": identity.name,
                "pretrained": identity.pretrained,
                "weights_sha256": identity.weights_sha256,
                "recipe_sha256": identity.recipe_sha256,
                "dim": identity.dim,
            },
            "preprocess": {
                "size": self.preprocess.size,
                "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std),
                "interpolation": self.preprocess.interpolation,
                "resize_mode": self.preprocess.resize_mode,
            },
            "logit_scale": self.logit_scale,
            "config_key": self.config_key,
            "tokenizer": self.tokenizer.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"model card format {data.get('format')} is not {CARD_FORMAT}")
        pre = data["preprocess"]
        preprocess = PreprocessConfig(
            int(pre["size"]),
            (float(pre["mean"][0]), float(pre["mean"][1]), float(pre["mean"][2])),
            (float(pre["std"][0]), float(pre["std"][1]), float(pre["std"][2])),
            str(pre["interpolation"]),
            str(pre["resize_mode"]),
        )
        ident = data["identity"]
        identity = ModelIdentity(
            ident["name"], ident["pretrained"], ident["weights_sha256"], int(ident["dim"]), ident.get("recipe_sha256")
        )
        return cls(
            identity,
            preprocess,
            float(data["logit_scale"]),
            str(data["config_key"]),
            TokenizerSpec.from_dict(data["tokenizer"]),
        )


# ---- writing (torch path, after a model is loaded) ----------------------------------------------------------
def write_card(loaded: LoadedModel, source: ModelSource, data_dir: Path) -> ModelCard | None:
    """Write the card, tokenizer and source index of `loaded`; None if its tokenizer has no file form."""
    folder = model_folder(loaded.identity, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tokenizer = Path(tempfile.mkstemp(prefix=".tokenizer-", dir=folder)[1])
    try:
        spec = write_tokenizer_file(loaded.tokenizer, tmp_tokenizer)
        if spec is None:
            log.info("%s: its tokenizer has no file form; it is served with torch", loaded.identity.model_id)
            return None
        _install(tmp_tokenizer, folder / TOKENIZER_FILE)
    finally:
        tmp_tokenizer.unlink(missing_ok=True)
    card = ModelCard(loaded.identity, loaded.preprocess, loaded.logit_scale, loaded.config_key, spec)
    _write_json(folder / CARD_FILE, card.to_dict())
    fingerprint = source_fingerprint(source, data_dir)
    if fingerprint is not None:
        entry = {"source": _source_dict(source), "fingerprint": fingerprint, "model_key": model_key(loaded.identity)}
        _write_json(_index_path(source, data_dir), entry)
    return card


def write_auto_record(real: ModelSource, data_dir: Path, hf_repo: str | None) -> None:
    """Remember, for a torch-free `auto` start, where the real model's weights would appear."""
    _write_json(_auto_path(real, data_dir), {"real": _source_dict(real), "hf_repo": hf_repo})


# ---- reading (torch-free) -----------------------------------------------------------------------------------
def read_card(source: ModelSource, data_dir: Path) -> tuple[ModelCard, Path] | str:
    """The card `source` resolved to last time and its folder, if the source's files are unchanged; else why not."""
    fingerprint = source_fingerprint(source, data_dir)
    if fingerprint is None:
        return f"{source.name}: nothing to fingerprint (files missing)"
    try:
        entry = json.loads(_index_path(source, data_dir).read_text())
    except FileNotFoundError:
        return f"{source.name} has not been exported yet"
    except (OSError, ValueError) as exc:
        return f"unreadable source index: {exc}"
    if entry.get("fingerprint") != fingerprint:
        return f"{source.name}: its files changed since the export"
    folder = data_dir / "exports" / str(entry["model_key"])
    try:
        card = ModelCard.from_dict(json.loads((folder / CARD_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError, EncoderLoadError) as exc:
        return f"unreadable model card in {folder}: {exc!r}"
    if not (folder / TOKENIZER_FILE).is_file():
        return f"{folder / TOKENIZER_FILE} is missing"
    return card, folder


def read_auto_record(real: ModelSource, data_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(_auto_path(real, data_dir).read_text())
    except (OSError, ValueError):
        return None
    return data


def source_fingerprint(source: ModelSource, data_dir: Path) -> dict[str, Any] | None:
    """Size and mtime of the files `source` loads from; None if they are missing. A tag has no local file."""
    if source.kind == "standin":
        folder = standin_dir(data_dir).resolve()
        files = [folder / name for name in (WEIGHTS_FILE, CONFIG_FILE, RECIPE_FILE)]
    elif source.kind == "local-dir":
        folder = Path(source.name).expanduser().resolve()
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    elif source.pretrained and Path(source.pretrained).is_file():
        files = [Path(source.pretrained).resolve()]
    else:
        return {"tag": source.pretrained}
    if not files or not all(f.is_file() for f in files):
        return None
    return {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _source_dict(source: ModelSource) -> dict[str, Any]:
    return {"kind": source.kind, "name": source.name, "pretrained": source.pretrained}


def _source_hash(source: ModelSource, data_dir: Path) -> str:
    where: str | None = None  # sources that are files are told apart by where they are
    if source.kind == "standin":
        where = str(standin_dir(data_dir).resolve())
    elif source.kind == "local-dir":
        where = str(Path(source.name).expanduser().resolve())
    elif source.pretrained and Path(source.pretrained).is_file():
        where = str(Path(source.pretrained).resolve())
    text = json.dumps([_source_dict(source), where], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _index_path(source: ModelSource, data_dir: Path) -> Path:
    return data_dir / "exports" / SOURCES_DIR / f"{_source_hash(source, data_dir)}.json"


def _auto_path(real: ModelSource, data_dir: Path) -> Path:
    return data_dir / "exports" / SOURCES_DIR / f"auto-{_source_hash(real, data_dir)}.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    try:
        if path.read_text() == text:
            return  # unchanged: leave the file (and its mtime) alone
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        _install(Path(name), path)
    finally:
        Path(name).unlink(missing_ok=True)


def _install(tmp: Path, path: Path) -> None:
    tmp.chmod(0o644)  # read by whichever user runs the service
    os.replace(tmp, path)
