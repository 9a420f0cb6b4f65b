"""`duopool bench park`: what parking a preempted decode's KV saves, on a live cluster with real vLLM workers.

For each context length: an offline request decodes on one worker (``decode-0``) and is preempted after
``--generate`` tokens (its KV parked in kvtransfer's pool); it then resumes on the *other* worker
(``prefill-0``) either from the parked KV (``park_key``: only the tail computed) or recomputing its whole
context (prompt + generated tokens), the two alternating, each on a prompt of its own (no prefix-cache
hit). Both resumes run as online-class requests, so the worker streams their first token at once (offline
tokens are sent in batches). Measured at the client, per resume: time to its first token (the resume latency: Take + load +
tail + one decode step, vs the whole prefill) and the total time of ``--resume-tokens`` tokens; the park:
Preempt call to the stream's end (engine stop, segment sealed, pooled); and the stall: an online request
streams on the preempting worker throughout, its median token gap before the preemption against its
largest gap while the KV is parked. Medians of ``--reps``, and
the ratio recompute / parked, from the same run.

Writes ``DIR/park.json``::

    {"model": .., "engine": "vllm", "contexts": {"512": {"parked_tokens": .., "park_ms": ..,
     "resume_ttft_ms": {"parked": .., "recompute": ..}, "resume_total_ms": {...}, "ttft_ratio": ..}, ...}}
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import statistics
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("park", help="resume latency of preempted decodes: parked KV vs recompute (real vLLM)")
    p.add_argument("--model", default="tiny", help="tiny (seeded test model, 2,048 context) or smollm2")
    p.add_argument("--contexts", default="", help="comma-separated prompt lengths (default: tiny 512,1024,1900; "
                                                 "otherwise 512,2048,4096)")
    p.add_argument("--reps", type=int, default=3, help="resumes per context and mode (median)")
    p.add_argument("--generate", type=int, default=16, help="tokens decoded before the preemption")
    p.add_argument("--resume-tokens", type=int, default=8, help="tokens each resume generates")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="directory for park.json")
    p.set_defaults(func=run)


def _contexts(args) -> list[int]:
    if args.contexts:
        return [int(x) for x in args.contexts.split(",") if x.strip()]
    return [512, 1024, 1900] if args.model == "tiny" else [512, 2048, 4096]


class _OnlineProbe:
    """An online request streaming on the same worker while the offline one is preempted and parked: the
    gaps between its tokens show whether the park held the engine's steps up."""

    def __init__(self, worker, rid: str) -> None:
        import threading

        from duopool.v1 import common_pb2, worker_pb2

        self.times: list[float] = []
        self.call = worker.Decode(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=list(range(1000, 1064)), max_tokens=1900,
            request_class=common_pb2.ONLINE), timeout=600)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for _ in self.call:
                self.times.append(time.perf_counter())
        except grpc.RpcError:
            pass

    def stop(self, t_preempt: float, t_end: float) -> dict:
        time.sleep(0.3)
        self.call.cancel()
        self.thread.join(10)
        gaps = [(b, (b - a) * 1e3) for a, b in zip(self.times, self.times[1:], strict=False)]
        before = [g for t, g in gaps if t < t_preempt]
        around = [g for t, g in gaps if t_preempt <= t <= t_end + 0.2]
        return {"itl_median_ms": statistics.median(before) if before else float("nan"),
                "itl_max_at_park_ms": max(around) if around else float("nan")}


def _preempted(worker, rid: str, prompt: list[int], generate: int, max_tokens: int):
    """Decodes offline, preempts after ``generate`` tokens while an online request streams on the same
    worker: (tokens, last message, park ms, online token gaps)."""
    from duopool.v1 import common_pb2, worker_pb2

    probe = _OnlineProbe(worker, rid + "-online")
    got, end, t_preempt = [], None, None
    for d in worker.Decode(worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens,
                                                    request_class=common_pb2.OFFLINE), timeout=600):
        got += d.token_ids
        if len(got) >= generate and t_preempt is None and not d.finished:
            t_preempt = time.perf_counter()
            worker.Preempt(worker_pb2.PreemptRequest(request_class=common_pb2.OFFLINE, request_ids=[rid],
                                                     reason="bench park"), timeout=60)
        if d.finished:
            end = d
    t_end = time.perf_counter()
    park_ms = (t_end - t_preempt) * 1e3 if t_preempt else float("nan")
    return got, end, park_ms, probe.stop(t_preempt or t_end, t_end)


def _resume(worker, rid: str, prompt: list[int], got: list[int], tokens: int, park_key: str):
    from duopool.v1 import common_pb2, worker_pb2

    t0 = time.perf_counter()
    ttft, cached, failure = None, 0, ""
    for m in worker.Decode(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, generated_token_ids=got, max_tokens=tokens,
            request_class=common_pb2.ONLINE, park_key=park_key),
            timeout=600):
        if ttft is None:
            ttft = (time.perf_counter() - t0) * 1e3
            cached, failure = m.cached_tokens, m.park_failure
    return ttft, (time.perf_counter() - t0) * 1e3, cached, failure


def _measure(cluster, contexts: list[int], args) -> dict:
    import grpc

    from duopool.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2_grpc

    rng = random.Random(7)
    out: dict[str, dict] = {}
    with cluster.internal_channel("decode-0") as dch, cluster.internal_channel("prefill-0") as pch, \
            cluster.internal_channel("kvtransfer") as kch:
        src, dst = worker_pb2_grpc.WorkerStub(dch), worker_pb2_grpc.WorkerStub(pch)
        kv = kvtransfer_pb2_grpc.KvTransferStub(kch)
        for n in contexts:
            rows: dict[str, list] = {"parked": [], "recompute": []}
            for rep in range(args.reps):
                for mode in ("parked", "recompute") if rep % 2 == 0 else ("recompute", "parked"):
                    rid = f"bench-park-{n}-{rep}-{mode}"
                    prompt = [rng.randrange(100, 40000) for _ in range(n)]
                    got, end, park_ms, probe = _preempted(src, rid, prompt, args.generate,
                                                          args.generate + args.resume_tokens + 64)
                    if end is None or end.finish_reason != "preempted" or not end.parked_key:
                        why = end.park_failure if end is not None else "no end"
                        raise RuntimeError(f"context {n}: the preempted decode was not parked ({why})")
                    key = end.parked_key if mode == "parked" else ""
                    if not key:  # the recompute control: the parked copy is not used
                        try:
                            kv.Drop(kvtransfer_pb2.DropRequest(key=end.parked_key), timeout=10)
                        except grpc.RpcError:
                            pass
                    ttft, total, cached, failure = _resume(dst, f"{rid}-r", prompt, got, args.resume_tokens, key)
                    if mode == "parked" and cached <= 0:
                        raise RuntimeError(f"context {n}: the parked resume loaded nothing ({failure})")
                    rows[mode].append({"ttft_ms": ttft, "total_ms": total, "cached": cached, "park_ms": park_ms,
                                       "parked_tokens": end.parked_tokens, **probe})
                    print(f"  context {n} rep {rep} {mode:>9}: park {park_ms:7.1f} ms (online ITL median "
                          f"{probe['itl_median_ms']:.1f}, max at the park {probe['itl_max_at_park_ms']:.1f} ms), "
                          f"resume first token {ttft:8.1f} ms (cached {cached}), {args.resume_tokens} tokens "
                          f"{total:8.1f} ms", file=sys.stderr, flush=True)

            def med(mode, key, rows=rows):
                return statistics.median(r[key] for r in rows[mode])

            out[str(n)] = {
                "parked_tokens": int(med("parked", "parked_tokens")),
                "park_ms": statistics.median(r["park_ms"] for m in rows for r in rows[m]),
                # an online request streaming on the preempting worker: its median token gap before the
                # preemption, and its largest gap while the KV was parked (the stall the park caused, if any)
                "online_itl_median_ms": statistics.median(r["itl_median_ms"] for m in rows for r in rows[m]),
                "online_itl_max_at_park_ms": statistics.median(r["itl_max_at_park_ms"] for m in rows
                                                               for r in rows[m]),
                "resume_ttft_ms": {"parked": med("parked", "ttft_ms"), "recompute": med("recompute", "ttft_ms")},
                "resume_total_ms": {"parked": med("parked", "total_ms"), "recompute": med("recompute", "total_ms")},
                "ttft_ratio": med("recompute", "ttft_ms") / med("parked", "ttft_ms"),
                "runs": rows,
            }
    return out


def run(args: argparse.Namespace) -> int:
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    contexts = _contexts(args)
    max_len = max(2048, max(contexts) + args.generate + args.resume_tokens + 72)  # the decode asks +64
    if args.model == "tiny" and max_len > 2048:
        print(f"error: --contexts: the tiny model's context is 2,048 tokens (asked {max(contexts)})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(Topology(engine="vllm", model=args.model, prefill_workers=1, decode_workers=1,
                                    max_model_len=max_len), args.out / "run", router_port=0,
                           extra_env={"DUOPOOL_DTYPE": "float32", "OTEL_TRACES_EXPORTER": "none"})
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    print(f"bench park: {args.model} on real vLLM (1 prefill + 1 decode worker), contexts {contexts}, "
          f"{args.reps} resumes per context and mode", file=sys.stderr)
    with cluster:
        results = _measure(cluster, contexts, args)
    summary = {"model": args.model, "engine": "vllm", "host": platform.node(), "reps": args.reps,
               "generated_before_preemption": args.generate, "resume_tokens": args.resume_tokens,
               "contexts": results}
    (args.out / "park.json").write_text(json.dumps(summary, indent=2))
    print(f"{'context':>8} {'parked':>7} {'park ms':>8} {'online ITL':>11} {'at park':>8} "
          f"{'resume TTFT parked':>19} {'recompute':>10} {'ratio':>6}")
    for n, r in results.items():
        print(f"{n:>8} {r['parked_tokens']:>7} {r['park_ms']:>8.1f} {r['online_itl_median_ms']:>11.1f} "
              f"{r['online_itl_max_at_park_ms']:>8.1f} {r['resume_ttft_ms']['parked']:>19.1f} "
              f"{r['resume_ttft_ms']['recompute']:>10.1f} {r['ttft_ratio']:>5.2f}x")
    print(f"wrote {args.out / 'park.json'}")
    return 0
