"""``dopd`` and ``ooco+dopd``: dynamic prefill/decode ratio (DOPD).

Every ``dopd_tick_s`` the controller measures the online prefill demand of the last interval as seconds of
prefill work per second — Σ predicted prefill time of the prompts that arrived, so the convexity of
prefill cost in length (and the variance of lengths) counts — forecasts the next interval with Holt's
linear smoothing (level + trend, proactive), and sets the number of prefill instances to
``ceil(forecast / dopd_target_util)``, keeping enough decode instances for the decode batch at the TPOT target (online
decodes; with ``dopd`` also the offline ones, which share the decode instances); instances neither role needs go to prefill (the offline backlog is prefill-bound).
Instances change role one or two per tick; the owner drains what a new role cannot run.
``dopd`` uses online-priority handling of offline work; ``ooco+dopd`` combines the controller with OOCO.
"""

from __future__ import annotations

import math

from duopool.core.placement import PoolName, Role
from duopool.core.policies.base import register_policy
from duopool.core.policies.online_priority import OnlinePriority
from duopool.core.policies.ooco import Ooco
from duopool.core.state import OFFLINE, ONLINE, Cluster, SetRole


class RatioController:
    """DOPD's monitor → forecast → target ratio loop (pure; state is the forecast)."""

    def __init__(self, policy) -> None:
        self.p = policy
        self.level: float | None = None
        self.trend = 0.0
        self.last_t = 0.0
        self.last_prefill_s = 0.0
        self.history: list[tuple[float, float, int]] = []  # (time, observed demand, prefill instances)

    def forecast(self, observed: float) -> float:
        a, b = self.p.cfg.dopd_alpha, self.p.cfg.dopd_beta
        if self.level is None:
            self.level = observed
            return observed
        prev = self.level
        self.level = a * observed + (1 - a) * (self.level + self.trend)
        self.trend = b * (self.level - prev) + (1 - b) * self.trend
        return max(0.0, self.level + self.trend)

    def decode_instances_needed(self, cluster: Cluster) -> int:
        decs = [i for i in cluster.instances if not i.offline_only]
        classes = (ONLINE, OFFLINE) if self.p.count_offline_decode else (ONLINE,)
        n_run = sum(i.n_dec[c] for i in decs for c in classes)
        n_on = n_run + sum(i.incoming + len(i.inbox) for i in decs)
        if n_on == 0:
            return 1
        ctx = sum(i.ctx_sum(c) for i in decs for c in classes) / max(1, n_run)
        target = self.p.cfg.step_margin * self.p.cfg.tpot_slo_s
        lo, hi = 1, self.p.cfg.max_num_seqs  # batch per instance that fits the TPOT target
        pm = self.p.pm
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pm.chunked_step_time_s((), mid, mid * ctx) <= target:
                lo = mid
            else:
                hi = mid - 1
        return max(1, math.ceil(1.5 * n_on / lo))

    def tick(self, cluster: Cluster, now: float) -> list[SetRole]:
        dt = now - self.last_t
        if dt <= 0:
            return []
        observed = (cluster.arrived_prefill_s - self.last_prefill_s) / dt
        self.last_t, self.last_prefill_s = now, cluster.arrived_prefill_s
        demand = self.forecast(observed)
        insts = [i for i in cluster.instances if not i.offline_only]
        n = len(insts)
        n_need_d = self.decode_instances_needed(cluster)
        need_p = max(self.p.cfg.dopd_min_prefill, math.ceil(demand / self.p.cfg.dopd_target_util))
        # instances neither role needs for online traffic go to prefill: the offline backlog is
        # prefill-bound (arXiv: ~9 prompt tokens per output token)
        want_p = max(need_p, n - n_need_d)
        want_p = max(1, min(want_p, n - 1))
        pre = [i for i in insts if i.role == Role.PREFILL]
        dec = [i for i in insts if i.role == Role.DECODE]
        self.history.append((now, observed, len(pre)))
        acts: list[SetRole] = []
        if want_p > len(pre) and len(dec) > 1:
            for i in sorted(dec, key=lambda i: (i.n_dec[ONLINE] + i.incoming, i.idx))[: min(2, want_p - len(pre))]:
                acts.append(SetRole(i.idx, Role.PREFILL, PoolName.RELAXED))
        elif want_p < len(pre) - 1 or (want_p < len(pre) and observed < demand):  # shrink with hysteresis
            for i in sorted(pre, key=lambda i: (i.queued_prefill_tokens, i.idx))[:1]:
                acts.append(SetRole(i.idx, Role.DECODE, PoolName.STRICT))
        return acts


class _RatioControlled:
    """Adds DOPD's P/D-ratio controller (its ``tick``) to a policy."""

    def __init__(self, perf, cfg=None) -> None:
        super().__init__(perf, cfg)
        self.ctrl = RatioController(self)
        self.tick_s = self.cfg.dopd_tick_s

    def tick(self, cluster: Cluster, now: float) -> list[SetRole]:
        return self.ctrl.tick(cluster, now)


@register_policy("dopd")
class Dopd(_RatioControlled, OnlinePriority):
    count_offline_decode = True  # offline decodes share the decode instances here


@register_policy("ooco+dopd")
class OocoDopd(_RatioControlled, Ooco):
    count_offline_decode = False  # the relaxed pool decodes offline work
