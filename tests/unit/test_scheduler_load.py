"""The scheduler's per-worker co-location view: pressure and online load per worker or per host."""

import argparse

import pytest
import redis.asyncio as redis

from duopool.common.config import SchedulerConfig
from duopool.common.registry import WorkerRecord
from duopool.scheduler.server import SchedulerService


def service(scope: str) -> SchedulerService:
    svc = SchedulerService(SchedulerConfig(redis_url="redis://unused", pressure_scope=scope),
                           redis=redis.Redis())  # never connected: load() needs no I/O
    svc._workers = [WorkerRecord(w, f"127.0.0.1:{i}", role, "relaxed", "vllm", "m", 2048, 32, host)
                    for i, (w, role, host) in enumerate([("p0", "prefill", "a"), ("d0", "decode", "a"),
                                                          ("d1", "decode", "b")])]
    svc.online["p0"] = 1
    svc.offline.update({"d0": 2, "d1": 3})
    svc.pressure["p0"] = 0.9
    return svc


def test_worker_scope_keeps_each_worker_to_itself():
    svc = service("worker")
    assert (svc.load("d0").online, svc.load("d0").pressure) == (0, 0.0)
    assert svc.load("p0").pressure == 0.9


@pytest.mark.parametrize("wid", ["p0", "d0"])
def test_host_scope_shares_online_load_and_pressure_across_a_host(wid):
    svc = service("host")
    load = svc.load(wid)
    assert (load.online, load.pressure) == (1, 0.9)
    assert svc.load("d1").online == 0 and svc.load("d1").pressure == 0.0  # another host
    assert svc.load("d0").offline == 2  # offline work stays counted per worker


def test_bad_scope_is_rejected():
    from duopool.common.config import ConfigError, config_from_namespace

    with pytest.raises(ConfigError, match="pressure_scope"):
        config_from_namespace(SchedulerConfig, argparse.Namespace(),
                              {"REDIS_URL": "redis://x", "DUOPOOL_PRESSURE_SCOPE": "rack"})


class _Aborted(Exception):
    pass


class _Context:
    code = None

    async def abort(self, code, details):
        self.code = code
        raise _Aborted(details)


def test_a_release_that_overtakes_its_place_leaves_nothing_in_flight():
    """A client that goes away while its request is being placed: the router's Release can be handled
    while the Place still waits for the cluster state; that Place must not count the request afterwards.
    A later request reusing the id is placed as usual."""
    import asyncio

    import grpc

    from duopool.v1 import common_pb2, scheduler_pb2

    async def scenario():
        svc = service("worker")
        svc.online.clear()
        svc.offline.clear()
        gate = asyncio.Event()
        workers = svc._workers

        async def slow_workers():
            await gate.wait()
            return workers

        svc.workers = slow_workers
        req = scheduler_pb2.PlaceRequest(request_id="r1", request_class=common_pb2.ONLINE, max_tokens=4)
        ctx = _Context()
        place = asyncio.ensure_future(svc.Place(req, ctx))
        await asyncio.sleep(0)
        await svc.Release(scheduler_pb2.ReleaseRequest(request_id="r1"), None)
        gate.set()
        with pytest.raises(_Aborted):
            await place
        assert ctx.code == grpc.StatusCode.CANCELLED
        assert sum(svc.online.values()) + sum(svc.offline.values()) == 0 and "r1" not in svc.placed
        placed = await svc.Place(req, _Context())  # the id reused by a new request: placed and counted
        assert placed.prefill.worker_id and svc.placed["r1"]
        await svc.Release(scheduler_pb2.ReleaseRequest(request_id="r1"), None)
        assert sum(svc.online.values()) == 0 and not svc._released_early

    asyncio.run(scenario())


def test_a_balanced_worker_joins_the_pool_of_its_new_role_under_a_research_policy():
    from duopool.scheduler.server import balanced_pool

    assert balanced_pool("decode", "relaxed", research=True) == "strict"
    assert balanced_pool("prefill", "strict", research=True) == "relaxed"
    assert balanced_pool("decode", "relaxed", research=False) == "relaxed"  # least-loaded: pools as they are
    assert balanced_pool("mixed", "strict", research=True) == "strict"
