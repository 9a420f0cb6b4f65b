"""Prometheus metrics of every duopool service, all defined here (one table: ``docs/metrics.md``, generated
from ``METRICS`` by ``python -m duopool.common.metrics``).

Names are ``duopool_*`` with the unit in the name; labels are bounded (class, status, reason, worker id,
transport — never a request or job id). Each service process exposes the metrics it updates on an HTTP
``/metrics`` port (``--metrics-port``; the router serves it on its OpenAI HTTP port as well); a metric a
process never touches is still listed there, at zero.

Counting rule for the totals that more than one service updates: each counts different work, so a sum
over services counts each thing once (``duopool_offline_tokens_total``: the router counts offline
``Generate`` calls, the scheduler counts batch requests).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ENABLED = os.environ.get("DUOPOOL_METRICS", "1") not in ("0", "false", "off")


class _Off:
    """A metric that records nothing (``DUOPOOL_METRICS=0``: the overhead benchmark's baseline)."""

    def __init__(self, real) -> None:
        self._real = real  # kept for the docs (name, type, labels, help); never registered

    def __getattr__(self, name):
        if name.startswith("_"):
            return getattr(self._real, name)
        return self._nothing

    def labels(self, *a, **k):
        return self

    def _nothing(self, *a, **k):
        return None


def _metric(cls):
    def make(name, documentation, labelnames=(), registry=None, **kw):
        if ENABLED:
            return cls(name, documentation, labelnames, registry=registry, **kw)
        return _Off(cls(name, documentation, labelnames, registry=None, **kw))
    return make


Counter, Gauge, Histogram = _metric(_Counter), _metric(_Gauge), _metric(_Histogram)

# Latency buckets (seconds): TTFT from ~5 ms to minutes (a CPU machine, offline work queued for long).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800, 3600)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# -- router: what clients see -------------------------------------------------------------------------
REQUESTS = Counter("duopool_requests", "Generate requests (gRPC and OpenAI HTTP) by class and final status "
                   "(gRPC status code name, lower case)", ["class", "status"], registry=REGISTRY)
TTFT = Histogram("duopool_ttft_seconds", "time to first token of requests that produced one", ["class"],
                 buckets=_TTFT_BUCKETS, registry=REGISTRY)
TPOT = Histogram("duopool_tpot_seconds", "time per output token after the first (mean per request)", ["class"],
                 buckets=_TPOT_BUCKETS, registry=REGISTRY)
ITL = Histogram("duopool_itl_seconds", "inter-token latency: the gap before each streamed chunk after the first",
                ["class"], buckets=_TPOT_BUCKETS, registry=REGISTRY)
E2E = Histogram("duopool_e2e_seconds", "request latency, arrival to last token", ["class"],
                buckets=_E2E_BUCKETS, registry=REGISTRY)
SLO = Counter("duopool_slo_requests", "finished online requests by whether TTFT and TPOT met their SLO "
              "(met=true|false); attainment = met=true / all", ["class", "met"], registry=REGISTRY)
OUTPUT_TOKENS = Counter("duopool_output_tokens", "tokens streamed to clients by Generate", ["class"],
                        registry=REGISTRY)
OFFLINE_TOKENS = Counter("duopool_offline_tokens", "output tokens of finished offline work: offline Generate "
                         "calls (router) and batch requests (scheduler)", registry=REGISTRY)
ROUTER_INFLIGHT = Gauge("duopool_router_inflight_requests", "Generate requests being served by this router",
                        ["class"], registry=REGISTRY)
RESUMES = Counter("duopool_resumes", "requests continued after losing their worker or being preempted "
                  "(reason=preempted|decode_lost)", ["reason"], registry=REGISTRY)

# -- scheduler: decisions, preemption, the offline queue ---------------------------------------------
PLACEMENTS = Counter("duopool_placements", "placement decisions by class and outcome (placed|no_worker)",
                     ["class", "outcome"], registry=REGISTRY)
PREEMPTIONS = Counter("duopool_preemptions", "offline requests preempted, by reason (online_placed: an online "
                      "request landed; slo_pressure: observed latency; yield: stepped back between prefill and "
                      "decode)", ["reason"], registry=REGISTRY)
PREEMPTION_LATENCY = Histogram("duopool_preemption_seconds", "preemption decision to offline work stopped",
                               buckets=_STEP_BUCKETS, registry=REGISTRY)
INFLIGHT = Gauge("duopool_inflight_requests", "requests placed and not yet released, per worker and class",
                 ["worker", "class"], registry=REGISTRY)
OFFLINE_REQUESTS = Counter("duopool_offline_requests", "offline batch requests by outcome "
                           "(completed|failed|requeued|moved|dropped)", ["outcome"], registry=REGISTRY)
OFFLINE_RUNNING = Gauge("duopool_offline_running_requests", "batch requests running on workers now",
                        registry=REGISTRY)
OFFLINE_BUFFERED = Gauge("duopool_offline_buffered_requests", "batch requests read from the queue, waiting for "
                         "a worker with offline room", registry=REGISTRY)
ACTIVE_JOBS = Gauge("duopool_offline_active_jobs", "batch jobs with work queued or running", registry=REGISTRY)
JOBS = Counter("duopool_jobs", "batch jobs made (gRPC SubmitBatch: scheduler; OpenAI batches: router)",
               registry=REGISTRY)
DECISIONS = Counter("duopool_scheduler_decisions", "decisions of the decision core (research policies) by kind "
                    "(place|hold|reject|preempt|move|set_role) and reason", ["kind", "reason"], registry=REGISTRY)
ROLE_CHANGES = Counter("duopool_role_changes", "worker role changes ordered (to=prefill|decode|mixed, "
                       "source=operator|balancer)", ["to", "source"], registry=REGISTRY)
SLO_PRESSURE = Gauge("duopool_slo_pressure_ratio", "per worker: moving average of observed / SLO latency "
                     "(TTFT on prefill workers, TPOT on decode workers)", ["worker"], registry=REGISTRY)

# -- workers: engines -----------------------------------------------------------------------------------
WORKER_RUNNING = Gauge("duopool_worker_running_requests", "engine requests in flight on this worker",
                       ["worker", "class"], registry=REGISTRY)
WORKER_WAITING = Gauge("duopool_worker_waiting_requests", "engine requests waiting to be scheduled",
                       ["worker"], registry=REGISTRY)
WORKER_KV_USAGE = Gauge("duopool_worker_kv_usage_ratio", "share of the engine's KV cache in use", ["worker"],
                        registry=REGISTRY)
WORKER_TOKENS = Counter("duopool_worker_tokens", "tokens generated by this worker's engine", ["worker", "class"],
                        registry=REGISTRY)
WORKER_PHASE = Histogram("duopool_worker_phase_seconds", "engine time of one request's phase "
                         "(phase=prefill|decode; prefill includes the engine's queue)", ["worker", "phase"], buckets=_E2E_BUCKETS,
                         registry=REGISTRY)
ENGINE_STEP = Histogram("duopool_engine_step_seconds", "engine step time (SIMULATED engine: its model of the "
                        "step)", ["worker"], buckets=_STEP_BUCKETS, registry=REGISTRY)
WORKER_PREEMPTED = Counter("duopool_worker_preempted", "offline engine requests this worker stopped on "
                           "a Preempt call", ["worker"], registry=REGISTRY)
KV_EXPORTS = Counter("duopool_kv_exports", "prefills that exported KV for a decode", ["worker"],
                     registry=REGISTRY)
KV_EXPORT_BYTES = Counter("duopool_kv_export_bytes", "bytes of KV exported by prefills", ["worker"],
                          registry=REGISTRY)
KV_LOADS = Counter("duopool_kv_loads", "decodes by how they got the prompt's KV (loaded|recomputed)",
                   ["worker", "outcome"], registry=REGISTRY)
KV_PARKS = Counter("duopool_kv_parks", "preempted offline decodes by what became of their KV (outcome=parked, "
                   "or why not: engine cannot park, pool full, kvtransfer unreachable, ...)", ["worker", "outcome"],
                   registry=REGISTRY)
KV_PARK_SECONDS = Histogram("duopool_kv_park_seconds", "saving a preempted decode's KV into the pool (op=park: "
                            "engine stop to pooled) or taking it back (op=take)", ["worker", "op"],
                            buckets=_STEP_BUCKETS, registry=REGISTRY)
KV_RESUMES = Counter("duopool_kv_resumes", "resumes of parked KV by outcome (loaded, or why recomputed: parked KV "
                     "evicted, not loadable, ...)", ["worker", "outcome"], registry=REGISTRY)

# -- kvtransfer -----------------------------------------------------------------------------------------
KV_TRANSFERS = Counter("duopool_kv_transfers", "KV transfers that ended, by transport and outcome "
                       "(completed|failed|expired|released)", ["transport", "outcome"], registry=REGISTRY)
KV_TRANSFER_BYTES = Counter("duopool_kv_transfer_bytes", "bytes of KV moved, by transport", ["transport"],
                            registry=REGISTRY)
KV_ACTIVE = Gauge("duopool_kv_active_transfers", "KV transfers started and not yet ended", registry=REGISTRY)
KV_PARKED_BYTES = Gauge("duopool_kv_parked_bytes", "bytes of KV parked in the host pool", registry=REGISTRY)
KV_PARKED = Gauge("duopool_kv_parked_segments", "KV segments parked in the host pool", registry=REGISTRY)

METRICS = [REQUESTS, TTFT, TPOT, ITL, E2E, SLO, OUTPUT_TOKENS, OFFLINE_TOKENS, ROUTER_INFLIGHT, RESUMES,
           PLACEMENTS, DECISIONS, PREEMPTIONS, PREEMPTION_LATENCY, INFLIGHT, OFFLINE_REQUESTS, OFFLINE_RUNNING,
           OFFLINE_BUFFERED, ACTIVE_JOBS, JOBS, ROLE_CHANGES, SLO_PRESSURE, WORKER_RUNNING, WORKER_WAITING,
           WORKER_KV_USAGE, WORKER_TOKENS, WORKER_PHASE, ENGINE_STEP, WORKER_PREEMPTED, KV_EXPORTS,
           KV_EXPORT_BYTES, KV_LOADS, KV_PARKS, KV_PARK_SECONDS, KV_RESUMES, KV_TRANSFERS, KV_TRANSFER_BYTES, KV_ACTIVE, KV_PARKED_BYTES, KV_PARKED]

SERVICE_OF = {  # which service updates which metric (the docs table)
    "router": [REQUESTS, TTFT, TPOT, ITL, E2E, OUTPUT_TOKENS, OFFLINE_TOKENS, ROUTER_INFLIGHT, RESUMES, JOBS],
    "scheduler": [SLO, PLACEMENTS, DECISIONS, PREEMPTIONS, PREEMPTION_LATENCY, INFLIGHT, OFFLINE_REQUESTS, OFFLINE_RUNNING,
                  OFFLINE_BUFFERED, ACTIVE_JOBS, JOBS, ROLE_CHANGES, SLO_PRESSURE, OFFLINE_TOKENS],
    "worker": [WORKER_RUNNING, WORKER_WAITING, WORKER_KV_USAGE, WORKER_TOKENS, WORKER_PHASE, ENGINE_STEP,
               WORKER_PREEMPTED, KV_EXPORTS, KV_EXPORT_BYTES, KV_LOADS, KV_PARKS, KV_PARK_SECONDS,
               KV_RESUMES],
    "kvtransfer": [KV_TRANSFERS, KV_TRANSFER_BYTES, KV_ACTIVE, KV_PARKED_BYTES, KV_PARKED],
}


def exposed_name(metric) -> str:
    """The name a scrape shows (counters get ``_total``)."""
    return metric._name + ("_total" if metric._type == "counter" else "")


def start_metrics_server(host: str, port: int) -> int | None:
    """Serves ``/metrics`` of this process on ``host:port`` (0: a free port). Returns the port, None when off
    (port < 0)."""
    if port < 0 or not ENABLED:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def asgi_app():
    """``/metrics`` for an ASGI app (the router's HTTP port)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=REGISTRY)


def render_markdown() -> str:
    rows = ["# Metrics", "",
            "Generated from `duopool/common/metrics.py` (`python -m duopool.common.metrics > docs/metrics.md`).",
            "Every service serves `/metrics` on `--metrics-port` (the topology gives each one; the router also",
            "on its OpenAI HTTP port). Histograms expose `_bucket`, `_sum`, `_count`.", "",
            "| metric | type | labels | service | what |", "|---|---|---|---|---|"]
    for m in METRICS:
        services = ", ".join(s for s, ms in SERVICE_OF.items() if m in ms)
        labels = ", ".join(f"`{x}`" for x in m._labelnames) or "—"
        what = m._documentation.replace("|", "\\|")
        rows.append(f"| `{exposed_name(m)}` | {m._type} | {labels} | {services} | {what} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
