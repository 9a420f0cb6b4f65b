"""`duopool up`: a local cluster (Redis, scheduler, kvtransfer, workers, router) in one command."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up", help="start a local cluster and serve until Ctrl-C",
        description="Start Redis (unless --redis-url/REDIS_URL), the scheduler, kvtransfer, prefill and "
        "decode workers and the router on this machine, print the router address, optionally send a "
        "prompt, and serve until Ctrl-C (or SIGTERM), then stop everything.",
    )
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm",
                   help="vllm (real tokens) or sim (SIMULATED timing and tokens) [vllm]")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M-Instruct, the demo), tiny (seeded random Llama), or a "
                   "checkpoint dir [smollm2]")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers [1; 0 with --mixed]")
    p.add_argument("--decode", type=int, default=None, help="decode workers [1; 0 with --mixed]")
    p.add_argument("--mixed", type=int, default=0,
                   help="mixed workers: each prefills and decodes its own requests, no KV moved (on a host too small "
                        "for a prefill/decode pair one mixed engine serves faster: docs/fast-path.md) [0]")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port (0: a free one) [50051]")
    p.add_argument("--http-port", type=int, default=None,
                   help="router OpenAI HTTP port (0: a free one) [8000 with the default --port, else free]")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""),
                   help="use this Redis instead of starting one [env REDIS_URL]")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per engine; 0: one per core of the engine's share when pinned, else 1 [0]")
    p.add_argument("--pin-cpus", choices=("on", "off"), default="on",
                   help="on: each vLLM engine runs on its own share of this machine's cores (said at start) [on]")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length [2048]")
    p.add_argument("--policy", default="least-loaded", help="placement policy [least-loaded]")
    p.add_argument("--run-dir", type=pathlib.Path, default=None,
                   help="where service logs go [~/.cache/duopool/runs/<time>]")
    p.add_argument("--preempt-trigger", choices=("slo", "online"), default=None,
                   help="when offline work is preempted (docs/colocation.md) [online for vllm engines, which share "
                        "this machine's cores; slo for sim]")
    p.add_argument("--kv-root", type=pathlib.Path, default=pathlib.Path(os.environ.get("DUOPOOL_KV_ROOT", "/dev/shm")),
                   help="tmpfs under which the cluster keeps its KV segments; one mounted with huge=within_size "
                        "makes same-host KV copies ~1.7x faster (docs/kv-transfer.md) [DUOPOOL_KV_ROOT or /dev/shm]")
    p.add_argument("--prompt", default=None, help="send this prompt once the cluster is up and stream the answer")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens for --prompt [128]")
    p.add_argument("--exit", action="store_true", help="stop the cluster after --prompt instead of serving")
    p.add_argument("--no-trace-sink", action="store_true",
                   help="do not keep traces locally (by default, unless OTEL_EXPORTER_OTLP_ENDPOINT names a "
                        "collector, the services export spans to a receiver in this process that writes "
                        "RUN_DIR/traces.jsonl, read by `duopool trace ID`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from duopool.launcher import LocalCluster
    from duopool.models import cache_dir
    from duopool.topology import Topology

    if args.mixed < 0 or (args.prefill or 0) < 0 or (args.decode or 0) < 0:
        print("duopool up: --prefill, --decode and --mixed must be >= 0", file=sys.stderr)
        return 2
    prefill = args.prefill if args.prefill is not None else (0 if args.mixed else 1)
    decode = args.decode if args.decode is not None else (0 if args.mixed else 1)
    if not args.mixed and not (prefill and decode):
        print("duopool up: a cluster needs a prefill and a decode worker, or --mixed N", file=sys.stderr)
        return 2
    topo = Topology(engine=args.engine, model=args.model, prefill_workers=prefill, decode_workers=decode,
                    mixed_workers=args.mixed, threads=args.threads, max_model_len=args.max_model_len,
                    policy=args.policy, preempt_trigger=args.preempt_trigger or "")
    run_dir = args.run_dir or cache_dir() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cluster = LocalCluster(topo, run_dir, redis_url=args.redis_url, router_port=args.port,
                           http_port=args.http_port, kv_root=args.kv_root, pin_cpus=args.pin_cpus == "on")
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    sink = None
    if not args.no_trace_sink and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from duopool.common.otlp_sink import OtlpSink

        run_dir.mkdir(parents=True, exist_ok=True)
        cluster.trace_file = run_dir / "traces.jsonl"
        sink = OtlpSink(jsonl_path=str(cluster.trace_file)).start()
        cluster.extra_env.update(OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint, OTEL_TRACES_EXPORTER="otlp",
                                 OTEL_BSP_SCHEDULE_DELAY="500")
    label = "SIMULATED engine" if args.engine == "sim" else f"vLLM, model {args.model}"
    print(f"duopool: starting a local cluster ({label}; logs in {run_dir})", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        cluster.write_state(state_file())
        up_s = time.monotonic() - t0
        print(f"duopool is up in {up_s:.0f}s: router at {cluster.router_address} (gRPC), "
              f"OpenAI base URL {cluster.http_url}\n"
              f"  try: duopool generate --router {cluster.router_address} \"Why is the sky blue?\"\n"
              f"   or: curl {cluster.http_url}/models\n"
              + (f"  traces: duopool trace TRACE_ID (kept in {cluster.trace_file})\n" if sink else "")
              + f"  metrics: {cluster.metrics_urls().get('router')} (and each service's, in {state_file()})",
              file=sys.stderr, flush=True)
        if args.prompt:
            from duopool.cli.generate import stream
            from duopool.v1 import common_pb2, router_pb2

            req = router_pb2.GenerateRequest(text=args.prompt, max_tokens=args.max_tokens,
                                             request_class=common_pb2.ONLINE, chat=True)
            print(f"\n> {args.prompt}", flush=True)
            s = stream(cluster.router_address, req)
            print(f"\n\n[{s.output_tokens} tokens; TTFT {s.ttft_ms:.0f} ms; prefill {s.prefill_worker} -> decode "
                  f"{s.decode_worker or '-'}; KV {s.kv_transferred_tokens} tokens moved, "
                  f"{s.decode_cached_tokens} reused by decode; first answer "
                  f"{time.monotonic() - t0:.0f}s after start]", file=sys.stderr, flush=True)
        if args.exit:
            return 0
        print("serving; Ctrl-C to stop (a service that dies is restarted)", file=sys.stderr, flush=True)
        while True:
            try:
                for line in cluster.supervise():
                    print(f"duopool: {line}", file=sys.stderr, flush=True)
            except RuntimeError as exc:
                print(f"duopool: {exc}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"duopool up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("duopool: stopping...", file=sys.stderr, flush=True)
        _forget_state(cluster)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
        if sink is not None:
            sink.stop()
        print("duopool: stopped", file=sys.stderr, flush=True)


def state_file():
    """Where `duopool up` says how to reach the cluster it runs (CLI commands read it)."""
    from duopool.models import cache_dir

    return cache_dir() / "current-cluster.json"


def read_state() -> dict:
    import json

    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def _forget_state(cluster) -> None:
    import os

    state = read_state()
    if state.get("pid") == os.getpid():
        try:
            state_file().unlink()
        except OSError:
            pass
