"""``duopool sim``: run one policy over an online trace and an offline backlog in the simulator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--online", action="append", default=[], metavar="TRACE",
                   help="online trace (Azure CSV or Mooncake JSONL), optionally PATH:START_S:DURATION_S; "
                        "repeat to play traces one after another (a load-mix shift)")
    p.add_argument("--offline", metavar="TRACE", help="offline backlog lengths (arXiv CSV, or any trace)")
    p.add_argument("--hardware", default="H100-SXM", help="built-in hardware name or JSON path")
    p.add_argument("--model", default="llama-3.1-8b", help="built-in model name, config.json path or model dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per instance")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--start-s", type=float, default=0.0, help="skip this much of the online trace")
    p.add_argument("--duration-s", type=float, default=None, help="use only this much of the online trace")
    p.add_argument("--max-input", type=int, default=None, help="clip online prompts to this many tokens")
    p.add_argument("--offline-limit", type=int, default=None, help="finite offline backlog of N requests")
    p.add_argument("--prefill-fraction", type=float, default=0.5, help="P/D layouts: share of prefill instances")
    p.add_argument("--offline-share", type=float, default=0.25, help="pd-static: share of offline-only instances")
    p.add_argument("--hygen-budget-frac", type=float, default=0.8, help="hygen: latency budget / TPOT SLO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulate a scheduling policy on real traces (simulated cluster)",
                              description=__doc__)
    p.add_argument("--policy", default="ooco", help="pd-static | online-priority | hygen | tropical | ooco | dopd | ooco+dopd")
    add_workload_args(p)
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the online arrival rate (2 = twice)")
    p.add_argument("--out", required=True, help="output directory (summary.json, latencies.json)")
    p.set_defaults(func=main)


def load_workload(args):
    from duopool.traces import Trace, load_trace

    online = None
    if args.online:
        parts = [_load_segment(p) for p in args.online]
        online = parts[0] if len(parts) == 1 else Trace.concat(parts)
        if args.start_s or args.duration_s:
            online = online.window(args.start_s, args.duration_s)
        if args.max_input:
            online = online.clipped(max_input=args.max_input)
    offline = load_trace(args.offline) if args.offline else None
    return online, offline


def _load_segment(spec: str):
    """``PATH`` or ``PATH:START_S:DURATION_S`` (a window of the trace, e.g. to splice a load-mix shift)."""
    from duopool.traces import load_trace

    if not Path(spec).exists() and spec.count(":") >= 2:
        path, start, dur = spec.rsplit(":", 2)
        return load_trace(path).window(float(start or 0), float(dur) if dur else None)
    return load_trace(spec)


def make_config(args, policy: str):
    from duopool.core.policies import PolicyConfig
    from duopool.sim import SimConfig

    pc = PolicyConfig(ttft_slo_s=args.ttft_slo_ms / 1e3, tpot_slo_s=args.tpot_slo_ms / 1e3,
                      prefill_fraction=args.prefill_fraction, offline_share=args.offline_share,
                      hygen_budget_frac=args.hygen_budget_frac)
    return SimConfig(policy=policy, hardware=args.hardware, model=args.model, tp=args.tp,
                     instances=args.instances, seed=args.seed, policy_cfg=pc, offline_limit=args.offline_limit)


class ProgressBar:
    def __init__(self, label: str, enabled: bool = True, width: int = 30) -> None:
        self.label, self.enabled, self.width, self.last = label, enabled and sys.stderr.isatty() or enabled, width, -1

    def __call__(self, frac: float) -> None:
        if not self.enabled:
            return
        pct = int(frac * 100)
        if pct == self.last:
            return
        self.last = pct
        n = int(frac * self.width)
        sys.stderr.write(f"\r{self.label} [{'#' * n}{'.' * (self.width - n)}] {pct:3d}%")
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def write_outputs(out: Path, res, summary: dict) -> None:
    from duopool.sim.metrics import latencies

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ttft, tpot, _ = latencies(res)
    (out / "latencies.json").write_text(json.dumps({
        "ttft_ms": [round(float(x), 3) if x != float("inf") else None for x in ttft],
        "tpot_ms": [round(float(x), 3) if x != float("inf") else None for x in tpot],
    }))


def main(args) -> int:
    from duopool.sim import run_sim

    online, offline = load_workload(args)
    if online is None and offline is None:
        print("duopool sim: give --online and/or --offline", file=sys.stderr)
        return 2
    if online is not None and args.rate_scale != 1.0:
        online = online.scaled(args.rate_scale)
    if online is None and args.offline_limit is None:
        print("duopool sim: without --online, give --offline-limit (or the run never ends)", file=sys.stderr)
        return 2
    from duopool.core.policies import policy_names

    if args.policy not in policy_names():
        print(f"duopool sim: unknown policy {args.policy!r}; known: {', '.join(policy_names())}", file=sys.stderr)
        return 2
    try:
        cfg = make_config(args, args.policy)
    except ValueError as exc:
        print(f"duopool sim: {exc}", file=sys.stderr)
        return 2
    bar = ProgressBar(f"sim {args.policy}", enabled=not args.quiet)
    res, summary = run_sim(cfg, online, offline, progress=bar)
    summary["rate_scale"] = args.rate_scale
    summary["workload"] = {"online": list(args.online), "offline": args.offline}
    write_outputs(Path(args.out), res, summary)
    o = summary["online"]
    print(f"{args.policy}: online {o['requests']} req, SLO attainment {o['slo_attainment'] if o['slo_attainment'] is not None else float('nan'):.4f}, "
          f"TTFT p99 {o['ttft_ms']['p99'] or 0:.0f} ms, TPOT p99 {o['tpot_ms']['p99'] or 0:.1f} ms; offline "
          f"{summary['offline']['output_tokens_per_s']:.0f} tok/s, {summary['offline']['completed']} done; "
          f"simulated {summary['duration_s']:.0f} s in {summary['sim']['wall_s']:.1f} s wall -> {args.out}/summary.json")
    return 0
