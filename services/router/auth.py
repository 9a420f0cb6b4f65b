"""API keys for the public port: ``Authorization: Bearer KEY`` on HTTP and the same header in gRPC metadata.

Keys come from ``DUOPOOL_API_KEYS`` (comma-separated) and/or a file named by ``DUOPOOL_API_KEYS_FILE``
(one key per line, ``#`` comments), never from the repository. With no key configured the router is open
(the local default) and says so loudly at start. Keys are compared in constant time
(``hmac.compare_digest`` against every configured key, so the time does not tell which key nearly matched).

Objects a key creates (files, batches) carry its *owner tag*: a short SHA-256 of the key, never the key
itself, so an object made with one key is invisible to another.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pathlib

import grpc

from duopool.common.clusterauth import refusal

log = logging.getLogger("duopool.router.auth")

# Calls anyone may make: liveness probes and the schema (what the public API looks like is public).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
OPEN_OWNER = "open"  # the owner tag of objects made while no key is configured


class AuthError(Exception):
    pass


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_settings(cls, keys: str = "", keys_file: str = "") -> ApiKeys:
        found = [k.strip() for k in keys.split(",") if k.strip()]
        if keys_file:
            path = pathlib.Path(keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise AuthError(f"api_keys_file: cannot read {keys_file}: {exc.strerror}") from None
            found += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        return cls(found)

    @classmethod
    def from_env(cls) -> ApiKeys:
        return cls.from_settings(os.environ.get("DUOPOOL_API_KEYS", ""), os.environ.get("DUOPOOL_API_KEYS_FILE", ""))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, key: str | None) -> str:
        """The caller's owner tag if ``key`` is valid (or no key is configured); raises AuthError."""
        if not self._keys:
            return OPEN_OWNER
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        given = key.encode()
        ok = False
        for k in self._keys:  # no early exit: every key is compared
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise AuthError("invalid API key")
        return owner_tag(key)

    def check_header(self, authorization: str | None) -> str:
        return self.check(bearer(authorization))


def owner_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key (UNAUTHENTICATED) before they reach a handler."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self.keys.enabled or method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        try:
            self.keys.check_header(md.get("authorization"))
        except AuthError as exc:
            return refusal(await continuation(handler_call_details), str(exc))
        return await continuation(handler_call_details)
