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
