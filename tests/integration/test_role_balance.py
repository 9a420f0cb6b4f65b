"""The role balancer on a live cluster (real Redis, real services, SIMULATED workers): online requests
whose TTFT misses its SLO while their TPOT has room make the scheduler move a decode worker to prefill,
through the desired-state path (Redis) that survives a worker restart."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    c = LocalCluster(Topology(engine="sim", prefill_workers=1, decode_workers=2), tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url.replace("/0", "/6"), router_port=0,
                     extra_env={"DUOPOOL_ROLE_BALANCE_S": "0.5", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def test_prefill_pressure_moves_a_decode_worker_to_prefill(cluster, redis_server):
    with grpc.insecure_channel(cluster.router_address) as ch, \
            cluster.internal_channel("scheduler") as sch:
        router, sched = router_pb2_grpc.RouterStub(ch), scheduler_pb2_grpc.SchedulerStub(sch)

        def roles() -> dict[str, str]:
            ws = sched.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers
            return {w.worker_id: common_pb2.WorkerRole.Name(w.role) for w in ws}

        assert sorted(roles().values()) == ["DECODE", "DECODE", "PREFILL"]
        # TTFT SLO missed by far, TPOT SLO with lots of room: prefill is the side under pressure.
        for i in range(4):
            list(router.Generate(router_pb2.GenerateRequest(
                text=f"question {i} " * 8, max_tokens=4, request_class=common_pb2.ONLINE,
                slo=common_pb2.Slo(ttft_ms=0.01, tpot_ms=60_000)), timeout=30))
        wait_for(lambda: sorted(roles().values()) == ["DECODE", "PREFILL", "PREFILL"], timeout=15,
                 what=lambda: f"a decode worker to become prefill (roles {roles()})")
        st = sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        assert st.role_moves == 1
        moved = next(w for w, r in roles().items() if r == "PREFILL" and w != "prefill-0")
        desired = redis.Redis.from_url(redis_server.url.replace("/0", "/6")).hgetall(f"duopool:worker:{moved}:desired")
        assert desired[b"role"] == b"prefill" and desired[b"reason"].startswith(b"role balance")
        # Never the last decode worker: more pressure moves nothing further.
        for i in range(4):
            list(router.Generate(router_pb2.GenerateRequest(
                text=f"again {i} " * 8, max_tokens=4, request_class=common_pb2.ONLINE,
                slo=common_pb2.Slo(ttft_ms=0.01, tpot_ms=60_000)), timeout=30))
        time.sleep(2.0)
        assert sorted(roles().values()) == ["DECODE", "PREFILL", "PREFILL"]
