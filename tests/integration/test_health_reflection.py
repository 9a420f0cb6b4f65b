"""gRPC health (Check, List, Watch) and server reflection (v1 and v1alpha) on duopool servers, untraced.

In-process: a real ``duopool.common.rpc.Server`` behind OpenTelemetry's asyncio server interceptor (with its
own tracer provider, so nothing global changes). On a sim cluster: every service, traced to ``otlp_sink``.
Reflection is read with grpc-requests, a client we did not write; it speaks only v1alpha, so for v1 its
reflection stub is pointed at the v1 method (same messages on the wire) and its own descriptor handling
does the rest.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from duopool.common.rpc import Server
from duopool.common.telemetry import grpc_trace_filter
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.conftest import traced_sim_cluster, wait_for

grpc_requests = pytest.importorskip("grpc_requests")

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
LONG_PROMPT = " ".join(f"word{i}" for i in range(40))  # long enough for KV blocks to move (kvtransfer traced)


class _Router(router_pb2_grpc.RouterServicer):
    async def ListWorkers(self, request, context):
        return common_pb2.ListWorkersResponse()


@pytest_asyncio.fixture(loop_scope="function")  # the loop of the test that calls the server
async def traced_server():
    """A duopool Server (Router registered) whose calls go through OpenTelemetry's aio server interceptor with
    duopool's filter; yields (server, finished spans)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel = aio_server_interceptor(tracer_provider=provider, filter_=grpc_trace_filter())
    server = Server("127.0.0.1:0", [(router_pb2_grpc.add_RouterServicer_to_server, _Router(), "duopool.v1.Router")],
                    interceptors=(otel,), internal=False)
    await server.start()
    yield server, exporter.get_finished_spans
    await server.stop(0)
    provider.shutdown()


def _v1_stub(channel):
    """The v1 reflection method on v1alpha's messages (the v1 proto is the same on the wire)."""
    return channel.stream_stream(V1_METHOD, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


class _V1Stub:
    def __init__(self, channel) -> None:
        self.ServerReflectionInfo = _v1_stub(channel)


def _reflection_client(address: str, v1: bool):
    """A grpc-requests reflection client on a fresh descriptor pool (nothing comes from our own imports);
    ``v1``: its reflection requests go to grpc.reflection.v1."""
    client = grpc_requests.Client(address, lazy=True, descriptor_pool=descriptor_pool.DescriptorPool())
    if v1:
        client.reflection_stub = _V1Stub(client.channel)
    return client


def _check_reflection(address: str, service: str = "duopool.v1.Router") -> None:
    """grpc-requests, over reflection v1 and then v1alpha: lists ``service``, answers file_containing_symbol for
    it, describes every listed service, and makes a call built from reflected types only."""
    package, short = service.rsplit(".", 1)
    for v1 in (True, False):
        client = _reflection_client(address, v1)
        names = set(client.service_names)
        assert names == {service, "grpc.health.v1.Health", V1, V1ALPHA}, names
        files = client.get_file_descriptors_by_symbol(service)
        assert any(f.package == package and short in {s.name for s in f.service} for f in files), files
        client.register_all_service()  # every listed service, v1 reflection's own included, is describable
        assert client.service(service).method_names
        assert client.service(V1).method_names == ("ServerReflectionInfo",)
        # a call built from reflected descriptors only
        assert client.request("grpc.health.v1.Health", "Check", {"service": service}) == {"status": "SERVING"}


# -- in-process --------------------------------------------------------------------------------------------


async def test_watch_streams_serving_then_not_serving(traced_server):
    server, spans = traced_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        call = stub.Watch(health_pb2.HealthCheckRequest(service="duopool.v1.Router"), timeout=10)
        overall = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await call.read()).status == SERVING
        assert (await overall.read()).status == SERVING
        await server.not_serving()
        assert (await call.read()).status == NOT_SERVING
        assert (await overall.read()).status == NOT_SERVING
        await server.health.set("duopool.v1.Router", SERVING)
        assert (await call.read()).status == SERVING
        call.cancel()
        overall.cancel()
        check = await stub.Check(health_pb2.HealthCheckRequest(service="duopool.v1.Router"), timeout=5)
        assert check.status == SERVING
    assert not [s.name for s in spans() if s.name.startswith(UNTRACED)]


async def test_watch_survives_an_interceptor_that_traces_it():
    """Even where health is traced (another filter, another interceptor that expects async-generator streaming
    handlers), Watch works: grpcio-health-checking's context.write Watch answered UNKNOWN there."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = Server("127.0.0.1:0", [(router_pb2_grpc.add_RouterServicer_to_server, _Router(), "duopool.v1.Router")],
                    interceptors=(aio_server_interceptor(tracer_provider=provider),), internal=False)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert (await call.read()).status == SERVING
            await server.not_serving()
            assert (await call.read()).status == NOT_SERVING
            call.cancel()
    finally:
        await server.stop(0)
        provider.shutdown()


def test_trace_filter_leaves_out_health_reflection_and_excluded_services(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "duopool.v1.Scheduler, duopool.v1.KvTransfer")
    traced = grpc_trace_filter()
    for method, want in [("/grpc.health.v1.Health/Check", False), ("/grpc.health.v1.Health/Watch", False),
                         ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
                         ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
                         ("/duopool.v1.Scheduler/Place", False), ("/duopool.v1.KvTransfer/StartTransfer", False),
                         ("/duopool.v1.Router/Generate", True), ("/duopool.v1.Worker/Prefill", True)]:
        assert traced(SimpleNamespace(method=method)) is want, method


async def test_watch_of_an_unknown_service_waits_for_it(traced_server):
    server, _ = traced_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        call = stub.Watch(health_pb2.HealthCheckRequest(service="later.Service"), timeout=10)
        assert (await call.read()).status == SERVICE_UNKNOWN
        await server.health.set("later.Service", SERVING)
        assert (await call.read()).status == SERVING
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_ends_watch_after_not_serving():
    server = Server("127.0.0.1:0", [(router_pb2_grpc.add_RouterServicer_to_server, _Router(), "duopool.v1.Router")],
                    internal=False)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await call.read()).status == SERVING
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(server.stop(grace=5))
        statuses = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            statuses.append(msg.status)
        assert statuses == [NOT_SERVING]
        assert await call.code() == grpc.StatusCode.OK
        await stopping
        assert asyncio.get_running_loop().time() - started < 4  # the open Watch did not hold up the grace


async def test_list_returns_every_service_with_its_status(traced_server):
    server, spans = traced_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert {k: v.status for k, v in listed.statuses.items()} == {"": SERVING, "duopool.v1.Router": SERVING}
        await server.not_serving()
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert {v.status for v in listed.statuses.values()} == {NOT_SERVING}
        # a traced call still is: the filter only leaves out health and reflection
        await router_pb2_grpc.RouterStub(ch).ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
    names = [s.name for s in spans()]
    assert names == ["/duopool.v1.Router/ListWorkers"], names


async def test_reflection_v1_raw_and_unknown_symbol(traced_server):
    server, spans = traced_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="duopool.v1.Router"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1)]
        got = [r async for r in _v1_stub(ch)(iter(requests), timeout=5)]
    listed, router, missing, v1 = got
    assert {s.name for s in listed.list_services_response.service} == {
        "duopool.v1.Router", "grpc.health.v1.Health", V1, V1ALPHA}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in router.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "duopool.v1" and "Router" in {s.name for s in f.service} for f in files)
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    v1_file = descriptor_pb2.FileDescriptorProto.FromString(v1.file_descriptor_response.file_descriptor_proto[0])
    assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    method = v1_file.service[0].method[0]
    assert (method.input_type, method.output_type) == (".grpc.reflection.v1.ServerReflectionRequest",
                                                       ".grpc.reflection.v1.ServerReflectionResponse")
    assert not spans()


async def test_grpc_requests_reads_reflection_v1_and_v1alpha(traced_server):
    server, spans = traced_server
    await asyncio.to_thread(_check_reflection, server.address)  # a blocking client: not on the server's loop
    client = _reflection_client(server.address, v1=True)
    assert {"Generate", "ListWorkers"} <= set(
        (await asyncio.to_thread(client.service, "duopool.v1.Router")).method_names)
    assert not [s.name for s in spans() if s.name.startswith(UNTRACED)]


# -- a sim cluster -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, otlp_sink):
    c = traced_sim_cluster(tmp_path_factory, redis_server, otlp_sink, prefill_workers=1, decode_workers=1)
    yield c
    c.stop()


SERVICES = {"router": "duopool.v1.Router", "scheduler": "duopool.v1.Scheduler",
            "kvtransfer": "duopool.v1.KvTransfer", "prefill-0": "duopool.v1.Worker", "decode-0": "duopool.v1.Worker"}


@pytest.mark.parametrize("name", list(SERVICES))
def test_health_watch_list_and_reflection_on_every_service(cluster, name):
    service = SERVICES[name]
    with cluster.internal_channel(name) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for watched in ("", service):
            call = stub.Watch(health_pb2.HealthCheckRequest(service=watched), timeout=10)
            assert next(call).status == SERVING
            call.cancel()
        listed = stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert {k: v.status for k, v in listed.statuses.items()} == {"": SERVING, service: SERVING}
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
        resp = next(_v1_stub(ch)(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert {service, "grpc.health.v1.Health", V1, V1ALPHA} <= {s.name for s in resp.list_services_response.service}
    _check_reflection(cluster.address(name), service)  # health and reflection need no cluster token


def test_health_and_reflection_make_no_spans_while_generate_is_one_trace(cluster, router, otlp_sink):
    for name in SERVICES:
        with cluster.internal_channel(name) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            next(call)
            call.cancel()
            stub.List(health_pb2.HealthListRequest(), timeout=5)
            list(_v1_stub(ch)(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    summary = None
    for msg in router.Generate(router_pb2.GenerateRequest(text=LONG_PROMPT, max_tokens=4,
                                                          request_class=common_pb2.ONLINE), timeout=30):
        if msg.HasField("summary"):
            summary = msg.summary
    trace_id = summary.trace_id
    assert len(trace_id) == 32

    def services():
        return {sp.service for sp in otlp_sink.spans(trace_id)}

    def roots():
        return [sp for sp in otlp_sink.spans(trace_id) if not sp.parent_span_id]

    # every service exports in order, so once the Generate trace is in (its root span, which the router ends
    # last, included), the health calls' spans would be too
    wait_for(lambda: {"duopool-router", "duopool-scheduler", "duopool-kvtransfer", "duopool-prefill-0",
                      "duopool-decode-0"} <= services() and roots(), timeout=15,
             what=lambda: f"the spans of trace {trace_id} (have {services()}, roots {[sp.name for sp in roots()]})")
    roots = roots()
    assert len(roots) == 1 and roots[0].name == "/duopool.v1.Router/Generate"
    untraced = {sp.name for sp in otlp_sink.spans() if sp.name.startswith(UNTRACED)}
    assert not untraced, untraced


def test_duopool_health_watches_then_lists_like_the_compose_healthcheck(cluster):
    """The compose healthcheck's command: exit 0 with every service listed SERVING; a port nobody serves
    fails within its timeout, naming the address."""
    import subprocess
    import sys

    for name, service in SERVICES.items():
        out = subprocess.run([sys.executable, "-m", "duopool", "health", cluster.address(name)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"{service}: SERVING" in out.stdout, out.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = subprocess.run([sys.executable, "-m", "duopool", "health", "--quiet", "--timeout", "1", dead],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and dead in out.stderr and not out.stdout, (out.returncode, out.stderr)


def _buf() -> str:
    """buf (npm's @bufbuild/buf), which scripts/test.sh installs: a gRPC client nobody here wrote."""
    import os
    import shutil

    path = os.environ.get("DUOPOOL_BUF") or shutil.which("buf")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("buf is not installed (scripts/test.sh installs it with npm into .cache/tools)")
        pytest.skip("buf is not installed (scripts/test.sh installs it with npm into .cache/tools)")
    return path


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_reads_reflection_and_calls_the_router(cluster, protocol):
    """``buf curl`` lists the router's methods through reflection (each protocol forced in turn), then calls
    ListWorkers with the schema it downloaded: the registered workers come back as JSON."""
    import json
    import subprocess

    base = ["--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol]
    url = f"http://{cluster.address('router')}"
    out = subprocess.run([_buf(), "curl", *base, "--list-methods", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    methods = set(out.stdout.split())
    assert {"duopool.v1.Router/Generate", "duopool.v1.Router/ListWorkers", "duopool.v1.Router/SubmitBatch"} <= methods
    out = subprocess.run([_buf(), "curl", *base, "-d", "{}", f"{url}/duopool.v1.Router/ListWorkers"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {w["workerId"] for w in json.loads(out.stdout)["workers"]} == {"prefill-0", "decode-0"}
