"""Mixed workers (real processes, SIMULATED engines): a cluster of workers that prefill and decode their own
requests. The router serves a request on one worker in one streamed call (Worker.PrefillDecode): no KV
exported, moved or tracked, the exact greedy tokens, and a worker lost mid-stream continues on another one
from the tokens already streamed. Offline batch work runs on them too, exactly once."""

from __future__ import annotations

import grpc
import openai
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import (
    common_pb2,
    kvtransfer_pb2,
    kvtransfer_pb2_grpc,
    router_pb2,
)
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import kill_mid_stream, sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    topo = Topology(engine="sim", prefill_workers=0, decode_workers=0, mixed_workers=2)
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"), redis_url=redis_server.url.replace("/0", "/10"),
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.25", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def kv_stats(cluster) -> kvtransfer_pb2.KvStatsResponse:
    with cluster.internal_channel("kvtransfer") as ch:
        return kvtransfer_pb2_grpc.KvTransferStub(ch).Stats(kvtransfer_pb2.KvStatsRequest(), timeout=5)


def test_a_request_is_served_on_one_worker_without_moving_kv(cluster, router):
    before = kv_stats(cluster)
    text, n = "one worker serves both phases", 24
    msgs = list(router.Generate(router_pb2.GenerateRequest(text=text, max_tokens=n,
                                                           request_class=common_pb2.ONLINE), timeout=60))
    tokens = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
    s = msgs[-1].summary
    assert tokens == sim_expected_tokens(sim_tokenize(text), n)
    assert s.prefill_worker == s.decode_worker and s.prefill_worker.startswith("mixed-")
    assert s.output_tokens == n and s.finish_reason == "length" and s.prompt_tokens == len(sim_tokenize(text))
    assert s.kv_transferred_tokens == 0 and len(s.token_times_ms) == n and s.ttft_ms > 0
    after = kv_stats(cluster)
    moved = (after.completed + after.failed + after.expired + after.released + after.active_transfers)
    assert moved == (before.completed + before.failed + before.expired + before.released + before.active_transfers), \
        "a one-worker request must not export KV"


def test_openai_chat_and_a_one_token_answer(cluster):
    client = openai.OpenAI(base_url=cluster.http_url, api_key="x", max_retries=0, timeout=30)
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=5,
                                         messages=[{"role": "user", "content": "hello"}])
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    one = client.completions.create(model=out.model, prompt="a b c", max_tokens=1)
    assert one.usage.completion_tokens == 1


def test_bad_input_gets_invalid_argument_naming_the_field(router):
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[10**9]), max_tokens=4),
                             timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in err.value.details()


def test_lost_worker_mid_stream_the_request_continues_on_the_other(cluster, router):
    text, n = "a long answer from a mixed worker " * 2, 400
    serving, tokens, summary = kill_mid_stream(cluster, router, text, n, ("mixed-0", "mixed-1"))
    assert summary.decode_worker == ("mixed-1" if serving == "mixed-0" else "mixed-0")
    assert tokens == sim_expected_tokens(sim_tokenize(text), n), "the moved stream differs from an uninterrupted one"


def test_batch_on_mixed_workers_runs_every_request_exactly_once(router):
    items = [router_pb2.BatchItem(custom_id=f"m{i}", text=f"mixed batch item {i}", max_tokens=5) for i in range(8)]
    router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id="job-mixed"), timeout=10)

    def done():
        st = router.GetBatch(router_pb2.GetBatchRequest(job_id="job-mixed"), timeout=5)
        return st if st.state == router_pb2.DONE else None
    st = wait_for(done, 120, interval=0.2, what="the batch to finish")
    assert (st.done, st.failed) == (8, 0)
    results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id="job-mixed"), timeout=30))
    assert sorted(r.custom_id for r in results) == sorted(i.custom_id for i in items)
    for r in results:
        assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(f"mixed batch item {r.custom_id[1:]}"), 5)
