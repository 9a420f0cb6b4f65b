"""``duopool compare``: several policies over a load sweep; plots and a markdown table.

Writes ``DIR/<policy>/rate<S>/summary.json`` per run, ``DIR/results.json``, ``DIR/table.md`` and PNGs:
``offline_throughput_vs_load.png``, ``slo_attainment_vs_load.png``, ``latency_cdf_<policy>.png``.

Besides the runs, per rate scale:

* the practical ceiling (``duopool/sim/sizing.py``): instances × the offline tok/s of one offline-only
  instance × (1 − the online work share by the roofline); the table's "ceiling frac" is a policy's offline
  tok/s over it (``--no-ceiling`` skips the capacity run);
* "vs pd-static": over the ``pd-static`` row, sized by ``--static-split`` (default ``auto``: the stated rule
  on the first ``--sizing-window-s`` of the rate-scaled online trace, no hindsight);
* ``--best-static``: the hindsight-best static split, a row "pd-static best P:D:O" and the "vs best static"
  column. For each rate it searches O (offline-only instances) from instances − 2 down to 0, and for each O
  every P in 1..instances − O − 1 (D = the rest); it stops at the first O where some split holds the SLO
  (attainment ≥ ``--slo-target``) and takes the holding split with the highest offline tok/s. This is optimal
  over all static splits: pd-static's offline-only instances share nothing with the online ones, so the online
  SLO depends only on P and D (not on O), and the offline throughput grows with O; no split with a larger O
  held, so none can beat it.

``results.json``: ``{"runs": [{policy, rate_scale, dir, summary, ceiling_frac, vs_pd_static, vs_best_static}],
"rates": [{rate_scale, online_work_share, per_instance_tok_s, ceiling_tok_s, pd_static_split, best_static}]}``
where ``best_static`` = ``{split, holds, tried: [{split, slo_attainment, offline_tok_s, holds, dir}]}``.
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
    p.add_argument("--best-static", action="store_true",
                   help="also search the hindsight-best pd-static split per rate (see above; up to "
                        "instances·(instances−1)/2 extra runs per rate, usually far fewer)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the practical-ceiling capacity run")
    p.add_argument("--ceiling-duration-s", type=float, default=3600.0,
                   help="simulated seconds of the one-instance offline capacity run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=main)


BEST = "pd-static-best"  # the key of the best static split's runs (plots, directories)


def _one(job):
    """One simulation: ``(args, policy, scale)`` or ``(args, policy, scale, split)`` (a pd-static split of
    the best-static search). Returns ``(policy or BEST, scale, summary, dir)``."""
    args, policy, scale, *rest = job
    split = rest[0] if rest else None
    from duopool.cli.sim import (
        load_workload,
        make_config,
        split_info,
        static_split_for,
        workload_info,
        write_outputs,
    )
    from duopool.sim import run_sim

    online, offline = load_workload(args)
    if online is not None and scale != 1.0:
        online = online.scaled(scale)
    if split is None:
        split, sizing = static_split_for(args, online)
        name, out = policy, Path(args.out) / policy.replace("+", "_") / f"rate{scale:g}"
    else:
        sizing, name = None, BEST
        out = Path(args.out) / BEST / f"rate{scale:g}" / "-".join(str(x) for x in split)
    res, summary = run_sim(make_config(args, policy, online, split=tuple(split) if split else None),
                           online, offline)
    summary["rate_scale"] = scale
    summary["workload"] = workload_info(args)
    summary["static_split"] = split_info(args, split, sizing)
    write_outputs(out, res, summary)
    return name, scale, summary, str(out)


def _run_all(jobs, args, done0: int = 0, total: int | None = None) -> list:
    """Run the jobs (in parallel with ``--jobs``), in order."""
    out = []
    total = total or len(jobs)
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as ex:
            for i, r in enumerate(ex.map(_one, jobs), done0 + 1):
                out.append(r)
                _report(i, total, r, args.quiet)
    else:
        for i, j in enumerate(jobs, done0 + 1):
            r = _one(j)
            out.append(r)
            _report(i, total, r, args.quiet)
    return out


def holds(summary: dict, slo_target: float) -> bool:
    att = summary["online"]["slo_attainment"]
    return att is None or att >= slo_target


def best_static_search(args, scales: list[float], run=None) -> dict:
    """The hindsight-best pd-static split per rate scale (search order and optimality in the module
    docstring). ``run(jobs)`` runs a list of ``_one`` jobs (default: :func:`_run_all`); all rates still
    searching run their next O level together. Returns ``{scale: {"split", "holds", "tried", "result"}}``
    (``split`` None and ``holds`` False when no static split holds; ``result`` is the chosen run)."""
    n = args.instances
    if n < 2:
        raise ValueError(f"--best-static needs --instances >= 2, got {n}")
    run = run or (lambda jobs: _run_all(jobs, args))
    state = {s: {"split": None, "holds": False, "tried": [], "result": None} for s in scales}
    for o in range(n - 2, -1, -1):
        live = [s for s in scales if state[s]["split"] is None]
        if not live:
            break
        jobs = [(args, "pd-static", s, (p, n - o - p, o)) for s in live for p in range(1, n - o)]
        for r, job in zip(run(jobs), jobs, strict=True):
            _, s, sm, d = r
            split = job[3]
            ok = holds(sm, args.slo_target)
            state[s]["tried"].append({"split": list(split), "slo_attainment": sm["online"]["slo_attainment"],
                                      "offline_tok_s": sm["offline"]["output_tokens_per_s"], "holds": ok,
                                      "dir": d})
            if ok:
                best = state[s]["result"]
                if best is None or sm["offline"]["output_tokens_per_s"] > best[2]["offline"]["output_tokens_per_s"]:
                    state[s]["result"] = r
        for s in live:
            if state[s]["result"] is not None:
                state[s]["split"] = list(state[s]["result"][2]["config"]["policy_cfg"]["static_split"])
                state[s]["holds"] = True
    return state


def rate_figures(args, scales: list[float]) -> dict:
    """Per rate scale: the online work share, one offline-only instance's capacity, the practical ceiling
    (None without an offline trace or with ``--no-ceiling``) and the pd-static split ``--static-split``
    gives (which also validates the workload and split flags before any run)."""
    from duopool.cli.sim import load_workload, static_split_for
    from duopool.core.perfmodel import PerfModel
    from duopool.sim.sizing import offline_capacity_tok_s, online_work_share, practical_ceiling

    online, offline = load_workload(args)
    pm = PerfModel.load(args.hardware, args.model, tp=args.tp)
    cap = None
    if offline is not None and not args.no_ceiling:
        cap = offline_capacity_tok_s(offline, args.hardware, args.model, args.tp, args.seed,
                                     duration_s=args.ceiling_duration_s)
    out = {}
    for s in scales:
        on = online.scaled(s) if online is not None and s != 1.0 else online
        timed = on if on is not None and on.duration_s > 0 else None  # a trace with a span to share
        share = online_work_share(timed, pm, args.instances)
        split, _ = static_split_for(args, on, pm)
        out[s] = {"online_work_share": share, "per_instance_tok_s": cap,
                  "ceiling_tok_s": None if cap is None else practical_ceiling(timed, pm, args.instances, cap),
                  "pd_static_split": list(split) if split else None}
    return out


def main(args) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        scales = [float(x) for x in args.rate_scales.split(",") if x.strip()]
    except ValueError:
        print(f"duopool compare: --rate-scales must be comma-separated numbers, got {args.rate_scales!r}",
              file=sys.stderr)
        return 2
    from duopool.core.policies import policy_names

    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        print(f"duopool compare: unknown policies {unknown}; known: {policy_names()}", file=sys.stderr)
        return 2
    if not args.ceiling_duration_s > 0:
        print(f"duopool compare: --ceiling-duration-s must be > 0, got {args.ceiling_duration_s}", file=sys.stderr)
        return 2
    if args.best_static and args.instances < 2:
        print(f"duopool compare: --best-static needs --instances >= 2, got {args.instances}", file=sys.stderr)
        return 2
    try:
        ceil = rate_figures(args, scales)  # also validates the workload and split flags before any run
    except ValueError as exc:
        print(f"duopool compare: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args, p, s) for s in scales for p in policies]
    results = _run_all(jobs, args)
    best = best_static_search(args, scales) if args.best_static else None
    rule = {s: c["pd_static_split"] for s, c in ceil.items()}
    rows = results + ([b["result"] for b in best.values() if b["result"] is not None] if best else [])
    table = markdown_table(rows, args.slo_target, ceil, best, rule)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results_json(rows, scales, ceil, best), indent=1))
    plot(rows, out, args.slo_target)
    print(table)
    return 0


def _ratios(p, s, sm, ceil, base, best_tok) -> dict:
    tok = sm["offline"]["output_tokens_per_s"]
    c = (ceil or {}).get(s, {}).get("ceiling_tok_s")
    return {"ceiling_frac": tok / c if c else None,
            "vs_pd_static": tok / base[s] if base.get(s) else None,
            "vs_best_static": tok / best_tok[s] if best_tok.get(s) else None}


def _bases(results, best) -> tuple[dict, dict]:
    base = {s: sm["offline"]["output_tokens_per_s"] for p, s, sm, _ in results if p == "pd-static"}
    best_tok = {s: b["result"][2]["offline"]["output_tokens_per_s"] for s, b in (best or {}).items()
                if b["result"] is not None}
    return base, best_tok


def results_json(results, scales, ceil=None, best=None) -> dict:
    base, best_tok = _bases(results, best)
    runs = [{"policy": p, "rate_scale": s, "dir": d, "summary": sm, **_ratios(p, s, sm, ceil, base, best_tok)}
            for p, s, sm, d in results]
    rates = []
    for s in scales:
        b = (best or {}).get(s)
        rates.append({"rate_scale": s, **(ceil or {}).get(s, {}),
                      "best_static": None if b is None else {k: b[k] for k in ("split", "holds", "tried")}})
    return {"runs": runs, "rates": rates}


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


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None or x != x else f"{x:{spec}}{suffix}"


def markdown_table(results, slo_target: float = 0.99, ceil=None, best=None, rule=None) -> str:
    """The comparison table; ``ceil``/``best``/``rule`` per rate scale as :func:`main` computes them. Rows
    of the best-static search are labelled "pd-static best P:D:O"; a rate where no static split held gets
    a "no static split holds" row. Notes below the table give the ceiling figures and the rule splits."""
    base, best_tok = _bases(results, best)
    lines = ["| policy | rate × | online req | SLO attain. | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
             "offline tok/s | ceiling frac | vs pd-static | vs best static | peak KV | goodput req/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(s, p, sm) for p, s, sm, _ in results]
    rows += [(s, None, None) for s, b in (best or {}).items() if b["result"] is None]
    for s, p, sm in sorted(rows, key=lambda r: (r[0], r[1] or BEST)):
        if sm is None:
            lines.append(f"| pd-static best | {s:g} | no static split holds | | | | | | | | | |")
            continue
        o, off = sm["online"], sm["offline"]
        att = o["slo_attainment"]
        mark = "" if att is None or att >= slo_target else " ✗"
        tt, tp = o["ttft_ms"], o["tpot_ms"]
        r = _ratios(p, s, sm, ceil, base, best_tok)
        label = p
        if p == BEST:
            label = "pd-static best " + ":".join(str(x) for x in sm["config"]["policy_cfg"]["static_split"])
        lines.append(
            f"| {label} | {s:g} | {o['requests']} | {_fmt(att, '.4f')}{mark} | "
            f"{_fmt(tt['p50'], '.0f')} / {_fmt(tt['p90'], '.0f')} / {_fmt(tt['p99'], '.0f')} | "
            f"{_fmt(tp['p50'], '.1f')} / {_fmt(tp['p90'], '.1f')} / {_fmt(tp['p99'], '.1f')} | "
            f"{off['output_tokens_per_s']:.0f} | {_fmt(r['ceiling_frac'], '.2f')} | "
            f"{_fmt(r['vs_pd_static'], '.2f', '×')} | {_fmt(r['vs_best_static'], '.2f', '×')} | "
            f"{_fmt(sm.get('kv', {}).get('peak_fraction'), '.2f')} | {sm['goodput_requests_per_s']:.2f} |")
    notes = []
    for s in sorted(set(list((ceil or {}).keys()) + list((rule or {}).keys()))):
        c = (ceil or {}).get(s, {})
        parts = [f"online work share {c['online_work_share']:.3f}"] if c else []
        if c.get("ceiling_tok_s") is not None:
            parts.append(f"ceiling {c['ceiling_tok_s']:.0f} tok/s (= instances × {c['per_instance_tok_s']:.0f} "
                         "tok/s per offline-only instance × (1 − share))")
        if (rule or {}).get(s):
            parts.append("pd-static split " + ":".join(str(x) for x in rule[s]) + " (P:D:O)")
        if parts:
            notes.append(f"* ×{s:g}: " + "; ".join(parts))
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


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
