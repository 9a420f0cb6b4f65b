"""Medians and ranges of repeated `duopool bench replay` runs, as a markdown table and JSON.

    python scripts/replay_table.py --out table.json NAME=DIR[,DIR...] [NAME=DIR,...] ...

Each DIR is one replay's --out directory (its summary.json). Per NAME: online SLO attainment, TTFT / TPOT
p50 and p99, offline tokens/s while backlogged, preemptions by the scheduler and inside the engines, and the
engines' in-engine preemption latency (online arrival -> offline work stopped), each as the median of the
runs with their range.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def figures(s: dict) -> dict[str, float]:
    on, off = s["online"], s["offline"]
    plans = [p for p in s.get("engine_plans", {}).values() if "error" not in p]
    lat50 = [_num(p.get("preempt_latency_p50_ms")) for p in plans]
    lat99 = [_num(p.get("preempt_latency_p99_ms")) for p in plans]
    return {
        "slo_attainment": on["slo_attainment"],
        "ttft_p50_ms": on["ttft_ms"]["p50"], "ttft_p99_ms": on["ttft_ms"]["p99"],
        "tpot_p50_ms": on["tpot_ms"]["p50"], "tpot_p99_ms": on["tpot_ms"]["p99"],
        "offline_backlogged_tok_s": off["backlogged_tok_s"],
        "offline_ran_out": float(bool(off["backlog_ran_out_in_window"])),
        "preemptions_rpc": s["preemptions"], "preemptions_in_engine": s["preemptions_in_engine"],
        "rpc_preemption_p50_ms": s["preemption_ms"].get("p50", float("nan")),
        "rpc_preemption_p99_ms": s["preemption_ms"].get("p99", float("nan")),
        "in_engine_preemption_p50_ms": max(lat50) if lat50 else float("nan"),
        "in_engine_preemption_p99_ms": max(lat99) if lat99 else float("nan"),
    }


def summarize(dirs: list[pathlib.Path]) -> dict[str, dict[str, float]]:
    runs = [figures(json.loads((d / "summary.json").read_text())) for d in dirs]
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if r[k] == r[k]]  # NaN: not measured in that run
        out[k] = {"median": statistics.median(vals) if vals else float("nan"),
                  "min": min(vals) if vals else float("nan"), "max": max(vals) if vals else float("nan"),
                  "runs": len(vals)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="+", help="NAME=DIR[,DIR...]")
    p.add_argument("--out", type=pathlib.Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    table = {}
    for g in args.groups:
        name, _, dirs = g.partition("=")
        if not dirs:
            p.error(f"{g!r}: expected NAME=DIR[,DIR...]")
        table[name] = summarize([pathlib.Path(d) for d in dirs.split(",")])

    def cell(f, k, scale=1.0, fmt="{:.0f}"):
        v = f[k]
        if v["median"] != v["median"]:
            return "—"
        med, lo, hi = (fmt.format(v[x] * scale) for x in ("median", "min", "max"))
        return med if v["runs"] == 1 or lo == hi else f"{med} ({lo}–{hi})"

    print("| run | online SLO % | TTFT p50 / p99 ms | TPOT p50 / p99 ms | offline tok/s (backlogged) | "
          "preemptions RPC / in-engine | in-engine preemption p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, f in table.items():
        print(f"| {name} | {cell(f, 'slo_attainment', 100, '{:.1f}')} | {cell(f, 'ttft_p50_ms')} / "
              f"{cell(f, 'ttft_p99_ms')} | {cell(f, 'tpot_p50_ms', fmt='{:.1f}')} / {cell(f, 'tpot_p99_ms', fmt='{:.1f}')} "
              f"| {cell(f, 'offline_backlogged_tok_s', fmt='{:.1f}')} | {cell(f, 'preemptions_rpc')} / "
              f"{cell(f, 'preemptions_in_engine')} | {cell(f, 'in_engine_preemption_p50_ms', fmt='{:.1f}')} / "
              f"{cell(f, 'in_engine_preemption_p99_ms', fmt='{:.1f}')} |")
    if args.out:
        args.out.write_text(json.dumps(table, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
