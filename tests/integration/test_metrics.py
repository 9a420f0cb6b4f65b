"""Prometheus ``/metrics`` of every service of a live cluster (real processes, SIMULATED workers) after a mixed
online (gRPC and OpenAI HTTP) and offline (batch job) run: the counts match what was sent."""

from __future__ import annotations

import pathlib
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from duopool.common.metrics import METRICS, exposed_name, render_markdown
from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    c = LocalCluster(Topology(engine="sim"), tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url.replace("/0", "/10"), router_port=0,
                     extra_env={"OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        out[("family", (("name", fam.name),))] = 0.0  # listed even before it has a sample
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_docs_are_current():
    assert (ROOT / "docs" / "metrics.md").read_text() == render_markdown(), \
        "docs/metrics.md is stale: python -m duopool.common.metrics > docs/metrics.md"


def test_every_service_counts_what_was_sent(cluster, router):
    import openai

    urls = cluster.metrics_urls()
    assert set(urls) == {"router", "scheduler", "kvtransfer", "prefill-0", "decode-0"}
    n_grpc, n_http, max_tokens = 6, 3, 8
    for i in range(n_grpc):
        msgs = list(router.Generate(router_pb2.GenerateRequest(
            text=f"metrics probe {i} " * 20, max_tokens=max_tokens, request_class=common_pb2.ONLINE), timeout=30))
        assert msgs[-1].summary.output_tokens == max_tokens
    client = openai.OpenAI(base_url=cluster.http_url, api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    for i in range(n_http):
        c = client.completions.create(model=model, prompt=f"http probe {i} " * 20, max_tokens=max_tokens)
        assert c.usage.completion_tokens == max_tokens
    with pytest.raises(grpc.RpcError):
        list(router.Generate(router_pb2.GenerateRequest(text="", max_tokens=4), timeout=10))
    k, job_tokens = 10, 5
    items = [router_pb2.BatchItem(custom_id=f"m{i}", text=f"offline metrics {i} " * 20, max_tokens=job_tokens)
             for i in range(k)]
    router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id="metrics-job"), timeout=10)
    wait_for(lambda: router.GetBatch(router_pb2.GetBatchRequest(job_id="metrics-job"), timeout=5).state
             == router_pb2.DONE, 60, what="the batch job")
    time.sleep(1.5)  # gauges set by heartbeats and kvtransfer's tick

    r = scrape(urls["router"])
    online = n_grpc + n_http
    assert total(r, "duopool_requests_total", **{"class": "online", "status": "ok"}) == online
    assert total(r, "duopool_requests_total", **{"class": "online", "status": "invalid_argument"}) == 1
    assert total(r, "duopool_output_tokens_total", **{"class": "online"}) == online * max_tokens
    assert total(r, "duopool_ttft_seconds_count", **{"class": "online"}) == online
    assert total(r, "duopool_tpot_seconds_count", **{"class": "online"}) == online
    assert total(r, "duopool_e2e_seconds_count", **{"class": "online"}) == online
    assert total(r, "duopool_ttft_seconds_sum", **{"class": "online"}) > 0
    assert total(r, "duopool_jobs_total") == 0, "gRPC jobs are made by the scheduler"
    assert total(r, "duopool_router_inflight_requests") == 0

    s = scrape(urls["scheduler"])
    with cluster.internal_channel("scheduler") as ch:
        stats = scheduler_pb2_grpc.SchedulerStub(ch).Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
    assert total(s, "duopool_offline_requests_total", outcome="completed") == k
    assert total(s, "duopool_offline_tokens_total") == k * job_tokens
    assert total(s, "duopool_jobs_total") == 1
    assert total(s, "duopool_placements_total", **{"class": "online", "outcome": "placed"}) == online
    assert total(s, "duopool_placements_total", **{"class": "offline", "outcome": "placed"}) >= k
    assert total(s, "duopool_preemptions_total") == stats.preemptions
    assert total(s, "duopool_slo_requests_total", **{"class": "online"}) == online
    assert total(s, "duopool_inflight_requests") == 0
    assert total(s, "duopool_offline_active_jobs") == 0

    w = {n: scrape(urls[n]) for n in ("prefill-0", "decode-0")}
    generated = sum(total(x, "duopool_worker_tokens_total") for x in w.values())
    delivered = online * max_tokens + k * job_tokens
    if stats.preemptions == 0:
        assert generated == delivered
    else:  # preempted work is generated again after it resumes
        assert generated >= delivered
    exports = total(w["prefill-0"], "duopool_kv_exports_total")
    assert exports >= online + k and total(w["prefill-0"], "duopool_kv_export_bytes_total") > 0
    assert total(w["decode-0"], "duopool_kv_loads_total", outcome="loaded") == exports
    assert total(w["decode-0"], "duopool_engine_step_seconds_count") > 0
    assert total(w["decode-0"], "duopool_worker_running_requests") == 0

    kv = scrape(urls["kvtransfer"])
    assert total(kv, "duopool_kv_transfers_total", transport="shm", outcome="completed") == exports
    assert total(kv, "duopool_kv_transfer_bytes_total", transport="shm") == \
        total(w["prefill-0"], "duopool_kv_export_bytes_total")
    assert total(kv, "duopool_kv_active_transfers") == 0

    families = {dict(lab)["name"] for page in (r, s, kv, *w.values()) for (n, lab) in page if n == "family"}
    for m in METRICS:  # every documented metric is listed by the services
        assert m._name in families, m._name
    assert all(exposed_name(m).startswith("duopool_") for m in METRICS)
