"""``hygen``: SLO-aware elastic co-location (HyGen).

Every instance is mixed (prefill and decode together, chunked prefill). Each step is formed in two phases
against a latency budget (``hygen_budget_frac`` × TPOT SLO — what HyGen's SLO-aware profiler binary-searches;
``duopool sim --hygen-budget-frac`` overrides it), using the fitted linear latency predictor:

1. online: all running decodes plus online prefill chunks, FIFO; if offline decodes leave no room for an
   online chunk, offline decodes are preempted (evicted from the back of the running queue);
2. offline: the remaining budget is filled with offline prefill chunks (continuing ones first, then the
   backlog), admitted only while the decode part stays under half the budget and KV use under the
   watermark. The backlog is ordered for prefix sharing (grouped by shared prefix blocks); preempted
   offline requests come back oldest first, and one queued longer than ``starvation_s`` is admitted even
   past the decode-share rule (freshness), so no offline request starves.
"""

from __future__ import annotations

import math

from duopool.core.placement import PoolName, Role
from duopool.core.policies.base import SchedulingPolicy, candidates, register_policy
from duopool.core.predictor import predictor_for
from duopool.core.state import IDLE, OFFLINE, Cluster, Instance, Req, StepPlan


@register_policy("hygen")
class HyGen(SchedulingPolicy):
    min_online_chunk = 256
    ttft_margin = 0.8  # plan online prefills to finish within this share of the TTFT SLO
    slack_use = 0.9  # a step may run past the budget by at most this share of the online decodes' TPOT slack

    def __init__(self, perf, cfg=None) -> None:
        super().__init__(perf, cfg)
        self.pred = predictor_for(perf)
        self.budget_ms = self.cfg.hygen_budget_frac * self.cfg.tpot_slo_s * 1e3

    def layout(self, n: int) -> list[tuple[Role, PoolName, bool]]:
        return [(Role.MIXED, PoolName.RELAXED, False)] * n

    def order_backlog(self, reqs: list[Req]) -> list[Req]:
        if not any(r.prefix for r in reqs):
            return reqs
        return sorted(reqs, key=lambda r: (r.prefix or (1 << 62,)))  # stable: ties keep arrival order

    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        insts = candidates(cluster, Role.MIXED)
        return min(insts, key=lambda i: (i.queued_prefill_tokens + 64 * i.n_dec[0], i.idx)).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        return inst.idx

    def online_need_tokens(self, inst: Instance, now: float) -> int:
        """Prompt tokens this step must prefill so that every queued online request, served FIFO at this
        rate, still gets its first token within ``ttft_margin`` × its TTFT SLO (steps of one budget each);
        at least ``min_online_chunk`` (or the whole first prompt, if shorter). Offline decodes are preempted
        to make this room: the TTFT of a long prompt behind a large offline batch depends on it."""
        first = inst.waiting[0]
        need = min(first.prompt - first.prefilled, self.min_online_chunk)
        step = self.budget_ms / 1e3
        ttft = self.cfg.ttft_slo_s * self.ttft_margin
        total = 0
        for r in inst.waiting:
            total += r.prompt - r.prefilled
            steps_left = max(1.0, (r.arrival + ttft - now) / step - 1.0)  # the last step ends the prefill
            need = max(need, math.ceil(total / steps_left))
        return need

    def _pred(self, s_p: float, s_d: float, n_p: int, n_d: int) -> float:
        return self.pred.predict_ms(s_p, s_d, n_p, n_d)

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        budget = self.budget_ms
        n_d, s_d = inst.n_decoding, inst.ctx_sum()
        evict: list[Req] = []
        # phase 1: online
        chunks: list = []
        s_p, n_p = 0, 0
        if inst.waiting:
            room = self.pred.max_prefill_tokens(budget, s_d, 1, n_d)
            need = self.online_need_tokens(inst, now)
            if room < need and inst.n_dec[OFFLINE]:
                for r in inst.newest_offline_decodes():  # preempt offline decodes for the online batch
                    evict.append(r)
                    n_d -= 1
                    s_d -= inst.ctx_of(r)
                    room = self.pred.max_prefill_tokens(budget, s_d, 1, n_d)
                    if room >= need:
                        break
            if need > room:
                # past the budget only as far as the running online decodes' TPOT slack allows
                slack_ms = 1e3 * self.slack_use * (inst.min_online_slack(now, self.cfg.tpot_slo_s)
                                                   + self.cfg.tpot_slo_s)
                allowed = room
                if slack_ms > budget:
                    allowed = self.pred.max_prefill_tokens(min(slack_ms, 1e6), s_d, 1, n_d)
                need = min(need, max(room, allowed, self.min_online_chunk))
            left = min(max(room, need), self.cfg.max_batched_tokens)
            for r in inst.waiting:
                if left <= 0:
                    break
                c = min(r.prompt - r.prefilled, left)
                chunks.append((r, c))
                left -= c
                s_p += c
                n_p += 1
        elif inst.n_dec[OFFLINE] and self._pred(0, s_d, 0, n_d) > budget:
            ev = self.evict_for_budget(inst, budget / 1e3)
            evict.extend(ev)
            n_d -= len(ev)
            s_d -= sum(inst.ctx_of(r) for r in ev)
        # phase 2: offline fill of the remaining latency budget
        if not evict:
            room = self.pred.max_prefill_tokens(budget, s_d, n_p + 1, n_d, s_p0=s_p)
            room = min(room, self.cfg.max_batched_tokens - s_p)
            if room >= 64:
                decode_share_ok = self._pred(0, s_d, 0, n_d) < self.cfg.hygen_decode_share * budget
                starving = bool(cluster.backlog) and now - cluster.backlog[0].queued_t > self.cfg.starvation_s \
                    and not inst.waiting_off and inst.n_dec[OFFLINE] == 0
                admit = (decode_share_ok or starving) and inst.kv_usage() < self.cfg.kv_watermark
                chunks.extend(self.offline_prefill_chunks(inst, cluster, room, admit_new=admit))
        pull = ()
        if not evict and cluster.resume and self._pred(0, s_d, 0, n_d) < self.cfg.hygen_decode_share * budget:
            pull = self.resume_pulls(inst, cluster, 2)
        if not chunks and not inst.n_decoding:
            return StepPlan(decode=False, pull=pull) if pull else IDLE
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0, evict=tuple(evict), pull=pull)
