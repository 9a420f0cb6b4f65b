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


def kill_mid_stream(cluster, router, text: str, max_tokens: int, workers: tuple[str, str]):
    """Streams one long online request, kills whichever of ``workers`` serves it once some tokens have
    streamed, waits for the request to end and restarts the killed worker. Returns (the killed worker, the
    streamed token ids, the summary)."""
    import threading

    from duopool.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc

    def running_online(name: str) -> int:
        with cluster.internal_channel(name) as ch:
            return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5).running_online

    out: list = []
    t = threading.Thread(target=lambda: out.append(list(router.Generate(router_pb2.GenerateRequest(
        text=text, max_tokens=max_tokens, request_class=common_pb2.ONLINE), timeout=120))))
    t.start()
    serving = wait_for(lambda: next((w for w in workers if running_online(w)), None), 30, interval=0.05,
                       what="the request to start")
    time.sleep(0.5)  # some tokens streamed
    cluster.kill(serving)
    t.join(120)
    assert out, "the request did not end"
    cluster.restart(serving)
    tokens = [tok for m in out[0] if m.HasField("chunk") for tok in m.chunk.token_ids]
    return serving, tokens, out[0][-1].summary
