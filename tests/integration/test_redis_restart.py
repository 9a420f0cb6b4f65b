"""Redis crashes (SIGKILL) and comes back on the same port with its append-only file: accepted batch jobs
survive — including one accepted just before the crash — and every request is answered exactly once with
the uninterrupted tokens (real Redis started by the launcher, real services, SIMULATED workers)."""

from __future__ import annotations

import time

import grpc
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import router_pb2, router_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


def prompt(job: str, i: int) -> str:
    return " ".join(f"{job}{i}w{j}" for j in range(16 + i % 5))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(Topology(engine="sim", prefill_workers=1, decode_workers=1), tmp_path_factory.mktemp("run"),
                     router_port=0, extra_env={"DUOPOOL_SIM_SPEEDUP": "0.25", "OTEL_TRACES_EXPORTER": "none",
                                               "DUOPOOL_SCHEDULER_ID": "sched-redis-test"})
    c.log = lambda m: None
    c.start(timeout=120)
    assert c.redis is not None, "the launcher must own Redis for this test"
    yield c
    c.stop()


def submit(router, job: str, n: int, max_tokens: int) -> None:
    router.SubmitBatch(router_pb2.SubmitBatchRequest(job_id=job, requests=[
        router_pb2.BatchItem(custom_id=f"{job}-{i}", text=prompt(job, i), max_tokens=max_tokens) for i in range(n)]),
        timeout=10)


def test_batch_jobs_survive_a_redis_crash(cluster):
    n, max_tokens = 8, 60
    with grpc.insecure_channel(cluster.router_address) as ch:
        router = router_pb2_grpc.RouterStub(ch)

        def status(job: str):
            return router.GetBatch(router_pb2.GetBatchRequest(job_id=job), timeout=5)

        submit(router, "a", n, max_tokens)
        wait_for(lambda: status("a").done >= 2, timeout=60, what="job a to be under way")
        submit(router, "b", n, max_tokens)  # accepted ...
        cluster.redis.kill()  # ... and Redis crashes right after
        time.sleep(1.5)  # the services see it down: RPCs fail, queue updates are retried
        cluster.redis.start()

        def done(job: str):
            try:
                return status(job).state == router_pb2.DONE
            except grpc.RpcError:
                return False  # the router answers UNAVAILABLE while the scheduler reconnects

        for job in ("a", "b"):
            wait_for(lambda job=job: done(job), timeout=180, interval=0.5, what=f"job {job} to finish")
            st = status(job)
            assert (st.done, st.failed, st.total) == (n, 0, n)
            results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id=job), timeout=30))
            assert [r.index for r in results] == list(range(n)), f"job {job}: a request lost or answered twice"
            for r in results:
                assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(prompt(job, r.index)), max_tokens), f"{r.custom_id} differs"
