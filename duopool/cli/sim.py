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
    p.add_argument("--output-range", metavar="LO:HI", default=None,
                   help="workload variant: re-sample online output lengths uniformly in [LO, HI] tokens (seeded by "
                        "--workload-seed), e.g. 5:20 for short code-completion-like answers; applied after the "
                        "window and --max-input, before --rate-scale")
    p.add_argument("--bursts", metavar="PERIOD_S:ON_S", default=None,
                   help="workload variant: within each PERIOD_S of the online trace, compress its arrivals into the "
                        "first ON_S seconds (order kept; same mean rate, PERIOD_S/ON_S times the rate within a "
                        "burst); applied before --rate-scale, which therefore also divides the period")
    p.add_argument("--workload-seed", type=int, default=0, help="seed of the workload variants (--output-range)")
    p.add_argument("--prefill-fraction", type=float, default=0.5, help="P/D layouts: share of prefill instances")
    p.add_argument("--offline-share", type=float, default=0.25,
                   help="pd-static with --static-split fractions: share of offline-only instances")
    p.add_argument("--static-split", default="auto", metavar="auto|P:D:O|fractions",
                   help="pd-static layout: 'auto' (default) sizes prefill/decode/offline-only instance counts by the "
                        "rule in duopool/sim/sizing.py from the first --sizing-window-s of the online trace after "
                        "--rate-scale (all instances offline-only without an online trace); 'P:D:O' gives the "
                        "counts (they must add up to --instances); 'fractions' uses --offline-share and "
                        "--prefill-fraction (the earlier behaviour)")
    p.add_argument("--sizing-window-s", type=float, default=300.0,
                   help="--static-split auto: seconds of the online trace (from its start) the rule looks at")
    p.add_argument("--hygen-budget-frac", type=float, default=0.8, help="hygen: latency budget / TPOT SLO")
    p.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set any policy constant (a PolicyConfig field, e.g. step_margin=0.8); repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulate a scheduling policy on real traces (simulated cluster)",
                              description=__doc__)
    p.add_argument("--policy", default="hygen", help="hygen (default) | pd-static | online-priority | tropical | ooco | dopd | ooco+dopd")
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
        online = apply_variants(online, args)
    offline = load_trace(args.offline) if args.offline else None
    return online, offline


def apply_variants(online, args):
    """The workload variants of ``--output-range`` and ``--bursts`` (in that order), before rate scaling."""
    rng = _parse_pair(getattr(args, "output_range", None), "--output-range", int)
    if rng is not None:
        try:
            online = online.with_outputs(rng[0], rng[1], getattr(args, "workload_seed", 0))
        except ValueError as exc:
            raise ValueError(f"--output-range {args.output_range}: {exc}") from None
    bursts = _parse_pair(getattr(args, "bursts", None), "--bursts", float)
    if bursts is not None:
        try:
            online = online.bursty(bursts[0], bursts[1])
        except ValueError as exc:
            raise ValueError(f"--bursts {args.bursts}: {exc}") from None
    return online


def _parse_pair(spec: str | None, flag: str, kind):
    if spec is None:
        return None
    parts = str(spec).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        what = "LO:HI (integers)" if kind is int else "PERIOD_S:ON_S (seconds)"
        raise ValueError(f"{flag} must be {what}, got {spec!r}") from None


def workload_info(args) -> dict:
    """``summary["workload"]``: the traces and the variant settings (``sim`` and ``compare`` write it)."""
    return {"online": list(args.online), "offline": args.offline,
            "start_s": args.start_s, "duration_s": args.duration_s, "max_input": args.max_input,
            "output_range": list(_parse_pair(getattr(args, "output_range", None), "--output-range", int) or ())
            or None,
            "bursts": list(_parse_pair(getattr(args, "bursts", None), "--bursts", float) or ()) or None,
            "workload_seed": getattr(args, "workload_seed", 0)}


def static_split_for(args, online, pm=None):
    """(split, sizing) for ``PolicyConfig.static_split`` from ``--static-split``: ``auto`` → the sizing rule
    on the (rate-scaled) ``online`` trace (sizing = its :class:`~duopool.sim.sizing.SplitSizing`), ``0:0:N``
    without an online trace; ``P:D:O`` → as given; ``fractions`` → ``None`` (pd-static's two fractions)."""
    mode = str(getattr(args, "static_split", "auto") or "auto").strip()
    n = args.instances
    if mode == "fractions":
        return None, None
    if mode == "auto":
        if online is None or not len(online):
            return (0, 0, n), None
        if n < 2:
            return None, None  # no P/D split fits; pd-static falls back to its fractions
        window = getattr(args, "sizing_window_s", 300.0)
        if not window > 0:
            raise ValueError(f"--sizing-window-s must be > 0, got {window}")
        from duopool.core.perfmodel import PerfModel
        from duopool.sim.sizing import rule_static_split

        pm = pm or PerfModel.load(args.hardware, args.model, tp=args.tp)
        sz = rule_static_split(online, pm, n, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3, window_s=window)
        return sz.split, sz
    try:
        split = tuple(int(x) for x in mode.split(":"))
        if len(split) != 3 or min(split) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--static-split must be auto, fractions or P:D:O (three counts >= 0), got {mode!r}") from None
    if sum(split) != n:
        raise ValueError(f"--static-split {mode} adds up to {sum(split)}, not --instances {n}")
    if (split[0] == 0) != (split[1] == 0):
        raise ValueError(f"--static-split {mode}: give both prefill and decode instances, or neither")
    if split[0] == 0 and online is not None and len(online):
        raise ValueError(f"--static-split {mode} leaves no instance for the online trace")
    return split, None


def _load_segment(spec: str):
    """``PATH`` or ``PATH:START_S:DURATION_S`` (a window of the trace, e.g. to splice a load-mix shift)."""
    from duopool.traces import load_trace

    if not Path(spec).exists() and spec.count(":") >= 2:
        path, start, dur = spec.rsplit(":", 2)
        return load_trace(path).window(float(start or 0), float(dur) if dur else None)
    return load_trace(spec)


_RESOLVE = object()


def policy_opts(items: list[str]) -> dict:
    """``--policy-opt KEY=VALUE`` pairs as PolicyConfig fields (numbers parsed; unknown keys rejected)."""
    from dataclasses import fields

    from duopool.core.policies import PolicyConfig

    known = {f.name: f for f in fields(PolicyConfig)}
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known or key in ("static_split", "ttft_slo_s", "tpot_slo_s"):
            raise ValueError(f"--policy-opt {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k for k in sorted(known) if k not in ('static_split', 'ttft_slo_s', 'tpot_slo_s'))}")
        try:
            num = float(val)
        except ValueError:
            raise ValueError(f"--policy-opt {item!r}: VALUE must be a number") from None
        out[key] = int(num) if known[key].type in ("int", int) else num
    return out


def make_config(args, policy: str, online=None, split=_RESOLVE):
    """The :class:`SimConfig` of one run. ``online`` is the (rate-scaled) online trace the ``auto`` static
    split is sized from; ``split`` overrides ``--static-split`` (``compare --best-static``)."""
    from duopool.core.policies import PolicyConfig
    from duopool.sim import SimConfig

    if split is _RESOLVE:
        split, _ = static_split_for(args, online)
    pc = PolicyConfig(ttft_slo_s=args.ttft_slo_ms / 1e3, tpot_slo_s=args.tpot_slo_ms / 1e3,
                      prefill_fraction=args.prefill_fraction, offline_share=args.offline_share,
                      static_split=split, hygen_budget_frac=args.hygen_budget_frac,
                      **policy_opts(getattr(args, "policy_opt", None) or []))
    return SimConfig(policy=policy, hardware=args.hardware, model=args.model, tp=args.tp,
                     instances=args.instances, seed=args.seed, policy_cfg=pc, offline_limit=args.offline_limit)


def _split_str(split) -> str:
    return ":".join(str(x) for x in split) if split else "-"


def split_info(args, split, sizing) -> dict:
    """``summary["static_split"]``: the mode, the counts and (auto) the figures the rule measured."""
    from dataclasses import asdict

    return {"mode": str(getattr(args, "static_split", "auto")), "split": list(split) if split else None,
            "sizing": asdict(sizing) if sizing is not None else None}


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

    try:
        online, offline = load_workload(args)
    except ValueError as exc:
        print(f"duopool sim: {exc}", file=sys.stderr)
        return 2
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
        split, sizing = static_split_for(args, online)
        cfg = make_config(args, args.policy, online, split=split)
    except ValueError as exc:
        print(f"duopool sim: {exc}", file=sys.stderr)
        return 2
    if args.policy == "pd-static":
        if sizing is not None:
            print(f"pd-static split: {sizing.explain()}")
        elif split is not None:
            print(f"pd-static split: {_split_str(split)} (P:D:O, --static-split {args.static_split})")
        else:
            print(f"pd-static split: from --offline-share {args.offline_share:g} / --prefill-fraction "
                  f"{args.prefill_fraction:g}")
    bar = ProgressBar(f"sim {args.policy}", enabled=not args.quiet)
    res, summary = run_sim(cfg, online, offline, progress=bar)
    summary["rate_scale"] = args.rate_scale
    summary["workload"] = workload_info(args)
    summary["static_split"] = split_info(args, split, sizing)
    write_outputs(Path(args.out), res, summary)
    o = summary["online"]
    print(f"{args.policy}: online {o['requests']} req, SLO attainment {o['slo_attainment'] if o['slo_attainment'] is not None else float('nan'):.4f}, "
          f"TTFT p99 {o['ttft_ms']['p99'] or 0:.0f} ms, TPOT p99 {o['tpot_ms']['p99'] or 0:.1f} ms; offline "
          f"{summary['offline']['output_tokens_per_s']:.0f} tok/s, {summary['offline']['completed']} done; "
          f"simulated {summary['duration_s']:.0f} s in {summary['sim']['wall_s']:.1f} s wall -> {args.out}/summary.json")
    return 0
