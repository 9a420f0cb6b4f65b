"""``duopool bench telemetry``: what metrics and tracing cost the serving path, measured in one run.

Local clusters with SIMULATED workers (sped up, so the serving layers — router, scheduler, gRPC, Redis — are
what is timed, not the simulated model) run side by side:

* **on**: every service updates its Prometheus metrics and serves ``/metrics`` (scraped every second during
  the run), and traces every request (our spans inside the gRPC ones) to an OTLP receiver in this process;
* **sampled**: the same, with head sampling (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``,
  ``OTEL_TRACES_SAMPLER_ARG`` = ``--sample``): the router decides per request, every other service follows;
* **metrics**: metrics on, ``DUOPOOL_TRACING=0`` (no gRPC instrumentation, no spans);
* **off**: ``DUOPOOL_METRICS=0`` (metric updates are no-ops, no ``/metrics``) and ``DUOPOOL_TRACING=0``.

The same load (``--requests`` Generate calls, ``--concurrency`` at a time) goes to each in rotating rounds
so drift of a noisy machine hits all; the medians over rounds and their ratios to **off** are printed and
written to ``DIR/telemetry.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("telemetry", help="serving throughput and latency with metrics and tracing on vs off")
    p.add_argument("--requests", type=int, default=200, help="Generate calls per round [200]")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at once [8]")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer [16]")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating [3]")
    p.add_argument("--sim-speedup", type=float, default=50.0,
                   help="divide the simulated step times by this (so the serving layers dominate) [50]")
    p.add_argument("--sample", type=float, default=0.1,
                   help="trace sampling ratio of the `sampled` side [0.1]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench"), help="output dir")
    p.set_defaults(func=main)


def _round(address: str, n: int, concurrency: int, max_tokens: int) -> dict:
    import grpc

    from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc

    ttft, e2e = [], []
    lock = threading.Lock()
    with grpc.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        def one(i: int) -> None:
            t0 = time.perf_counter()
            msgs = list(stub.Generate(router_pb2.GenerateRequest(
                text=f"telemetry overhead probe {i} " * 8, max_tokens=max_tokens,
                request_class=common_pb2.ONLINE), timeout=60))
            s = msgs[-1].summary
            with lock:
                ttft.append(s.ttft_ms)
                e2e.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    return {"req_s": n / wall, "ttft_ms_p50": statistics.median(ttft), "e2e_ms_p50": statistics.median(e2e),
            "e2e_ms_p99": sorted(e2e)[int(0.99 * (len(e2e) - 1))]}


def _scraper(urls: list[str], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for u in urls:
            try:
                urllib.request.urlopen(u, timeout=2).read()
            except OSError:
                pass


def main(a: argparse.Namespace) -> int:
    from duopool.common.otlp_sink import OtlpSink
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    a.out.mkdir(parents=True, exist_ok=True)
    sink = OtlpSink().start()
    base = {"DUOPOOL_SIM_SPEEDUP": str(a.sim_speedup)}
    traced = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_TRACES_EXPORTER": "otlp"}
    envs = {"on": traced,
            "sampled": {**traced, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": str(a.sample)},
            "metrics": {**base, "DUOPOOL_TRACING": "0", "OTEL_TRACES_EXPORTER": "none"},
            "off": {**base, "DUOPOOL_METRICS": "0", "DUOPOOL_TRACING": "0", "OTEL_TRACES_EXPORTER": "none"}}
    clusters = {}
    stop = threading.Event()
    try:
        for side, env in envs.items():
            c = LocalCluster(Topology(engine="sim"), pathlib.Path(tempfile.mkdtemp(prefix=f"duopool-tel-{side}-")),
                             router_port=0, http_port=0, extra_env=env)
            c.log = lambda m: None
            c.start(timeout=120)
            clusters[side] = c
            print(f"{side}: cluster up (router {c.router_address})", file=sys.stderr, flush=True)
        urls = [u for side in ("on", "sampled", "metrics") for u in clusters[side].metrics_urls().values()]
        scraper = threading.Thread(target=_scraper, args=(urls, stop), daemon=True)
        scraper.start()
        for c in clusters.values():  # warm up: channels, first placements
            _round(c.router_address, 20, a.concurrency, a.max_tokens)
        sides = list(envs)
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(a.rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate who goes first
                res = _round(clusters[side].router_address, a.requests, a.concurrency, a.max_tokens)
                rounds[side].append(res)
                print(f"round {r + 1} {side:>7}: {res['req_s']:.1f} req/s, TTFT p50 {res['ttft_ms_p50']:.1f} ms, "
                      f"e2e p50 {res['e2e_ms_p50']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for c in clusters.values():
            c.stop()
        spans = len(sink.spans())
        sink.stop()
    med = {side: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for side, rs in rounds.items()}
    over_off = {side: {k: med[side][k] / med["off"][k] for k in med["off"]} for side in med if side != "off"}
    out = {"requests_per_round": a.requests, "concurrency": a.concurrency, "max_tokens": a.max_tokens,
           "sample_ratio": a.sample, "rounds": rounds, "median": med, "on_over_off": over_off["on"],
           "over_off": over_off, "spans_received": spans, "engine": "SIMULATED", "sim_speedup": a.sim_speedup}
    (a.out / "telemetry.json").write_text(json.dumps(out, indent=2))
    print(f"medians of {a.rounds} rounds, SIMULATED workers; ratio to off (metrics and tracing off):")
    for side in sides:
        m, r = med[side], over_off.get(side)
        rel = (f"  ({r['req_s']:.3f}x req/s, {r['ttft_ms_p50']:.3f}x TTFT, {r['e2e_ms_p50']:.3f}x e2e)"
               if r else "")
        label = f"sampled {a.sample:g}" if side == "sampled" else side
        print(f"  {label:>12}: {m['req_s']:6.1f} req/s, TTFT p50 {m['ttft_ms_p50']:5.1f} ms, "
              f"e2e p50 {m['e2e_ms_p50']:5.1f} ms{rel}")
    print(f"  {spans} spans received; wrote {a.out / 'telemetry.json'}")
    return 0
