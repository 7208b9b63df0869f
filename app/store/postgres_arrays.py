"""How the PostgreSQL store writes and checks arrays: C-order bytes, their numpy descr, length and sha256.

Blob I/O apart from the version and pointer logic (postgres.py): an array's row names its blob by
content (sha256), so a blob could live in an object store later under the same key (`blob_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
import numpy.typing as npt


class DamageError(Exception):
    """A stored version failed verification (the store raises DamagedTaskError naming the task)."""


class StoredArray:
    """An array as the store writes it: C-order bytes, its numpy descr as JSON, length and sha256."""

    __slots__ = ("data", "dtype", "name", "nbytes", "sha256", "shape")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        self.name, self.dtype, self.shape, self.data = name, dtype, shape, data
        self.nbytes = data.nbytes
        self.sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def of(cls, name: str, array: npt.NDArray[Any]) -> StoredArray:
        # descr (not dtype.str) so byte order and structured dtypes survive exactly, as in a .npy header.
        descr = json.dumps(np.lib.format.dtype_to_descr(array.dtype))
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # no copy unless not C-contiguous
        return cls(name, descr, tuple(int(n) for n in array.shape), flat.data)


def verified_meta(meta: str | None, digest: str | None, version: int) -> dict[str, Any]:
    if meta is None or digest is None:
        raise DamageError(f"the pointer names version {version}, which is missing")
    data = meta.encode("utf-8")
    if sha256_of(data) != digest:
        raise DamageError("checksum mismatch in meta")
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as error:
        raise DamageError(f"meta is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise DamageError("meta is not a JSON object")
    return parsed


def verified_array(
    name: str, dtype: str, shape: Sequence[int], nbytes: int, digest: str, data: bytes | None
) -> npt.NDArray[Any]:
    if data is None:
        raise DamageError(f"array {name!r}: its blob {digest[:12]}... is missing")
    if len(data) != nbytes:
        raise DamageError(f"array {name!r} is {len(data)} bytes, its row says {nbytes}")
    if sha256_of(data) != digest:
        raise DamageError(f"checksum mismatch in array {name!r}")
    try:
        numpy_dtype = np.lib.format.descr_to_dtype(json.loads(dtype))
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise DamageError(f"array {name!r} has an unreadable dtype {dtype!r}: {error}") from None
    if numpy_dtype.hasobject or numpy_dtype.itemsize * prod(shape) != nbytes:
        raise DamageError(f"array {name!r}: dtype {numpy_dtype} and shape {tuple(shape)} do not make {nbytes} bytes")
    # Read-only, without a copy: a snapshot is immutable, and a 1000-class task's keys are 80 MB.
    return np.frombuffer(data, dtype=numpy_dtype).reshape(tuple(shape))


def sha256_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
