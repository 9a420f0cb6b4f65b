"""Channels the CLI opens to the router: they carry the API key from ``DUOPOOL_API_KEY`` (or the first of
``DUOPOOL_API_KEYS``, what `duopool up` started the cluster with) as ``authorization: Bearer`` metadata."""

from __future__ import annotations

import os

import grpc

from duopool.common.clusterauth import MetadataInterceptor


def api_key() -> str:
    key = os.environ.get("DUOPOOL_API_KEY", "").strip()
    if key:
        return key
    return next((k.strip() for k in os.environ.get("DUOPOOL_API_KEYS", "").split(",") if k.strip()), "")


def router_channel(address: str) -> grpc.Channel:
    ch = grpc.insecure_channel(address)
    key = api_key()
    return grpc.intercept_channel(ch, MetadataInterceptor("authorization", f"Bearer {key}")) if key else ch
