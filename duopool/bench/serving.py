"""`duopool bench serving`: the serving layers' overhead, and the cluster's start time and memory.

1. Starts a local cluster (`duopool up`'s launcher) with the vLLM engine and times it to its first answer.
2. Sends ``--requests`` prompts one at a time through the router (prefill worker → KV → decode worker),
   ``--max-tokens`` each, measuring TTFT and decode tokens/s at the client.
3. Runs the same engine (``VllmEngine``, same settings) directly in one process on the same prompts.
4. Prints both and their ratios; peak RSS of the whole cluster (every process of every service, engines
   included, plus Redis) sampled during the run. Writes ``DIR/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "Why is the sky blue?",
    "Explain how a refrigerator works.",
    "What causes the seasons on Earth?",
    "Describe the water cycle in a few sentences.",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Why do leaves change colour in autumn?",
    "How does a rainbow form?",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serving", help="TTFT and tokens/s through the router vs the engine called directly")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny or a checkpoint dir [smollm2]")
    p.add_argument("--requests", type=int, default=5, help="sequential requests per side [5]")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer [128]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench"), help="output dir")
    p.set_defaults(func=run)


def _summarise(samples: list[dict]) -> dict:
    ttft = [s["ttft_ms"] for s in samples]
    tps = [s["decode_tok_s"] for s in samples]
    return {"requests": len(samples), "ttft_ms_median": statistics.median(ttft),
            "decode_tok_s_median": statistics.median(tps),
            "output_tokens_median": statistics.median(s["tokens"] for s in samples), "samples": samples}


class RssSampler(threading.Thread):
    """Peak summed RSS of a set of process trees (sampled every 0.5 s)."""

    def __init__(self, pids_fn) -> None:
        super().__init__(daemon=True)
        self.pids_fn = pids_fn
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            total = 0
            for pid in self.pids_fn():
                try:
                    proc = psutil.Process(pid)
                    procs = [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            self.peak = max(self.peak, total)
            self._halt.wait(0.5)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def through_router(model: str, n: int, max_tokens: int, run_dir: pathlib.Path) -> dict:
    from duopool.cli.generate import stream
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology
    from duopool.v1 import common_pb2, router_pb2

    cluster = LocalCluster(Topology(engine="vllm", model=model), run_dir, router_port=0)
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    t0 = time.monotonic()
    sampler = RssSampler(lambda: [p.popen.pid for p in cluster.procs.values()]
                         + ([cluster.redis._proc.pid] if cluster.redis and cluster.redis._proc else []))
    sampler.start()
    try:
        cluster.start()
        up_s = time.monotonic() - t0
        samples = []
        for i in range(n + 1):
            req = router_pb2.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                             request_class=common_pb2.ONLINE, chat=True,
                                             sampling=common_pb2.SamplingParams(temperature=0))
            sent = time.perf_counter()

            class Sink:
                def write(self, _t):  # noqa: D401 - file-like
                    return None

                def flush(self):
                    return None

            s = stream(cluster.router_address, req, out=Sink())
            total_ms = (time.perf_counter() - sent) * 1e3
            if i == 0:
                first_answer_s = time.monotonic() - t0
                continue  # warm-up
            decode_ms = s.token_times_ms[-1] - s.token_times_ms[0]
            samples.append({"ttft_ms": s.ttft_ms, "tokens": s.output_tokens, "total_ms": total_ms,
                            "decode_tok_s": (s.output_tokens - 1) / (decode_ms / 1e3) if decode_ms > 0 else 0.0,
                            "kv_transferred_tokens": s.kv_transferred_tokens,
                            "decode_cached_tokens": s.decode_cached_tokens})
    finally:
        cluster.stop()
        sampler.stop()
    return {"up_s": up_s, "first_answer_s": first_answer_s, "peak_rss_mb": sampler.peak / 2**20,
            **_summarise(samples)}


def direct(model: str, n: int, max_tokens: int) -> dict:
    """The same engine class and settings, called in-process (its own subprocess: vLLM needs __main__)."""
    out = subprocess.run([sys.executable, "-m", "duopool.bench.serving", "--direct", model, str(n), str(max_tokens)],
                         capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("DIRECT ")), None)
    if line is None:
        raise RuntimeError(f"direct run failed:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("DIRECT "))


async def _direct_main(model: str, n: int, max_tokens: int) -> dict:
    import tempfile

    from duopool.worker.engines.base import EngineRequest, Sampling
    from duopool.worker.engines.vllm import VllmEngine

    engine = VllmEngine(model, 2048, tempfile.mkdtemp(prefix="duopool-kv-"), threads=1)
    await engine.start()
    samples = []
    try:
        for i in range(n + 1):
            ids = engine.tokenize(PROMPTS[i % len(PROMPTS)], chat=True)
            sent = time.perf_counter()
            times = []
            async for o in engine.generate(EngineRequest(f"direct-{i}", tuple(ids), max_tokens, Sampling())):
                times.extend([(time.perf_counter() - sent) * 1e3] * len(o.token_ids))
            if i == 0:
                continue
            decode_ms = times[-1] - times[0]
            samples.append({"ttft_ms": times[0], "tokens": len(times), "total_ms": times[-1],
                            "decode_tok_s": (len(times) - 1) / (decode_ms / 1e3) if decode_ms > 0 else 0.0})
    finally:
        await engine.stop()
    return _summarise(samples)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"bench serving: model {args.model}, {args.requests} requests x {args.max_tokens} tokens "
          "(plus one warm-up each side)", file=sys.stderr)
    routed = through_router(args.model, args.requests, args.max_tokens, args.out / "run")
    print("  direct engine run...", file=sys.stderr, flush=True)
    base = direct(args.model, args.requests, args.max_tokens)
    result = {
        "model": args.model, "max_tokens": args.max_tokens, "router": routed, "direct": base,
        "ttft_ratio_router_over_direct": routed["ttft_ms_median"] / base["ttft_ms_median"],
        "decode_tok_s_ratio_router_over_direct": routed["decode_tok_s_median"] / base["decode_tok_s_median"],
    }
    (args.out / "serving.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'':<22}{'router (P/D split)':>20}{'vLLM direct':>14}{'ratio':>8}")
    print(f"{'TTFT median ms':<22}{routed['ttft_ms_median']:>20.1f}{base['ttft_ms_median']:>14.1f}"
          f"{result['ttft_ratio_router_over_direct']:>8.2f}")
    print(f"{'decode tok/s median':<22}{routed['decode_tok_s_median']:>20.1f}{base['decode_tok_s_median']:>14.1f}"
          f"{result['decode_tok_s_ratio_router_over_direct']:>8.2f}")
    print(f"cluster: up in {routed['up_s']:.1f}s, first answer {routed['first_answer_s']:.1f}s after start, "
          f"peak RSS {routed['peak_rss_mb']:.0f} MiB (all services, engines and Redis)")
    print(f"wrote {args.out / 'serving.json'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--direct":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        res = asyncio.run(_direct_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        print("DIRECT " + json.dumps(res), flush=True)
