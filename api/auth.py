"""API keys per tenant. Keys are kept only as SHA-256 digests and compared in constant time.

`SHOTCACHE_API_KEYS="alice:key1,bob:key2"`: each key belongs to a tenant; tasks are namespaced by it.
Unset, the service is open (local use) and every caller is the tenant `public`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from pydantic import SecretStr

PUBLIC_TENANT = "public"
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool = False


class KeyRing:
    def __init__(self, api_keys: list[SecretStr], admin_keys: list[SecretStr]) -> None:
        self._tenants: list[tuple[bytes, str]] = []
        for entry in api_keys:
            tenant, sep, key = entry.get_secret_value().partition(":")
            if not sep or not _TENANT.fullmatch(tenant) or len(key) < 8:
                raise ValueError(
                    "SHOTCACHE_API_KEYS entries must be `tenant:key` with tenant in [A-Za-z0-9_-]{1,64} "
                    "and a key of at least 8 characters"
                )
            self._tenants.append((_digest(key), tenant))
        self._admins = [_digest(k.get_secret_value()) for k in admin_keys]
        for digest in self._admins:
            if len(digest) != 32:
                raise ValueError("bad admin key")

    @property
    def open(self) -> bool:
        return not self._tenants and not self._admins

    def identify(self, key: str) -> Caller | None:
        """The caller owning `key`, or None. Every stored digest is compared, so timing reveals nothing."""
        digest = _digest(key)
        found: Caller | None = None
        for stored, tenant in self._tenants:
            if hmac.compare_digest(stored, digest):
                found = Caller(tenant)
        for stored in self._admins:
            if hmac.compare_digest(stored, digest):
                found = Caller(found.tenant if found else "admin", admin=True)
        return found
