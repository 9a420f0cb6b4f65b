"""Nothing a client sends may stall the cluster (real Redis, real services, SIMULATED workers): odd ids are
refused at the edge and cannot hurt a worker called directly, duplicate ids are refused before any work,
deadlines bound every call, oversized input is refused, and an OFFLINE Generate preempted by online work
resumes where it stopped instead of ending OK with a cut answer. Ends with a bounded fuzz of Generate and
SubmitBatch (hand-built malformed messages too): no UNKNOWN status, no hang, the cluster still serving.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration

ODD_IDS = ["a/b", "../etc", ".hidden", "nul\x00id", "x" * 129, "sp ace", "job:items", "é"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    topo = Topology(engine="sim", prefill_workers=1, decode_workers=1, preempt_trigger="online")
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"), redis_url=redis_server.url.replace("/0", "/8"),
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.25", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def answer(router, text: str = "still serving", n: int = 3, **kw) -> list[router_pb2.GenerateResponse]:
    return list(router.Generate(router_pb2.GenerateRequest(text=text, max_tokens=n, **kw), timeout=30))


def test_odd_request_ids_are_refused_and_the_workers_keep_serving(cluster, router):
    for rid in ODD_IDS:
        with pytest.raises(grpc.RpcError) as err:
            answer(router, request_id=rid)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rid
        assert err.value.details().startswith("request_id:"), err.value.details()
    # straight at the prefill worker, around the router: refused there too, and it stays healthy
    with cluster.internal_channel("prefill-0") as ch:
        worker = worker_pb2_grpc.WorkerStub(ch)
        for rid in ODD_IDS:
            with pytest.raises(grpc.RpcError) as err:
                worker.Prefill(worker_pb2.PrefillRequest(request_id=rid, text="hi there", max_tokens=4,
                                                         export_kv=True), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rid
        with pytest.raises(grpc.RpcError) as err:
            worker.Prefill(worker_pb2.PrefillRequest(request_id="ok-id", token_ids=common_pb2.TokenIds(
                ids=[1, 2, 10**9]), max_tokens=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in err.value.details()
    for i in range(4):  # every later request is served (before the fix one odd id stopped the worker)
        msgs = answer(router, f"after odd ids {i}")
        assert msgs[-1].summary.output_tokens == 3


def test_duplicate_request_id_in_flight_is_refused_before_any_work(router):
    results: list = []

    def first():
        results.append(answer(router, "a long one " * 4, n=200, request_id="dup-1"))

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as err:
        answer(router, "second", request_id="dup-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and err.value.details().startswith("request_id:")
    t.join(60)
    assert results and results[0][-1].summary.output_tokens == 200  # the first one was not disturbed
    assert answer(router, "reuse after", request_id="dup-1")[-1].summary.output_tokens == 3


def test_client_deadline_bounds_the_request(router):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(router_pb2.GenerateRequest(text="slow " * 5, max_tokens=1500), timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    assert answer(router)[-1].summary.output_tokens == 3


@pytest.mark.parametrize(("req", "field"), [
    (router_pb2.GenerateRequest(text="x" * 1_000_001, max_tokens=2), "prompt.text"),
    (router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1] * 262_145), max_tokens=2), "prompt.token_ids"),
    (router_pb2.GenerateRequest(text="hi", max_tokens=2, slo=common_pb2.Slo(ttft_ms=float("nan"))), "slo.ttft_ms"),
])
def test_oversized_or_non_finite_input_is_refused(router, req, field):
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field + ":")


def test_job_ids_that_could_alias_keys_are_refused(router):
    items = [router_pb2.BatchItem(custom_id="a", text="hello", max_tokens=2)]
    for job_id in ("j:items", "j:results", "a/b", "x" * 129):
        with pytest.raises(grpc.RpcError) as err:
            router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id=job_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("job_id:")
        with pytest.raises(grpc.RpcError) as err:
            router.GetBatch(router_pb2.GetBatchRequest(job_id=job_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    big = [router_pb2.BatchItem(custom_id="c" * 513, text="hello", max_tokens=2)]
    with pytest.raises(grpc.RpcError) as err:
        router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=big), timeout=10)
    assert err.value.details().startswith("requests[0].custom_id:")


def test_preempted_offline_generate_resumes_and_answers_in_full(router):
    text, n = "offline essay " * 6, 300
    out: list = []

    def offline():
        out.append(list(router.Generate(router_pb2.GenerateRequest(
            text=text, max_tokens=n, request_class=common_pb2.OFFLINE, sampling=common_pb2.SamplingParams()),
            timeout=120)))

    t = threading.Thread(target=offline)
    t.start()
    time.sleep(1.0)  # decoding by now
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:  # online arrivals preempt it (trigger "online")
        answer(router, "online now", n=2, request_class=common_pb2.ONLINE)
        time.sleep(0.3)
    t.join(120)
    msgs = out[0]
    tokens = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
    summary = msgs[-1].summary
    assert summary.finish_reason == "length" and summary.output_tokens == n == len(tokens)
    assert summary.resumes >= 1, "the online traffic never preempted the offline request"
    assert tokens == sim_expected_tokens(sim_tokenize(text), n), "resumed output differs from uninterrupted"
    assert summary.prompt_tokens == len(sim_tokenize(text)) and len(summary.token_times_ms) == n


# -- fuzz ---------------------------------------------------------------------------------------------------
texts = st.text(max_size=30) | st.just("") | st.just("ok then")
ids = st.text(max_size=20) | st.sampled_from(ODD_IDS) | st.just("")
floats = st.floats(allow_nan=True, allow_infinity=True)
sampling = st.builds(common_pb2.SamplingParams, temperature=floats, top_p=floats,
                     stop=st.lists(st.text(max_size=5), max_size=3))
generate = st.builds(
    lambda text, tokens, use_tokens, n, cls, rid, s, ttft: router_pb2.GenerateRequest(
        **({"token_ids": common_pb2.TokenIds(ids=tokens)} if use_tokens else {"text": text}),
        max_tokens=n, request_class=cls, request_id=rid, sampling=s, slo=common_pb2.Slo(ttft_ms=ttft)),
    texts, st.lists(st.integers(-5, 2**31 - 1), max_size=6), st.booleans(), st.integers(-3, 40),
    st.integers(-1, 4), ids, sampling, floats)
batch = st.builds(
    lambda its, job: router_pb2.SubmitBatchRequest(requests=its, job_id=job),
    st.lists(st.builds(router_pb2.BatchItem, custom_id=st.text(max_size=8), text=texts,
                       max_tokens=st.integers(-2, 12)), max_size=4), ids)


def test_fuzzed_generate_and_submit_batch_never_unknown_never_hang(cluster):
    codes: dict[str, int] = {}
    with grpc.insecure_channel(cluster.router_address) as ch:
        router = router_pb2_grpc.RouterStub(ch)
        raw_generate = ch.unary_stream("/duopool.v1.Router/Generate")
        raw_submit = ch.unary_unary("/duopool.v1.Router/SubmitBatch")

        def call(fn):
            try:
                fn()
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED), exc.details()
            codes[code] = codes.get(code, 0) + 1

        @settings(max_examples=120, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(generate, batch, st.binary(max_size=60))
        def check(g, b, junk):
            call(lambda: list(router.Generate(g, timeout=20)))
            call(lambda: router.SubmitBatch(b, timeout=20))
            call(lambda: list(raw_generate(junk, timeout=20)))  # bytes that are not a valid message
            call(lambda: raw_submit(junk, timeout=20))

        check()
        print("fuzz codes:", codes)
        assert codes.get("INVALID_ARGUMENT", 0) > 20 and codes.get("OK", 0) >= 3, codes
        assert answer(router)[-1].summary.output_tokens == 3
        wait_for(lambda: len(router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers) == 2, 10,
                 what="both workers still registered")


def test_internal_services_accept_only_the_cluster(cluster, router):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from duopool.common.clusterauth import sync_channel
    from duopool.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

    calls = {
        "scheduler": lambda ch: scheduler_pb2_grpc.SchedulerStub(ch).SetWorkerRole(
            scheduler_pb2.SetWorkerRoleRequest(worker_id="decode-0", role=common_pb2.PREFILL), timeout=5),
        "kvtransfer": lambda ch: kvtransfer_pb2_grpc.KvTransferStub(ch).Stats(kvtransfer_pb2.KvStatsRequest(),
                                                                              timeout=5),
        "prefill-0": lambda ch: worker_pb2_grpc.WorkerStub(ch).SetRole(
            worker_pb2.SetRoleRequest(role=common_pb2.DECODE), timeout=5),
        "decode-0": lambda ch: list(worker_pb2_grpc.WorkerStub(ch).Decode(worker_pb2.DecodeRequest(
            request_id="x", prompt_token_ids=[1, 2], max_tokens=2), timeout=5)),
    }
    for name, call in calls.items():
        for ch in (grpc.insecure_channel(cluster.address(name)),
                   sync_channel(cluster.address(name), token="wrong-token")):
            with ch:
                with pytest.raises(grpc.RpcError) as err:
                    call(ch)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
    with cluster.internal_channel("kvtransfer") as ch:
        calls["kvtransfer"](ch)  # with the cluster's token it works
    workers = router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers
    assert workers and all(not w.address and not w.host for w in workers), "internal addresses leaked"
    assert {w.role for w in workers} == {common_pb2.PREFILL, common_pb2.DECODE}  # nothing was changed
    assert answer(router)[-1].summary.output_tokens == 3
