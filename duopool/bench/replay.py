"""`duopool bench replay`: replay a real trace against a live local cluster, online + offline together.

Online requests come from a trace (arrival times and lengths, time-scaled), sent through the router at
their arrival times with their SLOs; an offline backlog (lengths) is submitted as one batch job at the
start. Reports the simulator's ``summary.json`` fields (so live and simulated runs compare directly) plus
``preemption_ms.{p50,p99}`` and ``offline.lost`` / ``offline.duplicated``:

    duopool bench replay --online ../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --offline ../shared/traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv \\
        --engine sim --prefill 4 --decode 4 --duration 60 --out out/replay

Prompts are synthetic token ids of the trace's lengths (clipped to ``--max-prompt`` / ``--max-output`` so
they fit the served context); with ``--engine sim`` the workers are SIMULATED (roofline timing of the
imitated GPU and model), with ``--engine vllm`` they run real tokens (use ``--model tiny`` here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np

from duopool.traces import load_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay an online trace + offline backlog against a live local cluster")
    p.add_argument("--online", type=pathlib.Path, required=True, help="online trace (Azure CSV or Mooncake JSONL)")
    p.add_argument("--offline", type=pathlib.Path, default=None, help="offline backlog (arXiv CSV or Azure CSV)")
    p.add_argument("--offline-requests", type=int, default=200, help="offline backlog size [200]")
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim", help="worker engine [sim]")
    p.add_argument("--model", default="tiny", help="vllm engine model [tiny]")
    p.add_argument("--prefill", type=int, default=4, help="prefill workers [4]")
    p.add_argument("--decode", type=int, default=4, help="decode workers [4]")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of (scaled) trace to replay [60]")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrival-rate multiplier [1.0]")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="TTFT SLO [1000]")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT SLO [100]")
    p.add_argument("--max-prompt", type=int, default=1024, help="clip prompt lengths [1024]")
    p.add_argument("--max-output", type=int, default=256, help="clip output lengths [256]")
    p.add_argument("--policy", default="least-loaded", help="scheduler placement policy [least-loaded]")
    p.add_argument("--no-preemption", action="store_true", help="never preempt offline work for online")
    p.add_argument("--preempt-trigger", choices=("slo", "online"), default=None,
                   help="slo: preempt when a worker's online latency nears the SLO or online work queues there; "
                        "online: on any online arrival (docs/colocation.md) [online for vllm, slo for sim]")
    p.add_argument("--park-kv", choices=("on", "off"), default="on",
                   help="preempted offline decodes park their KV in kvtransfer's pool (on) or recompute (off) [on]")
    p.add_argument("--offline-moves", choices=("on", "off"), default="on",
                   help="research policies pull running offline decodes, their KV parked and moved (on), or only "
                        "at a first token (off) [on]")
    p.add_argument("--parked-resumes", choices=("auto", "pull", "admit"), default="auto",
                   help="research policies: a preempted decode with parked KV resumes where a step plan pulls it "
                        "(pull) or is admitted like new offline work (admit); auto: pull for online-priority "
                        "[auto]")
    p.add_argument("--engine-plans", choices=("on", "off"), default="on",
                   help="the engines form their steps by the policy's step plan where they can (sim: every "
                        "research policy; vllm: hygen) and stop offline work at their step boundary (on), or the "
                        "scheduler plans on its mirror and preempts by Worker.Preempt RPCs (off) [on]")
    p.add_argument("--hygen-budget-frac", type=float, default=0.8,
                   help="vllm engines running hygen's step plans: the step budget as a share of the TPOT SLO [0.8]")
    p.add_argument("--pin-cpus", choices=("on", "off"), default="on",
                   help="vllm engines: each pinned to its own cores where there are enough, as `duopool up` does "
                        "(on), or sharing all cores (off) [on]")
    p.add_argument("--offline-per-worker", type=int, default=4, help="offline requests per idle worker [4]")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="after the window, wait this long for the offline job to finish (lost/duplicated check)")
    p.add_argument("--sim-speedup", type=float, default=1.0, help="sim engine: divide step times by this [1]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/replay"))
    p.set_defaults(func=run)


def load_online(path: pathlib.Path, duration: float, rate_scale: float, max_prompt: int,
                max_output: int) -> list[tuple[float, int, int]]:
    """(arrival s from start, prompt tokens, output tokens) of the requests arriving within ``duration``
    after time-scaling, lengths clipped (``duopool.traces`` reads the file)."""
    t = load_trace(path).scaled(rate_scale).window(0.0, duration).clipped(max_prompt, max_output)
    return list(zip(t.arrival_s.tolist(), t.input_tokens.tolist(), t.output_tokens.tolist(), strict=True))


def load_offline(path: pathlib.Path | None, n: int, max_prompt: int, max_output: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of the first ``n`` requests of a backlog (arXiv or any trace), clipped."""
    if path is None:
        return []
    t = load_trace(path).head(n).clipped(max_prompt, max_output)
    return list(zip(t.input_tokens.tolist(), t.output_tokens.tolist(), strict=True))


def token_ids(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 30000, size=n).tolist()


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


async def _online_request(stub, i, arrival, prompt_len, out_len, args, t_start, results):
    from duopool.v1 import common_pb2, router_pb2

    delay = t_start + arrival - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    req = router_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=token_ids(i, prompt_len)), max_tokens=out_len,
        request_class=common_pb2.ONLINE, slo=common_pb2.Slo(ttft_ms=args.ttft_slo_ms, tpot_ms=args.tpot_slo_ms),
        sampling=common_pb2.SamplingParams(temperature=0), request_id=f"online-{i}")
    sent = time.perf_counter()
    times = []
    try:
        async for msg in stub.Generate(req, timeout=300):
            if msg.HasField("chunk"):
                times.extend([(time.perf_counter() - sent) * 1e3] * len(msg.chunk.token_ids))
    except Exception as exc:  # noqa: BLE001 - a failed request counts as an SLO miss
        results.append({"ok": False, "error": str(exc)[:200]})
        return
    ttft = times[0]
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    results.append({"ok": True, "ttft_ms": ttft, "tpot_ms": tpot, "tokens": len(times)})


JOB_ITEMS = 4000  # offline requests per batch job the replay submits


class _Jobs:
    """The replay's offline backlog as one or more batch jobs, read as one: status summed (DONE when all
    are), result indices in backlog order."""

    def __init__(self, stub, pb) -> None:
        self.stub, self.pb = stub, pb
        self.ids: list[tuple[str, int]] = []  # (job id, index of its first request in the backlog)

    def add(self, job_id: str, start: int) -> None:
        self.ids.append((job_id, start))

    async def status(self):
        sts = [await self.stub.GetBatch(self.pb.GetBatchRequest(job_id=j), timeout=5) for j, _ in self.ids]
        done = all(s.state == self.pb.DONE for s in sts)
        return SimpleNamespace(state=self.pb.DONE if done else self.pb.RUNNING, done=sum(s.done for s in sts),
                               total=sum(s.total for s in sts), output_tokens=sum(s.output_tokens for s in sts))

    async def result_indices(self) -> list[int]:
        out = []
        for j, start in self.ids:
            out += [start + r.index async for r in self.stub.GetBatchResults(self.pb.GetBatchRequest(job_id=j),
                                                                              timeout=120)]
        return out


async def _engine_plans(cluster) -> dict[str, dict]:
    """Each worker's step-plan counters (``Worker.Stats``), for the engines that run plans and report them."""
    from google.protobuf.json_format import MessageToDict

    from duopool.topology import instance_names
    from duopool.v1 import worker_pb2, worker_pb2_grpc

    out = {}
    for name in instance_names(cluster.topology):
        if name in ("scheduler", "kvtransfer", "router"):
            continue
        async with cluster.aio_internal_channel(name) as ch:
            try:
                st = await worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - a worker that died: reported as such
                out[name] = {"error": str(exc)[:200]}
                continue
        if st.HasField("step_plans"):
            out[name] = MessageToDict(st.step_plans, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    return out


def _cpu_now(cluster) -> dict[str, float]:
    """CPU seconds so far of every cluster process (with its children: a vLLM worker's engine core) and of
    this process (the load generator)."""
    from duopool.bench.control_plane import cpu_seconds

    out = {name: cpu_seconds(p.popen.pid) for name, p in cluster.procs.items()}
    out["replay-client"] = time.process_time()
    return out


def _cpu_window(before: dict[str, float], after: dict[str, float], window_s: float) -> dict:
    """Where the host's CPU went in the window: seconds and share of one core per process, the total as a
    share of the host's cores (near 1.0: the host is saturated and simulated engines fall behind their
    modeled step times)."""
    used = sorted(((n, round(after[n] - before.get(n, 0.0), 2)) for n in after), key=lambda kv: -kv[1])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"seconds": dict(used), "share_of_a_core": {n: round(v / window_s, 3) for n, v in used},
            "total_share_of_host": round(sum(v for _, v in used) / window_s / cores, 3), "cores": cores}


async def _replay(args, cluster, online, offline) -> dict:
    import grpc

    from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

    async with grpc.aio.insecure_channel(cluster.router_address) as ch, \
            cluster.aio_internal_channel("scheduler") as sch:
        stub = router_pb2_grpc.RouterStub(ch)
        sched = scheduler_pb2_grpc.SchedulerStub(sch)
        jobs = _Jobs(stub, router_pb2)
        tokens_before = (await sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)).offline_tokens
        t_submit = time.monotonic()
        if offline:  # in jobs of at most JOB_ITEMS requests (one job's message must stay under gRPC's limit)
            stamp = int(time.time())
            for k, start in enumerate(range(0, len(offline), JOB_ITEMS)):
                items = [router_pb2.BatchItem(custom_id=f"off-{i}", max_tokens=o,
                                              token_ids=common_pb2.TokenIds(ids=token_ids(10**6 + i, p)))
                         for i, (p, o) in enumerate(offline[start:start + JOB_ITEMS], start)]
                job = await stub.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items,
                                                                           job_id=f"replay-{stamp}-{k}"), timeout=120)
                jobs.add(job.job_id, start)
        has_jobs = bool(jobs.ids)
        tokens0 = (await sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)).offline_tokens
        t_start = time.monotonic()
        cpu0 = _cpu_now(cluster)
        submit_s = t_start - t_submit  # offline work may start while later jobs are still being submitted
        results: list[dict] = []
        tasks = [asyncio.create_task(_online_request(stub, i, a, p, o, args, t_start, results))
                 for i, (a, p, o) in enumerate(online)]
        last_print = last_poll = 0.0
        drain_s = None  # when the whole backlog was done (the offline throughput is capacity only before it)
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.5)
            now = time.monotonic() - t_start
            if has_jobs and drain_s is None and now - last_poll >= 1:
                last_poll = now
                st = await jobs.status()
                if st.state == router_pb2.DONE or (st.total and st.done >= st.total):
                    drain_s = now
            if now - last_print >= 5:
                last_print = now
                st = await jobs.status() if has_jobs else None
                print(f"\r  t={now:5.0f}s online {len(results)}/{len(online)} done"
                      + (f" | offline {st.done}/{st.total}, {st.output_tokens} tokens" if st else ""),
                      end="", file=sys.stderr, flush=True)
        window_s = time.monotonic() - t_start
        cpu = _cpu_window(cpu0, _cpu_now(cluster), window_s)
        st_window = await jobs.status() if has_jobs else None
        stats = await sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        generated = stats.offline_tokens - tokens0  # tokens produced in the window, finished requests or not
        generated_total = stats.offline_tokens - tokens_before  # ... and while the jobs were being submitted
        decisions_window = dict(sorted(stats.decisions.items()))
        print(file=sys.stderr)
        lost = duplicated = 0
        drained = True
        if has_jobs:
            deadline = time.monotonic() + args.drain_timeout
            st = st_window
            while st.state != router_pb2.DONE and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                st = await jobs.status()
            drained = st.state == router_pb2.DONE
            if drained and drain_s is None:
                drain_s = time.monotonic() - t_start
            st_end = st
            indices = await jobs.result_indices()
            duplicated = len(indices) - len(set(indices))
            lost = (len(offline) - len(set(indices))) if drained else 0
            stats = await sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        engine_plans = await _engine_plans(cluster)
    # Offline throughput is a capacity figure only while the backlog lasts: over a window in which it ran
    # out, tokens / window understates it. ``backlogged_tok_s`` is tokens generated / time while backlogged,
    # counting the tokens of requests still running at the end as the simulator does (tokens of finished
    # requests alone undercount a long-tailed backlog: its longest answers are the ones still running).
    ran_out = drain_s is not None and drain_s < window_s
    if not has_jobs:
        backlogged_tok_s = 0.0
    elif ran_out:
        backlogged_tok_s = st_end.output_tokens / drain_s if drain_s else 0.0
    else:
        backlogged_tok_s = generated / window_s if window_s else 0.0
    ok = [r for r in results if r["ok"]]
    met = [r for r in ok if r["ttft_ms"] <= args.ttft_slo_ms and r["tpot_ms"] <= args.tpot_slo_ms]
    samples = list(stats.preemption_ms)
    return {
        "policy": (f"live:{args.policy} (decision core)" if decisions_window else
                   f"live:{args.policy}+colocation("
                   f"{'no-preemption' if args.no_preemption else 'preempt:' + stats.preempt_trigger})"),
        "decisions_in_window": decisions_window,
        "engine": args.engine + (" (SIMULATED)" if args.engine == "sim" else ""),
        "workers": {"prefill": args.prefill, "decode": args.decode},
        "window_s": window_s, "cpu": cpu, "rate_scale": args.rate_scale, "park_kv": args.park_kv, "offline_moves": args.offline_moves,
        "parked_resumes": args.parked_resumes,
        "pin_cpus": args.pin_cpus, "engine_plans_setting": args.engine_plans, "hygen_budget_frac": args.hygen_budget_frac,
        "slo": {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms},
        "online": {
            "requests": len(online), "failed": len(results) - len(ok),
            "slo_attainment": len(met) / len(online) if online else 1.0,
            "ttft_ms": pct([r["ttft_ms"] for r in ok]), "tpot_ms": pct([r["tpot_ms"] for r in ok]),
        },
        "offline": {
            "requests": len(offline),
            "completed": st_window.done if st_window else 0,
            "output_tokens_per_s": (st_window.output_tokens / window_s) if st_window else 0.0,  # finished only
            "generated_tokens": generated if has_jobs else 0,  # in the window
            "generated_tokens_since_submit": generated_total if has_jobs else 0,
            "submit_s": submit_s,
            "backlogged_tok_s": backlogged_tok_s,
            "backlog_ran_out_in_window": ran_out,
            "drain_s": drain_s,
            "drained": drained, "lost": lost, "duplicated": duplicated,
        },
        "goodput_requests_per_s": len(met) / window_s if window_s else 0.0,
        "preemptions": stats.preemptions,  # by the scheduler (Worker.Preempt RPCs, steps back at a first token)
        "preemptions_in_engine": int(stats.decisions.get("preempt:in-engine step plan", 0)),
        "preemption_ms": pct(samples) | {"samples": len(samples)},
        # real engines running the step plans (vLLM's scheduler): per worker, what the plans did
        "engine_plans": engine_plans,
        "preempt_trigger": stats.preempt_trigger,
        # how preempted offline requests resumed: from KV parked in kvtransfer's pool (only the tail computed)
        # or recomputing their context (by reason)
        "preemption": {"parked": stats.resumed_parked,
                       "recomputed": sum(stats.resumed_recomputed.values()),
                       "recomputed_by_reason": dict(stats.resumed_recomputed),
                       "tokens_not_recomputed": stats.tokens_not_recomputed,
                       "moved": stats.offline_moved},
        "slo_pressure_at_end": {k: round(v, 3) for k, v in sorted(stats.slo_pressure.items())},
    }


def run(args: argparse.Namespace) -> int:
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    online = load_online(args.online, args.duration, args.rate_scale, args.max_prompt, args.max_output)
    offline = load_offline(args.offline, args.offline_requests, args.max_prompt, args.max_output)
    print(f"replay: {len(online)} online requests over {args.duration:.0f}s (x{args.rate_scale} rate), "
          f"{len(offline)} offline; {args.prefill}P+{args.decode}D {args.engine} workers"
          f"{' (SIMULATED)' if args.engine == 'sim' else ''}; preemption "
          f"{'off' if args.no_preemption else 'on (trigger ' + (args.preempt_trigger or 'topology default') + ')'}",
          file=sys.stderr)
    env = {"DUOPOOL_OFFLINE_PER_WORKER": str(args.offline_per_worker),
           "DUOPOOL_OFFLINE_WITH_ONLINE": str(args.offline_per_worker if args.no_preemption else 0),
           "DUOPOOL_SIM_SPEEDUP": str(args.sim_speedup), "DUOPOOL_SCHEDULER_ID": "replay",
           "DUOPOOL_TTFT_SLO_MS": str(args.ttft_slo_ms), "DUOPOOL_PARK_KV": args.park_kv,
           "DUOPOOL_OFFLINE_MOVES": args.offline_moves, "DUOPOOL_PARKED_RESUMES": args.parked_resumes,
           "DUOPOOL_TPOT_SLO_MS": str(args.tpot_slo_ms), "DUOPOOL_HYGEN_BUDGET_FRAC": str(args.hygen_budget_frac)}
    args.out.mkdir(parents=True, exist_ok=True)
    # a fresh cluster each time: a run directory left by an earlier replay holds its Redis data, whose
    # unfinished batch would resume and compete with this one
    shutil.rmtree(args.out / "run", ignore_errors=True)
    cluster = LocalCluster(Topology(engine=args.engine, model=args.model, prefill_workers=args.prefill,
                                    policy=args.policy, preempt_trigger=args.preempt_trigger or "",
                                    engine_plans=args.engine_plans == "on",
                                    decode_workers=args.decode, max_model_len=max(2048, args.max_prompt + args.max_output + 8)),
                           args.out / "run", router_port=0, extra_env=env, pin_cpus=args.pin_cpus == "on")
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    with cluster:
        summary = asyncio.run(_replay(args, cluster, online, offline))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    on, off = summary["online"], summary["offline"]
    print(f"online: {on['requests']} requests, SLO attainment {on['slo_attainment']:.1%}, "
          f"TTFT p50/p99 {on['ttft_ms']['p50']:.0f}/{on['ttft_ms']['p99']:.0f} ms, "
          f"TPOT p50/p99 {on['tpot_ms']['p50']:.1f}/{on['tpot_ms']['p99']:.1f} ms")
    print(f"offline: {off['completed']} completed in the window, {off['backlogged_tok_s']:.1f} tok/s while "
          f"backlogged, lost {off['lost']}, duplicated {off['duplicated']} (drained: {off['drained']}"
          + (f", in {off['drain_s']:.1f} s" if off["drain_s"] is not None else "") + ")")
    if off["backlog_ran_out_in_window"]:
        print(f"note: the backlog ran out {off['drain_s']:.1f} s into the {summary['window_s']:.0f} s window; "
              f"tok/s over the window ({off['output_tokens_per_s']:.1f}) would understate capacity: compare "
              f"backlogged_tok_s or drain_s (a larger --offline-requests keeps it backlogged)")
    cpu = summary["cpu"]
    busiest = ", ".join(f"{n} {v:.0%}" for n, v in list(cpu["share_of_a_core"].items())[:4])
    print(f"CPU in the window: {cpu['total_share_of_host']:.0%} of the host's {cpu['cores']} cores; busiest "
          f"(share of a core): {busiest}")
    print(f"preemptions: {summary['preemptions']} by the scheduler, latency p50/p99 "
          f"{summary['preemption_ms']['p50']:.1f}/{summary['preemption_ms']['p99']:.1f} ms; "
          f"{summary['preemptions_in_engine']} by the engines' step plans (at a step boundary); resumed "
          f"{summary['preemption']['parked']} from parked KV ({summary['preemption']['tokens_not_recomputed']} "
          f"tokens not recomputed), {summary['preemption']['recomputed']} recomputing; "
          f"wrote {args.out / 'summary.json'}")
    return 0
