"""gRPC plumbing shared by the services: servers with health and reflection, channels, status helpers."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


class _Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message get INVALID_ARGUMENT naming the request, instead of the
    UNKNOWN (with a Python exception text) that grpc answers when its deserializer raises."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe(raw: bytes):
            try:
                return decode(raw)
            except Exception as exc:  # noqa: BLE001 - DecodeError and friends
                return _Undecodable(str(exc) or type(exc).__name__)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid message for {handler_call_details.method} ({request.reason})")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    return await refuse(request, context)
                return await inner(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary)
        inner = handler.unary_stream
        if inspect.isasyncgenfunction(inner):
            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for item in inner(request, context):
                    yield item
        else:  # a handler that writes with context.write
            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    return await refuse(request, context)
                return await inner(request, context)
        return handler._replace(request_deserializer=safe, unary_stream=stream)


class Server:
    """A grpc.aio server with the health service (every listed service SERVING) and server reflection."""

    def __init__(self, bind: str, registrations: Iterable[tuple[Callable, object, str]],
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                 tls: tuple[bytes, bytes] | None = None, internal: bool = True) -> None:
        """``tls``: (certificate chain PEM, private key PEM) to serve TLS instead of plaintext. ``internal``:
        only the cluster may call (the cluster token, ``clusterauth``); the router is the public one."""
        guards: list = [DecodeGuard()]
        if internal:
            from duopool.common.clusterauth import ClusterAuthInterceptor, cluster_token

            guards.append(ClusterAuthInterceptor(cluster_token(), bind))
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[*guards, *interceptors])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        self._service_names = []
        for add, servicer, full_name in registrations:
            add(servicer, self._server)
            names.append(full_name)
            self._service_names.append(full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(names, self._server)
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(bind, creds)
        else:
            self.port = self._server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"cannot bind {bind}")
        self.host = bind.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self._server.start()
        for name in ["", *self._service_names]:
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))

    async def not_serving(self) -> None:
        """Health turns NOT_SERVING (probes and orchestrators see it; the server keeps answering)."""
        for name in ["", *self._service_names]:
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def stop(self, grace: float = 2.0) -> None:
        await self.not_serving()
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def _maybe_await(value: object) -> None:
    if asyncio.iscoroutine(value):
        await value


class Channels:
    """One cached channel per address (internal traffic, with the cluster token)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            from duopool.common.clusterauth import aio_channel

            ch = aio_channel(address, options=CHANNEL_OPTIONS)  # carries the cluster token
            self._channels[address] = ch
        return ch

    async def drop(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


async def wait_healthy(address: str, timeout: float = 60.0, service: str = "") -> None:
    """Polls the standard health service until SERVING; raises TimeoutError."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Exception | None = None
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while asyncio.get_running_loop().time() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as exc:
                last = exc
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} not healthy after {timeout:.0f}s ({last})")


async def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs ``main(stop_event)``; SIGTERM and SIGINT set the event (non-interactive shells ignore SIGINT)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await main(stop)
