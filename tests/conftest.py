"""Shared fixtures. Integration tests start real servers (Redis, the services) on free loopback ports."""

from __future__ import annotations

import time

import pytest

from duopool.common.otlp_sink import OtlpSink
from duopool.common.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def otlp_sink():
    sink = OtlpSink().start()
    yield sink
    sink.stop()


def sim_expected_tokens(prompt_ids: list[int], max_tokens: int, seed: int | None = None) -> list[int]:
    """The tokens the SIMULATED engine produces greedily after ``prompt_ids`` (a known function of the
    sequence), so live results — preempted and resumed or not — can be checked exactly."""
    from duopool.worker.engines.sim import sim_token

    out, last = [], prompt_ids[-1]
    for i in range(max_tokens):
        last = sim_token(last, len(prompt_ids) + i, seed)
        out.append(last)
    return out


def otel_env(sink: OtlpSink) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def traced_sim_cluster(tmp_path_factory, redis_server, otlp_sink, **topology):
    """A started local cluster of SIMULATED workers tracing to ``otlp_sink`` (stop it when done)."""
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    c = LocalCluster(Topology(engine="sim", **topology), tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url, router_port=0, extra_env=otel_env(otlp_sink))
    c.log = lambda m: None
    c.start(timeout=120)
    return c


def wait_for(predicate, timeout: float, interval: float = 0.1, what="condition"):
    """Poll `predicate` until it is truthy. `what` names the condition; a callable is evaluated at the timeout,
    so the message shows the state the wait ended in, not the one it started from."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")


@pytest.fixture()
def router(cluster):
    """A Router stub on the requesting module's ``cluster`` fixture (a LocalCluster)."""
    import grpc

    from duopool.v1 import router_pb2_grpc

    with grpc.insecure_channel(cluster.router_address) as ch:
        yield router_pb2_grpc.RouterStub(ch)
