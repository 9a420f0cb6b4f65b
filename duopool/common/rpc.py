"""gRPC plumbing shared by the services: servers with health and reflection, channels, status helpers."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

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


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: Check, List and Watch.

    grpcio-health-checking's asyncio servicer has no List, and its Watch writes with ``context.write``
    (a coroutine handler), which server interceptors that expect streaming handlers to be async
    generators (OpenTelemetry's among them) turn into UNKNOWN. Watch here is an async generator: the
    current status at once, then every change, until the client goes or ``close()``.
    """

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": _SERVING}
        self._changed = asyncio.Condition()
        self._closed = False

    def _current(self, service: str) -> int:
        return self._status.get(service, _SERVICE_UNKNOWN)

    async def set(self, service: str, status: int) -> None:
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """Ends every Watch (after it has sent the latest status); for a server that is stopping."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._status.items()})

    async def Watch(self, request, context):
        service, sent = request.service, None
        while True:
            async with self._changed:  # not held across the yield: a slow watcher never holds up set()
                while self._current(service) == sent and not self._closed:
                    await self._changed.wait()
                status = self._current(service)
            if status == sent:  # woken only by close()
                return
            sent = status
            yield health_pb2.HealthCheckResponse(status=status)


REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1ALPHA = reflection_pb2.DESCRIPTOR.package  # grpc.reflection.v1alpha


def _ensure_reflection_v1_descriptor() -> None:
    """Puts ``grpc/reflection/v1/reflection.proto`` in the default descriptor pool (so reflection can
    describe the v1 service it lists). grpcio-reflection 1.85 ships only v1alpha; v1 has the same
    messages, fields and numbers in package ``grpc.reflection.v1``, so its descriptor is v1alpha's renamed."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1_SERVICE)
        return
    except KeyError:
        pass
    try:  # a grpcio-reflection that ships v1 registers the real descriptor on import
        from grpc_reflection.v1 import reflection_pb2 as _v1  # noqa: F401

        return
    except ImportError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "grpc/reflection/v1/reflection.proto"
    fdp.package = "grpc.reflection.v1"
    fdp.options.Clear()
    fdp.options.java_package = "io.grpc.reflection.v1"
    fdp.options.java_outer_classname = "ServerReflectionProto"
    fdp.options.java_multiple_files = True
    fdp.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    old, new = f".{_V1ALPHA}.", ".grpc.reflection.v1."
    for message in fdp.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in fdp.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool.AddSerializedFile(fdp.SerializeToString())


def _add_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection v1alpha and v1 (wire-identical: the v1 method runs on v1alpha's messages)."""
    _ensure_reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


class Server:
    """A grpc.aio server with the health service (Check, List, Watch; every listed service SERVING) and
    server reflection (v1 and v1alpha)."""

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
        self.health = HealthServicer()
        names = [HEALTH_SERVICE, REFLECTION_V1_SERVICE, reflection.SERVICE_NAME]
        self._service_names = []
        for add, servicer, full_name in registrations:
            add(servicer, self._server)
            names.append(full_name)
            self._service_names.append(full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _add_reflection(names, self._server)
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
            await self.health.set(name, _SERVING)

    async def not_serving(self) -> None:
        """Health turns NOT_SERVING (probes and orchestrators see it; the server keeps answering)."""
        for name in ["", *self._service_names]:
            await self.health.set(name, _NOT_SERVING)

    async def stop(self, grace: float = 2.0) -> None:
        await self.not_serving()
        await self.health.close()  # Watch streams end (NOT_SERVING sent) instead of holding up the grace
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


class Channels:
    """One cached channel per address (internal traffic, with the cluster token)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, type], object] = {}

    def stub(self, address: str, cls: type):
        """A cached stub of ``cls`` on the address's channel (a stub builds a callable per method)."""
        stub = self._stubs.get((address, cls))
        if stub is None:
            stub = self._stubs[(address, cls)] = cls(self.get(address))
        return stub

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            from duopool.common.clusterauth import aio_channel

            ch = aio_channel(address, options=CHANNEL_OPTIONS)  # carries the cluster token
            self._channels[address] = ch
        return ch

    async def drop(self, address: str) -> None:
        for key in [k for k in self._stubs if k[0] == address]:
            del self._stubs[key]
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()


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


async def health_report(address: str, timeout: float = 3.0) -> dict[str, str]:
    """What a container healthcheck asks: ``Watch`` on the server's overall health until it says SERVING
    (its first message is the current status, so a healthy server answers at once; one that is starting is
    waited for up to ``timeout``), then ``List`` for every service's status. Returns {service: status name}
    with "" for the server as a whole; raises TimeoutError naming the address when it never says SERVING."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while loop.time() < deadline:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=max(0.1, deadline - loop.time()))
            try:
                async for resp in call:
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    if resp.status == _SERVING:
                        break
                else:
                    last = f"{last}, then the Watch stream ended"
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            if last == "SERVING":
                listed = await stub.List(health_pb2.HealthListRequest(), timeout=max(0.1, deadline - loop.time()))
                return {name: health_pb2.HealthCheckResponse.ServingStatus.Name(st.status)
                        for name, st in sorted(listed.statuses.items())}
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout:.1f}s (last: {last})")


async def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs ``main(stop_event)``; SIGTERM and SIGINT set the event (non-interactive shells ignore SIGINT)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await main(stop)
