"""Authentication inside the cluster: a shared cluster token in gRPC metadata.

Internal services (scheduler, workers, kvtransfer) accept a call only when it carries
``x-duopool-cluster-token`` equal to the cluster's token (compared in constant time); health checks and
reflection stay open for probes. Every internal client (``Channels``, the workers' kvtransfer channel, the
KV pull stream, the CLI's internal commands) attaches it. The token comes from ``DUOPOOL_CLUSTER_TOKEN`` or
a file named by ``DUOPOOL_CLUSTER_TOKEN_FILE`` (never the repository); ``duopool up`` makes a random one per
cluster, compose passes the host's. With none configured internal services are open and say so at start.
"""

from __future__ import annotations

import hmac
import logging
import os
import pathlib

import grpc

log = logging.getLogger("duopool.auth")

TOKEN_HEADER = "x-duopool-cluster-token"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_cached: str | None = None


def cluster_token(refresh: bool = False) -> str:
    global _cached
    if _cached is None or refresh:
        token = os.environ.get("DUOPOOL_CLUSTER_TOKEN", "").strip()
        path = os.environ.get("DUOPOOL_CLUSTER_TOKEN_FILE", "")
        if not token and path:
            try:
                token = pathlib.Path(path).read_text().strip()
            except OSError as exc:
                raise RuntimeError(f"DUOPOOL_CLUSTER_TOKEN_FILE: cannot read {path}: {exc.strerror}") from None
        _cached = token
    return _cached


def metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    token = cluster_token() if token is None else token
    return ((TOKEN_HEADER, token),) if token else ()


def aio_channel(address: str, options=None, token: str | None = None) -> grpc.aio.Channel:
    """An internal asyncio channel that carries the cluster token. The token is added to each call's
    metadata by the channel's multicallables (``TokenChannel``), not by a client interceptor: grpc.aio runs
    every intercepted call through an extra task, which cost the router ~5% of its CPU per request."""
    channel = grpc.aio.insecure_channel(address, options=options)
    token = cluster_token() if token is None else token
    return TokenChannel(channel, token) if token else channel


class _WithToken:
    """A multicallable whose calls carry the cluster token (any token the caller passed is replaced)."""

    __slots__ = ("_inner", "_md")

    def __init__(self, inner, md: tuple[tuple[str, str], ...]) -> None:
        self._inner, self._md = inner, md

    def __call__(self, *args, metadata=None, **kwargs):
        md = self._md if not metadata else (*(kv for kv in metadata if kv[0] != TOKEN_HEADER), *self._md)
        return self._inner(*args, metadata=md, **kwargs)


class TokenChannel:
    """A ``grpc.aio.Channel`` whose every call carries the cluster token; everything else is the channel's."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._channel, self._md = channel, ((TOKEN_HEADER, token),)

    def unary_unary(self, *args, **kwargs):
        return _WithToken(self._channel.unary_unary(*args, **kwargs), self._md)

    def unary_stream(self, *args, **kwargs):
        return _WithToken(self._channel.unary_stream(*args, **kwargs), self._md)

    def stream_unary(self, *args, **kwargs):
        return _WithToken(self._channel.stream_unary(*args, **kwargs), self._md)

    def stream_stream(self, *args, **kwargs):
        return _WithToken(self._channel.stream_stream(*args, **kwargs), self._md)

    def __getattr__(self, name: str):
        return getattr(self._channel, name)

    async def __aenter__(self) -> TokenChannel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds one metadata pair to every call of a blocking channel (the cluster token; the CLI's API key)."""

    def __init__(self, key: str, value: str) -> None:
        self.pair = (key, value)

    def _details(self, d):
        md = [*(kv for kv in (d.metadata or ()) if kv[0] != self.pair[0]), self.pair]
        return _SyncDetails(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def sync_channel(address: str, options=None, token: str | None = None) -> grpc.Channel:
    """An internal blocking channel that carries the cluster token (CLI, tests, the KV pull stream)."""
    ch = grpc.insecure_channel(address, options=options)
    token = cluster_token() if token is None else token
    return grpc.intercept_channel(ch, MetadataInterceptor(TOKEN_HEADER, token)) if token else ch


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses internal calls without the cluster token (UNAUTHENTICATED), before any handler runs."""

    def __init__(self, token: str, service: str) -> None:
        self.token = token.encode()
        if not token:
            log.warning("NO CLUSTER TOKEN: %s accepts internal calls from anyone who can reach it "
                        "(set DUOPOOL_CLUSTER_TOKEN or DUOPOOL_CLUSTER_TOKEN_FILE)", service)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self.token or method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(given.encode(), self.token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return refusal(handler, "missing or wrong cluster token: internal services accept only the cluster")


def refusal(handler, message: str):
    """``handler`` with its behaviour replaced by an UNAUTHENTICATED abort (same call kind)."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    if handler is None:
        return None
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=stream)
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.stream_unary is not None:
        async def su(it, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return handler._replace(stream_unary=su)

    async def ss(it, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover
    return handler._replace(stream_stream=ss)
