"""``duopool compare``: several policies over a load sweep; plots and a markdown table.

Writes ``DIR/<policy>/rate<S>/summary.json`` per run, ``DIR/results.json``, ``DIR/table.md`` and PNGs:
``offline_throughput_vs_load.png``, ``slo_attainment_vs_load.png``, ``latency_cdf_<policy>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_POLICIES = "pd-static,online-priority,hygen,tropical,ooco,dopd,ooco+dopd"


def register(subparsers) -> None:
    from duopool.cli.sim import add_workload_args

    p = subparsers.add_parser("compare", help="compare scheduling policies over a load sweep (simulated)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    p.add_argument("--rate-scales", default="1,2,4", help="comma-separated online rate multipliers")
    add_workload_args(p)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--slo-target", type=float, default=0.99, help="attainment the table marks as met")
    p.add_argument("--out", required=True)
    p.set_defaults(func=main)


def _one(job):
    args, policy, scale = job
    from duopool.cli.sim import load_workload, make_config, write_outputs
    from duopool.sim import run_sim

    online, offline = load_workload(args)
    if online is not None and scale != 1.0:
        online = online.scaled(scale)
    res, summary = run_sim(make_config(args, policy), online, offline)
    summary["rate_scale"] = scale
    summary["workload"] = {"online": list(args.online), "offline": args.offline}
    out = Path(args.out) / policy.replace("+", "_") / f"rate{scale:g}"
    write_outputs(out, res, summary)
    return policy, scale, summary, str(out)


def main(args) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    scales = [float(x) for x in args.rate_scales.split(",") if x.strip()]
    from duopool.core.policies import policy_names

    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        print(f"duopool compare: unknown policies {unknown}; known: {policy_names()}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args, p, s) for s in scales for p in policies]
    results = []
    total = len(jobs)
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as ex:
            for i, r in enumerate(ex.map(_one, jobs), 1):
                results.append(r)
                _report(i, total, r, args.quiet)
    else:
        for i, j in enumerate(jobs, 1):
            r = _one(j)
            results.append(r)
            _report(i, total, r, args.quiet)
    table = markdown_table(results, args.slo_target)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps([{"policy": p, "rate_scale": s, "dir": d, "summary": sm}
                                                 for p, s, sm, d in results], indent=1))
    plot(results, out, args.slo_target)
    print(table)
    return 0


def _report(i: int, total: int, r, quiet: bool) -> None:
    if quiet:
        return
    p, s, sm, _ = r
    n = int(30 * i / total)
    sys.stderr.write(f"\rcompare [{'#' * n}{'.' * (30 - n)}] {i}/{total} {p} x{s:g} "
                     f"({sm['sim']['wall_s']:.0f} s)      ")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def markdown_table(results, slo_target: float = 0.99) -> str:
    base = {s: sm["offline"]["output_tokens_per_s"] for p, s, sm, _ in results if p == "pd-static"}
    lines = ["| policy | rate × | online req | SLO attain. | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
             "offline tok/s | vs pd-static | offline done | goodput req/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s, sm, _ in sorted(results, key=lambda r: (r[1], r[0])):
        o, off = sm["online"], sm["offline"]
        att = o["slo_attainment"]
        mark = "" if att is None or att >= slo_target else " ✗"
        tt, tp = o["ttft_ms"], o["tpot_ms"]
        ratio = off["output_tokens_per_s"] / base[s] if base.get(s) else float("nan")
        lines.append(
            f"| {p} | {s:g} | {o['requests']} | {att:.4f}{mark} | {tt['p50']:.0f} / {tt['p90']:.0f} / {tt['p99']:.0f} | "
            f"{tp['p50']:.1f} / {tp['p90']:.1f} / {tp['p99']:.1f} | {off['output_tokens_per_s']:.0f} | "
            f"{ratio:.2f}× | {off['completed']} | {sm['goodput_requests_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results, out: Path, slo_target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = list(dict.fromkeys(p for p, *_ in results))
    for key, fname, ylabel in (
        (lambda sm: sm["offline"]["output_tokens_per_s"], "offline_throughput_vs_load.png", "offline output tokens/s"),
        (lambda sm: sm["online"]["slo_attainment"], "slo_attainment_vs_load.png", "online SLO attainment"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for p in policies:
            pts = sorted((s, key(sm)) for q, s, sm, _ in results if q == p)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
        if "slo" in fname:
            ax.axhline(slo_target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("online load (rate × Azure conversation trace)")
        ax.set_ylabel(ylabel)
        ax.set_title("simulated cluster")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    for p in policies:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for q, s, _sm, d in sorted(results, key=lambda r: r[1]):
            if q != p:
                continue
            lat = json.loads((Path(d) / "latencies.json").read_text())
            for ax, k in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
                v = np.sort(np.array([x for x in lat[k] if x is not None]))
                if len(v):
                    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=f"x{s:g}")
        cfg = results[0][2]["config"]["policy_cfg"]
        for ax, k, slo in zip(axes, ("TTFT ms", "TPOT ms"), (cfg["ttft_slo_s"], cfg["tpot_slo_s"]), strict=True):
            ax.axvline(slo * 1e3, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(k)
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{p}: online latency CDF (simulated)")
        fig.tight_layout()
        fig.savefig(out / f"latency_cdf_{p.replace('+', '_')}.png", dpi=110)
        plt.close(fig)
