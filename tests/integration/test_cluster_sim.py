"""The whole request path with real Redis, real gRPC services on loopback, and SIMULATED workers."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.sim import SIM_BLOCK_BYTES
from tests.conftest import traced_sim_cluster, wait_for

pytestmark = pytest.mark.integration

LONG_PROMPT = " ".join(f"word{i}" for i in range(40))  # 40 sim tokens: 2 full blocks of 16 move


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, otlp_sink):
    c = traced_sim_cluster(tmp_path_factory, redis_server, otlp_sink, prefill_workers=2, decode_workers=1)
    yield c
    c.stop()


def generate(stub, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("request_class", common_pb2.ONLINE)
    chunks, summary = [], None
    for msg in stub.Generate(router_pb2.GenerateRequest(**kw), timeout=30):
        if msg.HasField("chunk"):
            chunks.append(msg.chunk)
        else:
            summary = msg.summary
    return chunks, summary


def test_generate_streams_tokens_prefilled_and_decoded_on_different_workers(router):
    chunks, s = generate(router, text=LONG_PROMPT, max_tokens=10)
    ids = [i for c in chunks for i in c.token_ids]
    assert len(ids) == 10 == s.output_tokens
    assert s.prompt_tokens == 40
    assert s.engine == "sim"
    assert s.prefill_worker.startswith("prefill-") and s.decode_worker == "decode-0"
    assert s.kv_transferred_tokens == 32 and s.decode_cached_tokens == 32
    assert s.kv_bytes == 2 * SIM_BLOCK_BYTES
    assert s.finish_reason == "length"
    assert len(s.token_times_ms) == 10 and s.ttft_ms == s.token_times_ms[0] > 0
    assert all(b >= a for a, b in zip(s.token_times_ms, s.token_times_ms[1:], strict=False))
    assert "".join(c.text for c in chunks).split() == [f"sim{i}" for i in ids]


def test_split_output_equals_unsplit_and_is_deterministic(router, cluster):
    _, s1 = generate(router, text=LONG_PROMPT, max_tokens=6, request_id="det-1")
    chunks1, _ = generate(router, text=LONG_PROMPT, max_tokens=6)
    chunks2, _ = generate(router, token_ids=common_pb2.TokenIds(ids=[5, 6, 7] * 20), max_tokens=6)
    assert s1.request_id == "det-1"
    # One engine producing the same 6 tokens without the split:
    with cluster.internal_channel("decode-0") as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        pre = stub.Prefill(worker_pb2.PrefillRequest(request_id="x", text=LONG_PROMPT, max_tokens=6), timeout=10)
        dec = list(stub.Decode(worker_pb2.DecodeRequest(
            request_id="x", prompt_token_ids=pre.prompt_token_ids, generated_token_ids=[pre.first_token_id],
            max_tokens=5), timeout=10))
    unsplit = [pre.first_token_id] + [i for d in dec for i in d.token_ids]
    assert [i for c in chunks1 for i in c.token_ids] == unsplit
    assert len([i for c in chunks2 for i in c.token_ids]) == 6


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"text": "   "}, "prompt.text"),
        ({}, "prompt"),
        ({"token_ids": common_pb2.TokenIds(ids=[])}, "prompt.token_ids"),
        ({"token_ids": common_pb2.TokenIds(ids=[3, -1])}, "prompt.token_ids"),
        ({"text": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text": "hi", "max_tokens": -3}, "max_tokens"),
        ({"text": "hi", "sampling": common_pb2.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
        ({"text": "hi", "request_class": 7}, "request_class"),
        ({"text": "hi", "slo": common_pb2.Slo(ttft_ms=-1)}, "slo.ttft_ms"),
        ({"text": "hi", "slo": common_pb2.Slo(tpot_ms=-5)}, "slo.tpot_ms"),
        ({"text": "hi", "sampling": common_pb2.SamplingParams(temperature=-1)}, "sampling.temperature"),
        ({"text": "hi", "max_tokens": 100_000}, "max_tokens"),
    ],
)
def test_invalid_input_is_invalid_argument_naming_the_field(router, request_kw, field):
    kw = {"max_tokens": 4, "request_class": common_pb2.ONLINE, **request_kw}
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(router_pb2.GenerateRequest(**kw), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_health_and_reflection_on_every_service(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    expected = {"router": "duopool.v1.Router", "scheduler": "duopool.v1.Scheduler",
                "kvtransfer": "duopool.v1.KvTransfer", "prefill-0": "duopool.v1.Worker"}
    for name, service in expected.items():
        with cluster.internal_channel(name) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_one_trace_spans_all_four_services(router, otlp_sink):
    _, s = generate(router, text=LONG_PROMPT, max_tokens=4)
    assert len(s.trace_id) == 32

    # the scheduler's placement span (Place travels as a message of the router's Session stream, carrying
    # the request's trace context)
    want = {"/duopool.v1.Router/Generate", "duopool.schedule", "/duopool.v1.Worker/Prefill",
            "/duopool.v1.Worker/Decode", "/duopool.v1.KvTransfer/StartTransfer"}

    def services():
        return {sp.service for sp in otlp_sink.spans(s.trace_id)}

    def names():
        return {sp.name for sp in otlp_sink.spans(s.trace_id)}

    # each service exports in batches: the router's Generate span (ended last) may arrive after the others
    wait_for(lambda: {"duopool-router", "duopool-scheduler", "duopool-kvtransfer"} <= services()
             and any(x.startswith("duopool-prefill") for x in services()) and "duopool-decode-0" in services()
             and want <= names(), timeout=15,
             what=lambda: f"spans of all services in trace {s.trace_id} (have {services()}, {names()})")
    spans = otlp_sink.spans(s.trace_id)
    roots = [sp for sp in spans if not sp.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "duopool-router"


def test_a_trace_holds_our_own_spans_with_their_attributes(router, otlp_sink):
    _, s = generate(router, text=LONG_PROMPT, max_tokens=6)
    own = {"duopool.schedule", "duopool.engine.prefill", "duopool.kv.export", "duopool.kv.load",
           "duopool.engine.decode"}
    wait_for(lambda: own <= {sp.name for sp in otlp_sink.spans(s.trace_id)}, timeout=15,
             what=f"our spans in trace {s.trace_id}")
    by = {sp.name: sp for sp in otlp_sink.spans(s.trace_id)}
    sched = by["duopool.schedule"].attributes
    assert sched["duopool.class"] == "online" and sched["duopool.placed"] is True
    assert sched["duopool.prefill_worker"] == s.prefill_worker and sched["duopool.decode_worker"] == s.decode_worker
    assert sched["duopool.policy"]
    pre = by["duopool.engine.prefill"]
    assert pre.attributes["duopool.prompt_tokens"] == s.prompt_tokens and pre.attributes["duopool.output_tokens"] == 1
    assert [e["name"] for e in pre.events] == ["duopool.first_token"]
    exp, load = by["duopool.kv.export"].attributes, by["duopool.kv.load"].attributes
    assert exp["duopool.kv.bytes"] == s.kv_bytes > 0 and exp["duopool.kv.tokens"] == s.kv_transferred_tokens
    assert load["duopool.kv.transport"] == "shm" and load["duopool.kv.loadable"] is True
    dec = by["duopool.engine.decode"].attributes
    assert dec["duopool.output_tokens"] == s.output_tokens - 1 and dec["duopool.cached_tokens"] == s.decode_cached_tokens
    assert dec["duopool.worker"] == s.decode_worker
    for name in own:  # each inside the automatic gRPC span of its service
        assert by[name].parent_span_id, name


def test_killed_worker_leaves_registry_and_next_request_goes_elsewhere(cluster, router):
    def workers():
        return {w.worker_id for w in router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers}

    assert workers() == {"prefill-0", "prefill-1", "decode-0"}
    cluster.kill("prefill-0")
    killed_at = time.monotonic()
    # Requests right after the kill still succeed: the router re-places around the dead worker.
    for _ in range(4):
        _, s = generate(router, text=LONG_PROMPT, max_tokens=3)
        assert s.prefill_worker == "prefill-1"
    wait_for(lambda: "prefill-0" not in workers(), timeout=10, what="prefill-0 to drop out of the registry")
    assert time.monotonic() - killed_at < 10
    assert workers() == {"prefill-1", "decode-0"}


def test_no_workers_is_unavailable(tmp_path, redis_server):
    # Database 1 of the same server: a cluster state with no workers at all.
    c = LocalCluster(Topology(engine="sim", prefill_workers=0, decode_workers=0), tmp_path,
                     redis_url=redis_server.url.replace("/0", "/1"), router_port=0)
    c.log = lambda m: None
    with c:
        with grpc.insecure_channel(c.router_address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
                    text="hello", max_tokens=4, request_class=common_pb2.ONLINE), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no workers" in err.value.details()
