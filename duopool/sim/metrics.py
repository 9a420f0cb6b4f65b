"""Summary figures of a simulation run (the ``summary.json`` schema)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from duopool.core.state import Phase
from duopool.sim.engine import SimResult

SUMMARY_KEYS = (
    "policy",
    "online.requests",
    "online.slo_attainment",
    "online.ttft_ms.p50", "online.ttft_ms.p90", "online.ttft_ms.p99",
    "online.tpot_ms.p50", "online.tpot_ms.p90", "online.tpot_ms.p99",
    "offline.completed",
    "offline.output_tokens_per_s",
    "goodput_requests_per_s",
)


def _pct(a: np.ndarray) -> dict:
    if not len(a):
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


def latencies(res: SimResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ttft_ms, tpot_ms, done mask) per online request; unfinished requests get inf."""
    n = len(res.online)
    ttft = np.full(n, np.inf)
    tpot = np.full(n, np.inf)
    done = np.zeros(n, dtype=bool)
    for i, r in enumerate(res.online):
        if not math.isnan(r.first_token_t):
            ttft[i] = (r.first_token_t - r.arrival) * 1e3
        if r.phase == Phase.DONE:
            done[i] = True
            tpot[i] = 0.0 if r.output <= 1 else (r.finish_t - r.first_token_t) * 1e3 / (r.output - 1)
    return ttft, tpot, done


def summarize(res: SimResult) -> dict:
    cfg = res.config
    pc = cfg.policy_cfg
    ttft, tpot, done = latencies(res)
    n = len(res.online)
    ok_ttft = ttft <= pc.ttft_slo_s * 1e3
    ok_tpot = tpot <= pc.tpot_slo_s * 1e3
    ok = ok_ttft & ok_tpot & done
    dur = res.end_time if res.end_time > 0 else math.nan
    off_done = [r for r in res.offline if r.phase == Phase.DONE]
    started = [r for r in res.offline if r.prefilled > 0 or r.phase != Phase.QUEUED]
    pre = [r.preemptions for r in res.offline if r.preemptions]
    return {
        "policy": cfg.policy,
        "simulated": True,
        "config": {
            "hardware": cfg.hardware, "model": cfg.model, "tp": cfg.tp, "instances": cfg.instances,
            "seed": cfg.seed, "policy_cfg": asdict(pc),
        },
        "duration_s": res.end_time,
        "online": {
            "requests": n,
            "completed": int(done.sum()),
            "rejected": sum(1 for r in res.online if r.phase == Phase.REJECTED),
            "slo_attainment": float(ok.mean()) if n else None,
            "ttft_attainment": float(ok_ttft.mean()) if n else None,
            "tpot_attainment": float((ok_tpot & done).mean()) if n else None,
            "ttft_ms": _pct(ttft[np.isfinite(ttft)]),
            "tpot_ms": _pct(tpot[np.isfinite(tpot)]),
        },
        "offline": {
            "completed": len(off_done),
            "started": len(started),
            "output_tokens": int(res.offline_tokens),
            "output_tokens_per_s": res.offline_tokens / dur if dur == dur else 0.0,
            "completed_per_s": len(off_done) / dur if dur == dur else 0.0,
            # a finite backlog (--offline-limit): when its last request finished (None while any is left).
            # Compare capacities by this or by tok/s while backlogged, never by tok/s over a window in which
            # the backlog ran out.
            "drain_s": (max(r.finish_t for r in res.offline) if res.offline and len(off_done) == len(res.offline)
                        else None),
            "preempted_requests": len(pre),
            "preemptions": int(sum(pre)),
        },
        "goodput_requests_per_s": float(ok.sum()) / dur if n and dur == dur else 0.0,
        # peak KV use (÷ capacity, the highest instance), transfers and the memory waits behind them
        "kv": dict(res.kv),
        "sim": {"wall_s": res.wall_s, "events": res.events, "steps": res.steps,
                "role_changes": max(0, len(res.role_history) - 1)},
    }


def get_path(d: dict, dotted: str):
    cur = d
    for k in dotted.split("."):
        cur = cur[k]
    return cur
