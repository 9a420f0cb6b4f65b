"""Sizing of the ``pd-static`` baseline and the offline-throughput ceiling of a workload.

**The static split rule** (:func:`rule_static_split`). ``pd-static`` needs a (prefill, decode, offline-only)
instance count. A baseline sized by hand, or in hindsight, is not a fair one; this rule sizes it the way an
operator would, from the first ``window_s`` seconds (default 300) of the online trace only — already
rate-scaled, no later arrivals seen — cut into ``bucket_s`` = 30 s buckets of arrivals:

* prefill: per bucket, demand = Σ ``pm.prefill_time_s(prompt)`` / 30 (seconds of prefill work per second);
  ``P = max(1, ceil(max bucket demand / 0.7))`` (instances at most 70% busy with prefill in the peak bucket);
* decode: per bucket, the decode-token rate ``r = λ · mean(output − 1)`` (λ = arrivals / 30 s) and the mean
  decode context ``ctx = mean(prompt + output / 2)``. With ``D`` decode instances, Little's law gives the
  sequences decoding at once, ``C = r · t``, where ``t`` is the decode step time
  ``pm.chunked_step_time_s((), b, b · ctx)`` of the per-instance batch ``b = ceil(C / D)``; ``t`` is found by
  a short fixed-point iteration from ``b = 1`` (``t`` only grows, so it stops at the smallest fixed point or
  once ``t`` exceeds the target). ``D`` is the smallest count (≥ 1) such that in every bucket
  ``t ≤ 0.5 × TPOT SLO`` (headroom for the KV transfer, the wait to join the batch and prefill
  interference) and the batch's KV fits, ``b · ctx · D ≤ D · pm.kv_capacity_tokens()``. The peak bucket is
  λ_peak of the rule; every bucket is checked so that a bucket with fewer but longer requests counts too;
* offline-only: ``O = instances − P − D``. If that is negative, ``O = 0`` and P and D are cut in proportion
  (``P = round(instances · P / (P + D))`` kept in ``[1, instances − 1]``, ``D = instances − P``).

The TTFT SLO enters only as a check that is reported: the longest prompt of the window should prefill well
within it (no instance count helps a single prompt). With fewer than 2 instances there is no P/D split
(:class:`ValueError`); with 2 the split is ``1:1:0``.

**The practical ceiling** (:func:`practical_ceiling`). The most offline output a cluster could make next to
the online load: every instance-second the online work does not need runs the offline backlog as well as a
dedicated offline-only instance does, ``instances × offline_capacity_tok_s × (1 − online_work_share)``.

* :func:`online_work_share`: the share of the cluster's time the online work needs by the roofline,
  ``Σ_r [pm.prefill_time_s(prompt_r) + (output_r − 1) · c(ctx_r)] / (span · instances)``, with
  ``span`` = last − first arrival, ``ctx_r = prompt_r + output_r / 2`` and ``c(ctx)`` the per-token cost of
  decoding in a batch of ``B = pm.saturation_batch()`` sequences of that context,
  ``pm.chunked_step_time_s((), B, B · ctx) / B`` — online decode is assumed batched at the saturation batch,
  so it pays its share of the linear layers at full efficiency and its own attention. It grows linearly with
  the rate scale (the same work in a shorter span).
* :func:`offline_capacity_tok_s`: offline output tokens/s of one instance running only the offline backlog
  (the simulator with ``pd-static`` at split ``0:0:1`` for ``duration_s``), cached per process.

Pure functions (the capacity runs the simulator, no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from duopool.core.perfmodel import Efficiency, PerfModel
from duopool.core.policies import PolicyConfig
from duopool.sim.engine import SimConfig, Simulator
from duopool.sim.metrics import summarize
from duopool.traces import Trace

BUCKET_S = 30.0
PREFILL_UTIL = 0.7
DECODE_TPOT_FRAC = 0.5
_FIXED_POINT_ITERS = 30


@dataclass(frozen=True)
class SplitSizing:
    """A (prefill, decode, offline-only) split and the figures the rule measured to choose it.

    Unpacks as the split: ``p, d, o = rule_static_split(...)``."""

    prefill: int
    decode: int
    offline: int
    window_s: float
    requests: int  # online arrivals inside the window
    peak_prefill_demand: float  # seconds of prefill work per second, in the busiest bucket
    prefill_needed: int  # P before any cut
    peak_decode_tok_s: float  # decode tokens per second (λ · mean(output − 1)), busiest bucket
    decode_ctx: float  # mean decode context of that bucket
    decode_step_s: float  # fixed-point decode step time at the chosen D, worst bucket
    decode_batch: int  # per-instance decode batch at the chosen D, worst bucket
    decode_needed: int  # D before any cut
    decode_feasible: bool  # False when no D up to the search limit met the targets
    max_prefill_s: float  # longest prompt's prefill time in the window
    ttft_ok: bool  # max_prefill_s <= TTFT SLO
    cut: bool  # P + D exceeded the instances and were cut

    def __iter__(self):
        return iter(self.split)

    @property
    def split(self) -> tuple[int, int, int]:
        return (self.prefill, self.decode, self.offline)

    def explain(self) -> str:
        """One line: the split and why."""
        s = (f"{self.prefill}:{self.decode}:{self.offline} (P:D:O) from the first {self.window_s:g} s "
             f"({self.requests} req): peak prefill demand {self.peak_prefill_demand:.2f} s/s -> P {self.prefill_needed}; "
             f"peak decode {self.peak_decode_tok_s:.0f} tok/s at ctx {self.decode_ctx:.0f} -> D {self.decode_needed} "
             f"(batch {self.decode_batch}, step {self.decode_step_s * 1e3:.1f} ms)")
        if not self.decode_feasible:
            s += "; decode target not met at any D searched"
        if self.cut:
            s += "; P and D cut to fit the instances"
        if not self.ttft_ok:
            s += f"; longest prompt prefills in {self.max_prefill_s:.2f} s, over the TTFT SLO"
        return s


def _decode_fixed_point(pm: PerfModel, tok_s: float, ctx: float, d: int, budget_s: float,
                        kv_cap: int) -> tuple[bool, float, int]:
    """(meets the targets, step time, per-instance batch) for ``d`` decode instances, decode-token rate
    ``tok_s`` and mean context ``ctx``: iterate C = tok_s · t, b = ceil(C / d), t = step(b, b · ctx)."""
    b = 1
    t = pm.chunked_step_time_s((), b, b * ctx)
    for _ in range(_FIXED_POINT_ITERS):
        if t > budget_s or b * ctx > kv_cap:
            return False, t, b
        nb = max(1, math.ceil(tok_s * t / d - 1e-9))
        if nb == b:
            break
        b = nb
        t = pm.chunked_step_time_s((), b, b * ctx)
    return t <= budget_s and b * ctx <= kv_cap, t, b


def rule_static_split(trace: Trace | None, pm: PerfModel, instances: int, ttft_slo_s: float, tpot_slo_s: float,
                      window_s: float = 300.0, bucket_s: float = BUCKET_S, prefill_util: float = PREFILL_UTIL,
                      decode_tpot_frac: float = DECODE_TPOT_FRAC) -> SplitSizing:
    """Size ``pd-static`` by the rule in the module docstring from the first ``window_s`` seconds of the
    (rate-scaled) online ``trace``. Returns a :class:`SplitSizing` (unpacks as ``P, D, O``)."""
    if int(instances) != instances or instances < 2:
        raise ValueError(f"rule_static_split: 'instances' must be an integer >= 2 for a P/D split, got {instances}")
    for name, v in (("ttft_slo_s", ttft_slo_s), ("tpot_slo_s", tpot_slo_s), ("window_s", window_s),
                    ("bucket_s", bucket_s)):
        if not v > 0:
            raise ValueError(f"rule_static_split: {name!r} must be > 0, got {v}")
    for name, v in (("prefill_util", prefill_util), ("decode_tpot_frac", decode_tpot_frac)):
        if not 0 < v <= 1:
            raise ValueError(f"rule_static_split: {name!r} must be in (0, 1], got {v}")
    n = int(instances)
    if trace is None:
        arr = np.zeros(0)
        inp = out = np.zeros(0, dtype=np.int64)
    else:
        sel = trace.arrival_s < window_s
        arr, inp, out = trace.arrival_s[sel], trace.input_tokens[sel], trace.output_tokens[sel]
    n_buckets = max(1, math.ceil(window_s / bucket_s))
    bucket = np.minimum((arr // bucket_s).astype(np.int64), n_buckets - 1)
    pre_s = _prefill_times(pm, inp)
    demand = np.bincount(bucket, weights=pre_s, minlength=n_buckets) / bucket_s
    peak_pre = float(demand.max()) if len(demand) else 0.0
    p_need = max(1, math.ceil(peak_pre / prefill_util - 1e-9))

    counts = np.bincount(bucket, minlength=n_buckets)
    dec_tok = np.bincount(bucket, weights=(out - 1).astype(np.float64), minlength=n_buckets) / bucket_s
    ctx_sum = np.bincount(bucket, weights=inp + out / 2.0, minlength=n_buckets)
    rows = [(float(dec_tok[k]), float(ctx_sum[k] / counts[k])) for k in range(n_buckets) if counts[k]]
    budget = decode_tpot_frac * tpot_slo_s
    kv_cap = pm.kv_capacity_tokens()
    limit = 8 * n
    d_need, feasible, worst = limit, False, (0.0, 1)
    for d in range(1, limit + 1):
        ok, worst = True, (0.0, 1)
        for tok_s, ctx in rows:
            good, t, b = _decode_fixed_point(pm, tok_s, ctx, d, budget, kv_cap)
            ok = ok and good
            worst = max(worst, (t, b))
            if not ok:
                break
        if ok:
            d_need, feasible = d, True
            break
    if rows:
        k_peak = max(range(len(rows)), key=lambda i: rows[i][0])
        peak_dec, peak_ctx = rows[k_peak]
    else:
        peak_dec, peak_ctx = 0.0, 0.0

    p, d = p_need, d_need
    cut = p + d > n
    if cut:
        p = min(n - 1, max(1, round(n * p_need / (p_need + d_need))))
        d = n - p
    max_pre = float(pre_s.max()) if len(pre_s) else 0.0
    return SplitSizing(prefill=p, decode=d, offline=n - p - d, window_s=float(window_s), requests=int(len(arr)),
                       peak_prefill_demand=peak_pre, prefill_needed=p_need, peak_decode_tok_s=peak_dec,
                       decode_ctx=peak_ctx, decode_step_s=float(worst[0]), decode_batch=int(worst[1]),
                       decode_needed=d_need, decode_feasible=feasible, max_prefill_s=max_pre,
                       ttft_ok=max_pre <= ttft_slo_s, cut=cut)


def _prefill_times(pm: PerfModel, prompts: np.ndarray) -> np.ndarray:
    """``pm.prefill_time_s`` per prompt, computed once per distinct length."""
    if not len(prompts):
        return np.zeros(0)
    uniq, inv = np.unique(prompts, return_inverse=True)
    return np.array([pm.prefill_time_s(int(x)) for x in uniq])[inv]


def decode_token_cost_s(pm: PerfModel, ctx: np.ndarray | float) -> np.ndarray:
    """Per-token decode cost at context ``ctx`` in a batch of ``B = pm.saturation_batch()`` such sequences:
    ``pm.chunked_step_time_s((), B, B · ctx) / B`` (vectorised over distinct contexts)."""
    c = np.atleast_1d(np.asarray(ctx, dtype=np.float64))
    if not len(c):
        return np.zeros(0)
    bsz = pm.saturation_batch()
    uniq, inv = np.unique(c, return_inverse=True)
    return np.array([pm.chunked_step_time_s((), bsz, bsz * float(x)) / bsz for x in uniq])[inv]


def online_work_share(trace: Trace | None, pm: PerfModel, instances: int) -> float:
    """Share of the cluster's time (span × instances) the online work needs by the roofline; see the module
    docstring. 0 without an online trace."""
    if int(instances) != instances or instances < 1:
        raise ValueError(f"online_work_share: 'instances' must be an integer >= 1, got {instances}")
    if trace is None or not len(trace):
        return 0.0
    span = trace.duration_s
    if not span > 0:
        raise ValueError(f"online_work_share: trace {trace.name!r} needs arrivals spread over a positive span")
    inp = trace.input_tokens
    out = trace.output_tokens
    work = _prefill_times(pm, inp).sum()
    work += float(np.sum((out - 1) * decode_token_cost_s(pm, inp + out / 2.0)))
    return float(work / (span * instances))


def practical_ceiling(online: Trace | None, pm: PerfModel, instances: int, per_instance_tok_s: float) -> float:
    """``instances × per_instance_tok_s × (1 − online_work_share)`` (at least 0): the offline output tok/s the
    cluster could make next to ``online`` (see the module docstring)."""
    if not per_instance_tok_s >= 0:
        raise ValueError(f"practical_ceiling: 'per_instance_tok_s' must be >= 0, got {per_instance_tok_s}")
    share = online_work_share(online, pm, instances)
    return instances * per_instance_tok_s * max(0.0, 1.0 - share)


_CAPACITY_CACHE: dict[tuple, float] = {}


def offline_capacity_tok_s(offline: Trace, hardware: str, model: str, tp: int = 1, seed: int = 0,
                           duration_s: float = 3600.0, efficiency: Efficiency | None = None) -> float:
    """Offline output tokens/s of ONE instance that runs only the offline backlog: the simulator with
    ``pd-static`` at split ``0:0:1`` (continuous batching, chunked prefill), no online trace, for
    ``duration_s`` simulated seconds (the backlog is endless, sampled with ``seed``). Cached per
    (hardware, model, tp, offline trace, seed, duration, efficiency) within the process."""
    if offline is None or not len(offline):
        raise ValueError("offline_capacity_tok_s: 'offline' must be a non-empty trace")
    if not duration_s > 0:
        raise ValueError(f"offline_capacity_tok_s: 'duration_s' must be > 0, got {duration_s}")
    key = (hardware, model, int(tp), offline.name, len(offline), int(offline.input_tokens.sum()),
           int(offline.output_tokens.sum()), int(seed), float(duration_s), efficiency)
    v = _CAPACITY_CACHE.get(key)
    if v is None:
        cfg = SimConfig(policy="pd-static", hardware=hardware, model=model, tp=tp, instances=1, seed=seed,
                        policy_cfg=PolicyConfig(static_split=(0, 0, 1)), efficiency=efficiency,
                        max_time_s=duration_s)
        v = float(summarize(Simulator(cfg, None, offline).run())["offline"]["output_tokens_per_s"])
        _CAPACITY_CACHE[key] = v
    return v
