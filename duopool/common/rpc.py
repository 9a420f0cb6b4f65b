"""gRPC plumbing shared by the services: servers with health and reflection, channels, status helpers."""

from __future__ import annotations

import asyncio
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


class Server:
    """A grpc.aio server with the health service (every listed service SERVING) and server reflection."""

    def __init__(self, bind: str, registrations: Iterable[tuple[Callable, object, str]],
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                 tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls``: (certificate chain PEM, private key PEM) to serve TLS instead of plaintext."""
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=list(interceptors) or None)
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

    async def stop(self, grace: float = 2.0) -> None:
        for name in ["", *self._service_names]:
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def _maybe_await(value: object) -> None:
    if asyncio.iscoroutine(value):
        await value


class Channels:
    """One cached insecure channel per address (internal traffic)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
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
