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
from duopool.core.policies.base import candidates, register_policy
from duopool.core.policies.online_priority import OnlinePriority
from duopool.core.policies.ooco import Ooco
from duopool.core.state import IDLE, OFFLINE, ONLINE, Cluster, Instance, Req, SetRole, StepPlan


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
        target = self.p.step_target()
        lo, hi = 1, self.p.cfg.max_num_seqs  # batch per instance that fits the TPOT target
        pm = self.p.pm
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pm.chunked_step_time_s((), mid, mid * ctx) <= target:
                lo = mid
            else:
                hi = mid - 1
        by_time = math.ceil(self.p.dopd_decode_headroom * n_on / lo)
        # and their KV must fit: the decode contexts, with the same headroom, in 90% of each instance's memory
        by_memory = math.ceil(self.p.dopd_decode_headroom * n_on * ctx / (0.9 * self.p.kv_capacity))
        return max(1, by_time, by_memory)

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
        if need_p + n_need_d > n:  # both sides short: share the instances in proportion to the two needs
            want_p = round(n * need_p / (need_p + n_need_d))
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

    dopd_decode_headroom = 2.0  # decode instances for this × the decode batch the TPOT target allows

    def __init__(self, perf, cfg=None) -> None:
        super().__init__(perf, cfg)
        self.ctrl = RatioController(self)
        self.tick_s = self.cfg.dopd_tick_s

    def tick(self, cluster: Cluster, now: float) -> list[SetRole]:
        return self.ctrl.tick(cluster, now)


@register_policy("dopd")
class Dopd(_RatioControlled, OnlinePriority):
    """The ratio controller over online-priority co-location, with the decode instances held to the online
    requests' deadlines: offline decodes are evicted past the deadline-based step target
    (:meth:`online_step_target`), swapped ones come back and new offline prompts are admitted only while a
    decode instance has room under it."""

    count_offline_decode = True  # offline decodes share the decode instances here
    admit_frac = 0.8  # offline work joins a decode instance only while its step is under this × target

    def _has_room(self, d: Instance, now: float) -> bool:
        return d.n_decoding + d.incoming + len(d.inbox) < self.cfg.max_num_seqs \
            and self.decode_time(d, d.incoming + len(d.inbox), (d.incoming + len(d.inbox)) * 2048) \
            < self.admit_frac * self.online_step_target(d, now)

    def decode_room(self, cluster: Cluster) -> bool:
        now = cluster.now
        return any(d.role == Role.DECODE and not d.offline_only and self._has_room(d, now)
                   for d in cluster.instances)

    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        if self.transfer_breaks_tpot(r):
            return self.route_local_decode(candidates(cluster, Role.PREFILL)).idx
        return self.overflow_prefill(r, cluster.instances[super().route(r, cluster, now)], cluster).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        if self.decodes_in_place(r, inst):
            return inst.idx
        return super().decode_target(r, inst, cluster, now)

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.role != Role.DECODE:
            if inst.online_decoding:
                return self.plan_local_online_decode(inst, cluster, now)
            return super().plan(inst, cluster, now)
        if inst.waiting:  # a burst's overflow (or leftovers after a role change): chunks inside the target
            return self.plan_local_online_decode(inst, cluster, now)
        target = self.online_step_target(inst, now)
        evict = self.evict_for_budget(inst, target)
        pull = () if evict or not self._has_room(inst, now) else self.resume_pulls(inst, cluster, 4)
        if not inst.n_decoding:
            return StepPlan(decode=False, pull=pull) if pull else IDLE
        return StepPlan(decode=True, evict=evict, pull=pull)


@register_policy("ooco+dopd")
class OocoDopd(_RatioControlled, Ooco):
    count_offline_decode = False  # the relaxed pool decodes offline work
