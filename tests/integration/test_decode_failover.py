"""A decode worker killed mid-stream (real processes, SIMULATED workers): the router continues the request on
the other decode worker from the tokens already streamed, so the client sees one uninterrupted, exactly
right answer instead of a cut stream."""

from __future__ import annotations

import threading
import time

import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

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


def running_online(cluster, name: str) -> int:
    with cluster.internal_channel(name) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5).running_online


def test_lost_decode_worker_mid_stream_the_request_continues_elsewhere(cluster, router):
    text, n = "a long answer please " * 3, 400
    out: list = []
    t = threading.Thread(target=lambda: out.append(list(router.Generate(router_pb2.GenerateRequest(
        text=text, max_tokens=n, request_class=common_pb2.ONLINE), timeout=120))))
    t.start()
    serving = wait_for(lambda: next((d for d in ("decode-0", "decode-1") if running_online(cluster, d)), None),
                       30, interval=0.05, what="the decode to start")
    time.sleep(0.5)  # some tokens streamed
    cluster.kill(serving)
    t.join(120)
    assert out, "the request did not end"
    msgs = out[0]
    tokens = [tok for m in msgs if m.HasField("chunk") for tok in m.chunk.token_ids]
    summary = msgs[-1].summary
    other = "decode-1" if serving == "decode-0" else "decode-0"
    assert summary.decode_worker == other, "the request was not moved to the other decode worker"
    assert tokens == sim_expected_tokens(sim_tokenize(text), n), "the moved stream differs from an uninterrupted one"
    assert summary.output_tokens == n and summary.finish_reason == "length"
    cluster.restart(serving)
