"""The SLO-aware preemption trigger on a live cluster (real Redis, real services, SIMULATED workers).

Online requests whose SLOs have headroom leave the offline work running next to them (no preemption, the
workers' SLO pressure stays low); once observed latency reaches the SLO (here: requests with SLOs no
engine can meet), the next online request preempts — and the preempted offline requests still finish
with exactly the uninterrupted tokens, each answered once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


def prompt(i: int) -> str:
    return " ".join(f"slo{i}w{j}" for j in range(24))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    topo = Topology(engine="sim", prefill_workers=1, decode_workers=1, preempt_trigger="slo")
    # a database of its own, emptied: a job another module left unfinished would compete for the workers
    url = redis_server.url.replace("/0", "/11")
    import redis

    redis.Redis.from_url(url).flushdb()
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"), redis_url=url,
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.1", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def test_offline_work_stays_while_slos_hold_and_is_preempted_once_they_do_not(cluster):
    n, max_tokens = 4, 400
    with grpc.insecure_channel(cluster.router_address) as ch, \
            cluster.internal_channel("scheduler") as sch:
        router, sched = router_pb2_grpc.RouterStub(ch), scheduler_pb2_grpc.SchedulerStub(sch)

        def stats():
            return sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)

        def online(i: int, slo: common_pb2.Slo) -> router_pb2.GenerateSummary:
            msgs = list(router.Generate(router_pb2.GenerateRequest(
                text=f"online {i} " * 6, max_tokens=6, request_class=common_pb2.ONLINE, slo=slo), timeout=60))
            return msgs[-1].summary

        assert stats().preempt_trigger == "slo"
        router.SubmitBatch(router_pb2.SubmitBatchRequest(job_id="slo-job", requests=[
            router_pb2.BatchItem(custom_id=f"s{i}", text=prompt(i), max_tokens=max_tokens) for i in range(n)]),
            timeout=10)
        wait_for(lambda: stats().offline_inflight >= 2 * n, timeout=30, what="all offline requests to be running")

        # Generous SLOs: the online requests share the workers with the offline work, nothing is preempted.
        for i in range(3):
            s = online(i, common_pb2.Slo(ttft_ms=60_000, tpot_ms=60_000))
            assert s.output_tokens == 6
        st = stats()
        assert st.preemptions == 0, "offline work was preempted although the SLOs had headroom"
        assert st.offline_inflight == 2 * n, "offline work left the workers although the SLOs had headroom"
        assert set(st.slo_pressure) == {"prefill-0", "decode-0"}
        assert max(st.slo_pressure.values()) < 0.5

        # SLOs no engine meets: the observations drive the pressure past the high mark and the next online
        # request preempts (at its placement, or when the observation arrives).
        online(10, common_pb2.Slo(ttft_ms=0.001, tpot_ms=0.001))
        online(11, common_pb2.Slo(ttft_ms=0.001, tpot_ms=0.001))
        st = stats()
        assert min(st.slo_pressure.values()) >= 0.8
        assert st.preemptions >= 1, "SLO pressure above the high mark preempted nothing"
        # The operator's view of the same state.
        out = subprocess.run([sys.executable, "-m", "duopool.cli.main", "stats", "--scheduler",
                              cluster.address("scheduler"), "--json"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "DUOPOOL_CLUSTER_TOKEN": cluster.cluster_token})
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["preempt_trigger"] == "slo" and int(shown["preemptions"]) >= st.preemptions
        assert set(shown["slo_pressure"]) == {"prefill-0", "decode-0"}

        def done():
            b = router.GetBatch(router_pb2.GetBatchRequest(job_id="slo-job"), timeout=5)
            return b if b.state == router_pb2.DONE else None

        b = wait_for(done, timeout=120, interval=0.2, what="the offline job to finish")
        results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id="slo-job"), timeout=30))
        st = stats()
    assert (b.done, b.failed) == (n, 0) and b.preemptions >= 1
    # Preempted mid-decode, their KV was parked in kvtransfer's pool: the resumes loaded it (the simulated
    # engine checks every block byte for byte) and computed only the tail.
    assert st.resumed_parked >= 1, f"no resume used parked KV (recomputed: {dict(st.resumed_recomputed)})"
    assert st.tokens_not_recomputed >= 16 * st.resumed_parked
    assert [r.index for r in results] == list(range(n)), "a request was lost or answered twice"
    for r in results:
        assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(prompt(r.index)), max_tokens), f"{r.custom_id} differs"
