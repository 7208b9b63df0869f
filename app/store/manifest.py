"""The manifest (`current.json`) that makes one version of a task live.

It names the version directory and records size, SHA-256, dtype and shape of every file in it, and
carries a SHA-256 of its own body so a flipped bit in the manifest itself is caught too. Parsing is
strict: a manifest is trusted only as far as it checks out, and file names in it must match the names
the store itself generates, so an edited manifest cannot point outside its version directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.store.base import check_array_name, check_id
from app.store.durable_files import sha256_hex

FORMAT = "shotcache-task/1"
META_FILE = "meta.json"
_ARRAY_FILE_PATTERN = re.compile(r"a[0-9]{4,7}\.npy")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """The manifest cannot be read or does not describe a valid version."""


def array_file_name(index: int) -> str:
    # Files are numbered, not named after arrays: array names may contain "/" and never touch paths.
    return f"a{index:04d}.npy"


def version_dir_name(version: int) -> str:
    return f"v{version}"


@dataclass(frozen=True)
class FileEntry:
    file: str  # name inside the version directory
    size: int
    sha256: str


@dataclass(frozen=True)
class ArrayEntry:
    name: str
    dtype: str  # numpy dtype.str, e.g. "<f4"
    shape: tuple[int, ...]
    stored: FileEntry


@dataclass(frozen=True)
class Manifest:
    tenant: str
    task_id: str
    version: int
    meta: FileEntry
    arrays: tuple[ArrayEntry, ...]
    # Absent from manifests written before incarnations existed (and then None): such a task still loads.
    incarnation: str | None = None

    @property
    def version_dir(self) -> str:
        return version_dir_name(self.version)

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "tenant": self.tenant,
            "task_id": self.task_id,
            "version": self.version,
            "meta": _file_to_json(self.meta),
            "arrays": [
                {"name": a.name, "dtype": a.dtype, "shape": list(a.shape), **_file_to_json(a.stored)}
                for a in self.arrays
            ],
        }
        if self.incarnation is not None:
            body["incarnation"] = self.incarnation
        document = {"body": body, "sha256": sha256_hex(_canonical(body))}
        return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, tenant: str, task_id: str) -> Manifest:
        """Parse and check a manifest found in the directory of `tenant`/`task_id`."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ManifestError(f"manifest is not JSON: {error}") from None
        if not isinstance(document, dict):
            raise ManifestError("manifest is not a JSON object")
        body = _field(document, "body", dict)
        if _field(document, "sha256", str) != sha256_hex(_canonical(body)):
            raise ManifestError("manifest checksum mismatch")
        if _field(body, "format", str) != FORMAT:
            raise ManifestError(f"unknown manifest format {body.get('format')!r}")
        if _field(body, "tenant", str) != tenant or _field(body, "task_id", str) != task_id:
            raise ManifestError("manifest belongs to another task")
        version = _field(body, "version", int)
        if version < 1:
            raise ManifestError(f"manifest version {version} < 1")
        meta = _file_from_json(_field(body, "meta", dict))
        if meta.file != META_FILE:
            raise ManifestError(f"unexpected meta file name {meta.file!r}")
        arrays = tuple(_array_from_json(item) for item in _field(body, "arrays", list))
        if len({a.name for a in arrays}) != len(arrays) or len({a.stored.file for a in arrays}) != len(arrays):
            raise ManifestError("manifest lists an array name or file twice")
        incarnation = body.get("incarnation")
        if incarnation is not None:
            try:
                check_id(incarnation, "incarnation")
            except ValueError as error:
                raise ManifestError(f"manifest: {error}") from None
        return cls(tenant, task_id, version, meta, arrays, incarnation)


def _canonical(body: object) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _file_to_json(entry: FileEntry) -> dict[str, Any]:
    return {"file": entry.file, "bytes": entry.size, "sha256": entry.sha256}


def _file_from_json(item: dict[str, Any]) -> FileEntry:
    size = _field(item, "bytes", int)
    digest = _field(item, "sha256", str)
    if size < 0 or not _SHA256_PATTERN.fullmatch(digest):
        raise ManifestError("manifest has an invalid file size or checksum")
    return FileEntry(_field(item, "file", str), size, digest)


def _array_from_json(item: object) -> ArrayEntry:
    if not isinstance(item, dict):
        raise ManifestError("manifest array entry is not an object")
    stored = _file_from_json(item)
    if not _ARRAY_FILE_PATTERN.fullmatch(stored.file):
        raise ManifestError(f"unexpected array file name {stored.file!r}")
    shape = _field(item, "shape", list)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ManifestError(f"invalid shape {shape!r}")
    try:
        name = check_array_name(_field(item, "name", str))
    except ValueError as error:
        raise ManifestError(str(error)) from None
    return ArrayEntry(name, _field(item, "dtype", str), tuple(shape), stored)


def _field(container: dict[str, Any], key: str, kind: type) -> Any:
    value = container.get(key)
    # bool is an int subclass; a manifest saying `"version": true` is corrupt, not version 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    return value
