"""A decode worker killed mid-stream (real processes, SIMULATED workers): the router continues the request on
the other decode worker from the tokens already streamed, so the client sees one uninterrupted, exactly
right answer instead of a cut stream."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import kill_mid_stream, sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    topo = Topology(engine="sim", prefill_workers=1, decode_workers=2)
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"), redis_url=redis_server.url.replace("/0", "/9"),
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.25", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def test_lost_decode_worker_mid_stream_the_request_continues_elsewhere(cluster, router):
    text, n = "a long answer please " * 3, 400
    serving, tokens, summary = kill_mid_stream(cluster, router, text, n, ("decode-0", "decode-1"))
    other = "decode-1" if serving == "decode-0" else "decode-0"
    assert summary.decode_worker == other, "the request was not moved to the other decode worker"
    assert tokens == sim_expected_tokens(sim_tokenize(text), n), "the moved stream differs from an uninterrupted one"
    assert summary.output_tokens == n and summary.finish_reason == "length"


def scheduler_inflight(cluster) -> int:
    from duopool.v1 import scheduler_pb2, scheduler_pb2_grpc

    with cluster.internal_channel("scheduler") as ch:
        st = scheduler_pb2_grpc.SchedulerStub(ch).Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
    return st.online_inflight + st.offline_inflight


def wait_idle(cluster, stage: str = "") -> None:
    def busy():
        running = {}
        for w in ("prefill-0", "decode-0", "decode-1"):
            with cluster.internal_channel(w) as ch:
                st = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
            if st.running_online or st.running_offline:
                running[w] = (st.running_online, st.running_offline)
        return running, scheduler_inflight(cluster)

    wait_for(lambda: busy() == ({}, 0), 10, interval=0.1,
             what=lambda: f"abandoned requests to leave the engines and the scheduler{stage} (still: {busy()})")


def decoding(cluster) -> bool:
    for w in ("decode-0", "decode-1"):
        with cluster.internal_channel(w) as ch:
            st = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
        if st.running_online or st.running_offline:
            return True
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_http_client_gone_stops_the_generation(cluster, stream):
    """An OpenAI client that disconnects (closes a stream, or times out waiting for a whole answer) stops the
    generation in the engines: nothing keeps decoding for nobody."""
    import httpx

    model = httpx.get(f"{cluster.http_url}/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "keep going " * 20, "max_tokens": 1500, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{cluster.http_url}/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_for(lambda: decoding(cluster), 10, interval=0.05, what="the decode to run")
    else:
        def call():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{cluster.http_url}/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: decoding(cluster), 10, interval=0.05, what="the decode to run")
        t.join(30)
    wait_idle(cluster)


@pytest.mark.parametrize("klass", [common_pb2.ONLINE, common_pb2.OFFLINE])
def test_client_cancel_reaches_the_engines_at_every_stage(cluster, router, klass):
    """A gRPC client that cancels — while its request is placed, prefilled, between prefill and decode, or
    decoding — leaves no engine request running and no placement counted at the scheduler."""
    text = "cancel me soon " * 40
    for i, delay in enumerate((0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, None)):
        call = router.Generate(router_pb2.GenerateRequest(text=text, max_tokens=1500, request_class=klass,
                                                          request_id=f"cancel-{klass}-{i}"), timeout=60)
        if delay is None:
            wait_for(lambda: decoding(cluster), 10, interval=0.05, what="the decode to run")
        else:
            time.sleep(delay)
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED, (delay, call.code(), call.details())
        wait_idle(cluster, f" after a cancel at {delay if delay is not None else 'the decode'} s")
