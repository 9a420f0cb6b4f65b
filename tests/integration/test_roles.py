"""Roles and pools change at run time; the desired state lives in Redis apart from the observed one."""

import grpc
import pytest
import redis

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration


def test_set_role_applies_persists_and_survives_worker_restart(tmp_path, redis_server):
    url = redis_server.url.replace("/0", "/4")
    with LocalCluster(Topology(engine="sim", prefill_workers=2, decode_workers=1), tmp_path, redis_url=url,
                      router_port=0) as c:
        c.log = lambda m: None
        with c.internal_channel("scheduler") as sch, grpc.insecure_channel(c.router_address) as rch:
            sched, router = scheduler_pb2_grpc.SchedulerStub(sch), router_pb2_grpc.RouterStub(rch)

            def observed(wid):
                ws = {w.worker_id: w for w in router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers}
                return (ws[wid].role, ws[wid].pool) if wid in ws else None

            info = sched.SetWorkerRole(scheduler_pb2.SetWorkerRoleRequest(
                worker_id="prefill-1", role=common_pb2.DECODE, pool=common_pb2.STRICT, reason="test"), timeout=10)
            assert (info.role, info.pool) == (common_pb2.DECODE, common_pb2.STRICT)
            desired = redis.Redis.from_url(url, decode_responses=True).hgetall("duopool:worker:prefill-1:desired")
            assert desired["role"] == "decode" and desired["pool"] == "strict" and desired["reason"] == "test"
            wait_for(lambda: observed("prefill-1") == (common_pb2.DECODE, common_pb2.STRICT), 10,
                     what="the heartbeat to report the new role")
            # Placement follows: prefill now only on prefill-0; decode on either decode worker.
            for _ in range(4):
                msgs = list(router.Generate(router_pb2.GenerateRequest(
                    text="a b c d e f", max_tokens=2, request_class=common_pb2.ONLINE), timeout=10))
                assert msgs[-1].summary.prefill_worker == "prefill-0"
            # The worker restarts with its configured role; the scheduler re-applies the desired one.
            c.kill("prefill-1")
            c.restart("prefill-1")
            wait_for(lambda: observed("prefill-1") == (common_pb2.DECODE, common_pb2.STRICT), 15,
                     what="the scheduler to reconcile the restarted worker")
            with pytest.raises(grpc.RpcError) as err:
                sched.SetWorkerRole(scheduler_pb2.SetWorkerRoleRequest(worker_id="nope", role=common_pb2.DECODE),
                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("policy", ["ooco", "hygen"])
def test_live_scheduler_runs_the_decision_core(tmp_path, redis_server, policy):
    """A research policy runs live through the decision core: its layout (hygen: every worker mixed), its
    placements and offline admission, each decision counted by reason and listed for the request."""
    url = redis_server.url.replace("/0", "/5")
    with LocalCluster(Topology(engine="sim", policy=policy), tmp_path, redis_url=url, router_port=0) as c:
        c.log = lambda m: None
        with c.internal_channel("scheduler") as sch, grpc.insecure_channel(c.router_address) as rch:
            router, sched = router_pb2_grpc.RouterStub(rch), scheduler_pb2_grpc.SchedulerStub(sch)
            if policy == "hygen":
                def roles():
                    return {w.role for w in router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers}
                wait_for(lambda: roles() == {common_pb2.MIXED}, 20, what="hygen's layout (all mixed)")
            msgs = list(router.Generate(router_pb2.GenerateRequest(
                request_id="core-1", text="a b c d", max_tokens=3, request_class=common_pb2.ONLINE), timeout=10))
            assert msgs[-1].summary.output_tokens == 3
            job = router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=[
                router_pb2.BatchItem(custom_id=f"b{i}", text=f"w{i} x y z", max_tokens=4) for i in range(6)]),
                timeout=10)
            wait_for(lambda: router.GetBatch(router_pb2.GetBatchRequest(job_id=job.job_id), timeout=5).state
                     == router_pb2.DONE, 30, what="the batch to finish")
            results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id=job.job_id), timeout=10))
            assert sorted(r.index for r in results) == list(range(6)) and all(not r.error for r in results)
            for r in results:  # the exact tokens, prefilled and decoded in one place or split across two
                assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(f"w{r.index} x y z"), 4), r
                assert r.finish_reason == "length"
            if policy == "hygen":  # every worker mixed: each decodes where it prefilled (Worker.PrefillDecode)
                assert all(r.prefill_worker == r.decode_worker for r in results), results
            st = sched.Stats(scheduler_pb2.SchedulerStatsRequest(request_id="core-1"), timeout=5)
            assert st.policy == policy
            placed = {k: v for k, v in st.decisions.items() if k.startswith("place:")}
            assert sum(placed.values()) >= 7, dict(st.decisions)  # the online request and six offline ones
            assert st.request_decisions and "placed: prefill" in st.request_decisions[0]
