"""Channels the CLI opens to the router: they carry the API key from ``DUOPOOL_API_KEY`` (or the first of
``DUOPOOL_API_KEYS``, what `duopool up` started the cluster with) as ``authorization: Bearer`` metadata."""

from __future__ import annotations

import os

import grpc


def api_key() -> str:
    key = os.environ.get("DUOPOOL_API_KEY", "").strip()
    if key:
        return key
    return next((k.strip() for k in os.environ.get("DUOPOOL_API_KEYS", "").split(",") if k.strip()), "")


class _WithKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self.md = ("authorization", f"Bearer {key}")

    def _details(self, d):
        md = [*(d.metadata or ()), self.md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


def router_channel(address: str) -> grpc.Channel:
    ch = grpc.insecure_channel(address)
    key = api_key()
    return grpc.intercept_channel(ch, _WithKey(key)) if key else ch
