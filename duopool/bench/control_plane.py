"""`duopool bench control-plane`: what the serving layers add to a request, and where the CPU goes.

A local cluster with SIMULATED workers sped up (``--sim-speedup``) so the model costs next to nothing; an
open-loop Poisson load of short online requests (``--max-tokens`` 4 by default; ``--prompt-tokens`` 32, two
KV blocks, so the P/D path moves KV) at each of ``--rates``
for ``--seconds``, from an asyncio gRPC client in this process (client, services and simulated engines all
share this machine's cores, as the issue asks). Per rate:

* added latency = the client's end-to-end time minus the time the same request spends inside the same
  simulated engine called directly in this process (its median, measured first): p50 / p99;
* achieved rate and errors; the rate is "saturated" when fewer than 95% of the offered requests finish
  within the window + 5 s, or their p99 passes 1 s;
* CPU per request of every service process (router, scheduler, kvtransfer, workers; Redis), from
  ``/proc/<pid>/stat`` before and after, and each one's share of a core: the one near 100% saturates.

``--layout pd`` (1 prefill + 1 decode worker: Generate, Place, Prefill, Decode, Release; the KV
bookkeeping, StartTransfer and CompleteTransfer, goes to kvtransfer off the token path) and
``--layout mixed`` (one mixed worker: Generate, Place, PrefillDecode, Release) can be compared in one
invocation (``--layout pd,mixed``). Writes ``DIR/control_plane.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import sys
import time

from duopool.topology import LAYOUTS

CLK = os.sysconf("SC_CLK_TCK")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control-plane", help="latency the serving layers add and their CPU per request "
                                             "(SIMULATED workers, open-loop load)")
    p.add_argument("--rates", default="5,20,50,100,200", help="offered requests/s, comma-separated [5,20,50,100,200]")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per rate [10]")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens per answer [4]")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help=f"prompt length in (simulated) tokens; >= 16 exercises the KV transfer [{PROMPT_TOKENS}]")
    p.add_argument("--layout", default="pd,mixed", help="pd (1 prefill + 1 decode), mixed (1 mixed worker), or "
                                                       "both, comma-separated [pd,mixed]")
    p.add_argument("--sim-speedup", type=float, default=1000.0,
                   help="divide simulated step times by this (the engines cost next to nothing) [1000]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench"), help="output dir")
    p.set_defaults(func=main)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError, ValueError):
            pass
    return total


def _descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = pathlib.Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            frontier.append(int(k))
    return out


PROMPT_TOKENS = 32  # two 16-token KV blocks: the P/D path exports, announces, loads and frees KV


def _prompt(i: int, tokens: int = PROMPT_TOKENS) -> str:
    """A prompt of ``tokens`` words (the simulated engine's tokens), distinct per request."""
    return " ".join([f"probe{i % 97}"] + [f"w{k}" for k in range(max(0, tokens - 1))])


async def _engine_baseline(speedup: float, max_tokens: int, prompt_tokens: int, n: int = 50) -> float:
    """Median seconds one request spends in the simulated engine called directly (same speedup)."""
    import tempfile

    from duopool.worker.engines.base import EngineRequest, Sampling
    from duopool.worker.engines.sim import SimEngine, sim_tokenize

    with tempfile.TemporaryDirectory() as kv:
        engine = SimEngine(kv, speedup=speedup)
        await engine.start()
        times = []
        try:
            for i in range(n):
                req = EngineRequest(request_id=f"base-{i}", prompt_token_ids=tuple(sim_tokenize(_prompt(i, prompt_tokens))),
                                    max_tokens=max_tokens, sampling=Sampling(temperature=0.0))
                t0 = time.perf_counter()
                async for _ in engine.generate(req):
                    pass
                times.append(time.perf_counter() - t0)
        finally:
            await engine.stop()
    return statistics.median(times)


async def _load(address: str, metadata, rate: float, seconds: float, max_tokens: int, seed: int,
                prompt_tokens: int = PROMPT_TOKENS) -> dict:
    import grpc

    from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc

    rng = random.Random(seed)
    lat: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                call = stub.Generate(router_pb2.GenerateRequest(text=_prompt(i, prompt_tokens), max_tokens=max_tokens,
                                                                request_class=common_pb2.ONLINE),
                                     timeout=seconds + 30, metadata=metadata)
                async for _ in call:
                    pass
                lat.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        tasks, t_start, t, i = [], time.perf_counter(), 0.0, 0
        while t < seconds:
            await asyncio.sleep(max(0.0, t_start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            t += rng.expovariate(rate)
        offered = i
        done, pending = await asyncio.wait(tasks, timeout=5 + max(0.0, t_start + seconds - time.perf_counter()))
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - t_start
    return {"offered": offered, "completed": len(lat), "errors": errors, "late": len(pending), "wall_s": wall,
            "latencies": lat}


def _floor_server(port_out, stop) -> None:
    """A bare grpc.aio server (no interceptors, no auth, a no-op handler) for ``_grpc_floor``."""
    import grpc

    async def run() -> None:
        async def echo(request, context):
            return request

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "floor.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(0)

    asyncio.run(run())


def _grpc_floor(calls: int = 3000) -> dict:
    """What one gRPC hop costs on this machine with nothing of ours in it: ``calls`` sequential no-op unary
    calls (16-byte messages) between two processes over loopback, CPU ms per call on each side. A request
    that crosses k hops cannot cost its services less than about k times this."""
    import multiprocessing as mp

    import grpc

    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_floor_server, args=(port_q, stop), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=60)

        async def client() -> tuple[float, float, float]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                echo = ch.unary_unary("/floor.Floor/Echo")
                for _ in range(200):
                    await echo(b"x" * 16)
                srv0, cli0, t0 = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                for _ in range(calls):
                    await echo(b"x" * 16)
                return cpu_seconds(proc.pid) - srv0, time.process_time() - cli0, time.perf_counter() - t0

        srv, cli, wall = asyncio.run(client())
    finally:
        stop.set()
        proc.join(10)
    return {"calls": calls, "server_cpu_ms_per_call": srv * 1e3 / calls, "client_cpu_ms_per_call": cli * 1e3 / calls,
            "latency_ms_per_call": wall * 1e3 / calls}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _run_layout(layout: str, args, rates: list[float], engine_s: float, out: pathlib.Path) -> dict:
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    prefill, decode, mixed = LAYOUTS[layout]
    cluster = LocalCluster(Topology(engine="sim", prefill_workers=prefill, decode_workers=decode, mixed_workers=mixed),
                           out / f"run-{layout}", router_port=0,
                           extra_env={"DUOPOOL_SIM_SPEEDUP": str(args.sim_speedup), "OTEL_TRACES_EXPORTER": "none"})
    cluster.log = lambda m: None
    cluster.start(timeout=120)
    rows = []
    try:
        pids = {name: p.popen.pid for name, p in cluster.procs.items()}
        if cluster.redis is not None and cluster.redis.pid is not None:
            pids["redis"] = cluster.redis.pid
        asyncio.run(_load(cluster.router_address, cluster.auth_metadata, 5, 2, args.max_tokens, 0,
                               args.prompt_tokens))  # warm up
        for k, rate in enumerate(rates):
            before = {n: cpu_seconds(p) for n, p in pids.items()}
            client0 = time.process_time()
            res = asyncio.run(_load(cluster.router_address, cluster.auth_metadata, rate, args.seconds,
                                    args.max_tokens, k + 1, args.prompt_tokens))
            client_cpu = time.process_time() - client0
            cpu = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
            lat = res.pop("latencies")
            added = [max(0.0, x - engine_s) for x in lat]
            n = max(1, res["completed"])
            row = {"layout": layout, "rate": rate, **res, "achieved_rps": res["completed"] / res["wall_s"],
                   "e2e_p50_ms": _pct(lat, 0.5) * 1e3, "e2e_p99_ms": _pct(lat, 0.99) * 1e3,
                   "added_p50_ms": _pct(added, 0.5) * 1e3, "added_p99_ms": _pct(added, 0.99) * 1e3,
                   "cpu_ms_per_request": {k2: v * 1e3 / n for k2, v in cpu.items()} | {"client": client_cpu * 1e3 / n},
                   "core_share": {k2: v / res["wall_s"] for k2, v in cpu.items()} | {"client": client_cpu / res["wall_s"]}}
            row["saturated"] = (res["completed"] < 0.95 * res["offered"]) or row["e2e_p99_ms"] > 1000
            busiest = max(row["core_share"], key=row["core_share"].get)
            row["busiest"] = busiest
            rows.append(row)
            cpu_txt = " ".join(f"{k2} {v:.2f}" for k2, v in sorted(row["cpu_ms_per_request"].items()))
            print(f"[{layout}] {rate:>6.0f} req/s offered, {row['achieved_rps']:6.1f} done/s, errors {res['errors'] or 0}: "
                  f"added p50 {row['added_p50_ms']:.1f} ms p99 {row['added_p99_ms']:.1f} ms; CPU ms/request: {cpu_txt}; "
                  f"busiest {busiest} ({row['core_share'][busiest] * 100:.0f}% of a core)"
                  + (" SATURATED" if row["saturated"] else ""), flush=True)
    finally:
        cluster.stop()
    return {"rows": rows}


def main(args: argparse.Namespace) -> int:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    layouts = [x.strip() for x in args.layout.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates) or any(x not in LAYOUTS for x in layouts) or not layouts:
        print("--rates: positive numbers; --layout: pd and/or mixed", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    engine_s = asyncio.run(_engine_baseline(args.sim_speedup, args.max_tokens, args.prompt_tokens))
    print(f"SIMULATED engine alone: {engine_s * 1e3:.2f} ms per request of {args.prompt_tokens} + {args.max_tokens} "
          "tokens (median)", flush=True)
    floor = _grpc_floor()
    print(f"one bare gRPC hop (no-op unary, loopback): client {floor['client_cpu_ms_per_call']:.3f} ms + server "
          f"{floor['server_cpu_ms_per_call']:.3f} ms of CPU, {floor['latency_ms_per_call']:.3f} ms round trip",
          flush=True)
    report = {"engine": "sim (SIMULATED)", "sim_speedup": args.sim_speedup, "max_tokens": args.max_tokens,
              "grpc_hop": floor,
              "prompt_tokens": args.prompt_tokens,
              "seconds": args.seconds, "cores": len(os.sched_getaffinity(0)), "engine_ms": engine_s * 1e3,
              "layouts": {}}
    for layout in layouts:
        report["layouts"][layout] = _run_layout(layout, args, rates, engine_s, out)
        ok = [r["rate"] for r in report["layouts"][layout]["rows"] if not r["saturated"]]
        report["layouts"][layout]["max_unsaturated_rps"] = max(ok) if ok else 0
    (out / "control_plane.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'control_plane.json'}")
    return 0
