"""Offline batch jobs on a live cluster (real Redis, real services, SIMULATED workers).

The simulated engine's tokens are a known function of the sequence (``sim_token``), so every result can be
checked exactly: a request preempted, re-queued and resumed elsewhere must produce the same tokens as an
uninterrupted run, and each request must be answered exactly once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, scheduler_pb2, scheduler_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


def prompt(i: int) -> str:
    return " ".join(f"doc{i}w{j}" for j in range(20 + i % 7))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    # speedup 0.25: simulated steps 4x slower than an H100, so offline requests are still running when the
    # online burst arrives. The online trigger preempts on any arrival (the SLO trigger: test_slo_preemption).
    topo = Topology(engine="sim", prefill_workers=2, decode_workers=2, preempt_trigger="online")
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"), redis_url=redis_server.url.replace("/0", "/3"),
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.25", "DUOPOOL_SCHEDULER_ID": "sched-test"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def items(n: int, max_tokens: int) -> list:
    return [router_pb2.BatchItem(custom_id=f"r{i}", text=prompt(i), max_tokens=max_tokens) for i in range(n)]


def wait_done(router, job_id: str, timeout: float = 120.0):
    def done():
        st = router.GetBatch(router_pb2.GetBatchRequest(job_id=job_id), timeout=5)
        return st if st.state in (router_pb2.DONE, router_pb2.CANCELLED) else None
    return wait_for(done, timeout, interval=0.2, what=f"job {job_id} to finish")


def check_results(router, job_id: str, n: int, max_tokens: int) -> list:
    results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id=job_id), timeout=30))
    assert [r.index for r in results] == list(range(n)), "a request was lost or answered twice"
    for r in results:
        i = int(r.custom_id[1:])
        assert not r.error
        assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(prompt(i)), max_tokens), f"{r.custom_id} differs"
        assert r.text.split() == [f"sim{t}" for t in r.token_ids]
    return results


def test_batch_job_runs_every_request_exactly_once(router):
    st = router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items(12, 6), job_id="job-basic"), timeout=10)
    assert st.job_id == "job-basic" and st.total == 12
    again = router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items(3, 6), job_id="job-basic"), timeout=10)
    assert again.total == 12, "resubmitting a job id must not enqueue anything"
    st = wait_done(router, "job-basic")
    assert (st.state, st.done, st.failed) == (router_pb2.DONE, 12, 0)
    assert st.output_tokens == 12 * 6 and st.tokens_per_s > 0
    check_results(router, "job-basic", 12, 6)


@pytest.mark.parametrize(("bad", "field"), [
    (router_pb2.BatchItem(custom_id="x", text="", max_tokens=4), "requests[2].prompt.text"),
    (router_pb2.BatchItem(custom_id="x", text="hi", max_tokens=0), "requests[2].max_tokens"),
    (router_pb2.BatchItem(custom_id="r0", text="hi", max_tokens=4), "requests[2].custom_id"),
    (router_pb2.BatchItem(custom_id="x", text="hi", max_tokens=10**6), "requests[2].max_tokens"),
])
def test_invalid_batch_is_rejected_whole_and_nothing_enqueued(router, redis_server, bad, field):
    import redis

    r = redis.Redis.from_url(redis_server.url.replace("/0", "/3"))
    job_id = "bad-" + re.sub(r"[^A-Za-z0-9_-]", "_", field)
    before = r.zcard("duopool:jobs")
    reqs = items(2, 4) + [bad] + items(2, 4)[1:]
    with pytest.raises(grpc.RpcError) as err:
        router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=reqs, job_id=job_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert r.zcard("duopool:jobs") == before and not r.exists(f"duopool:job:{job_id}")
    with pytest.raises(grpc.RpcError) as err:
        router.GetBatch(router_pb2.GetBatchRequest(job_id=job_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_online_burst_preempts_offline_work_which_then_completes_identically(cluster, router):
    n, max_tokens = 8, 120
    router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items(n, max_tokens), job_id="job-burst"), timeout=10)
    with cluster.internal_channel("scheduler") as ch:
        sched = scheduler_pb2_grpc.SchedulerStub(ch)
        wait_for(lambda: sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5).offline_inflight >= 4,
                 timeout=20, what="offline work to be running")
        ttfts = []

        def online(i):
            msgs = list(router.Generate(router_pb2.GenerateRequest(
                text=f"online question {i} " * 5, max_tokens=8, request_class=common_pb2.ONLINE), timeout=30))
            ttfts.append(msgs[-1].summary.ttft_ms)

        burst = [threading.Thread(target=online, args=(i,)) for i in range(6)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        assert len(ttfts) == 6
        stats = sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        assert stats.preemptions >= 1, "the online burst did not preempt offline work"
        assert 0 < stats.preemption_ms_p50 <= stats.preemption_ms_p99 < 2000
    st = wait_done(router, "job-burst", timeout=180)
    assert (st.done, st.failed) == (n, 0) and st.preemptions >= 1
    results = check_results(router, "job-burst", n, max_tokens)
    assert sum(r.preemptions for r in results) >= 1


def test_job_survives_worker_kill_and_scheduler_restart(cluster, router):
    n, max_tokens = 10, 60
    router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items(n, max_tokens), job_id="job-chaos"), timeout=10)
    wait_for(lambda: router.GetBatch(router_pb2.GetBatchRequest(job_id="job-chaos"), timeout=5).done >= 1,
             timeout=60, what="first results")
    cluster.kill("prefill-1")
    cluster.kill("scheduler")
    time.sleep(0.5)
    cluster.restart("scheduler")
    st = wait_done(router, "job-chaos", timeout=180)
    assert (st.done, st.failed) == (n, 0)
    check_results(router, "job-chaos", n, max_tokens)


def test_cli_batch_submit_status_results(cluster, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"custom_id": f"r{i}", "prompt": prompt(i), "max_tokens": 5})
                             for i in range(3)) + "\n")
    env_router = ["--router", cluster.router_address]
    sub = subprocess.run([sys.executable, "-m", "duopool.cli.main", "batch", "submit", str(src), "--wait",
                          *env_router], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert "3/3" in sub.stderr
    res = subprocess.run([sys.executable, "-m", "duopool.cli.main", "batch", "results", job_id, *env_router],
                         capture_output=True, text=True, timeout=60)
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["r0", "r1", "r2"]
    assert lines[1]["token_ids"] == sim_expected_tokens(sim_tokenize(prompt(1)), 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"max_tokens": 3}\n')
    out = subprocess.run([sys.executable, "-m", "duopool.cli.main", "batch", "submit", str(bad), *env_router],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "line 2" in out.stderr and "nothing submitted" in out.stderr
