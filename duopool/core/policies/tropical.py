"""``tropical``: SLO-aware multiplexing of prefills onto decode instances (Tropical).

An online prompt is prefilled on a decode instance ("multiplexing", no KV transfer) when it is short
(≤ ``short_prompt`` tokens), or when every running online decode there keeps at least one TPOT target of
slack after the predicted prefill time (slack = first-token time + TPOT × tokens so far − now). Otherwise
it goes to the prefill instance with the least queued work, whose queue runs shortest-job-first except
that a request whose TTFT slack is about to run out goes first. Offline work runs on the prefill
instances only, behind online prompts (all-offline batches, no preemption of a running step).
"""

from __future__ import annotations

from duopool.core.placement import Role
from duopool.core.policies.base import (
    SchedulingPolicy,
    candidates,
    fill_prefill_chunks,
    least_decoding,
    least_queued,
    register_policy,
)
from duopool.core.state import IDLE, Cluster, Instance, Req, StepPlan


@register_policy("tropical")
class Tropical(SchedulingPolicy):
    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        tpot = self.cfg.tpot_slo_s
        decs = candidates(cluster, Role.DECODE)
        if r.prompt <= self.cfg.short_prompt:
            return least_decoding(decs).idx
        t_pre = self.pm.prefill_time_s(r.prompt)
        best, best_slack = None, -1.0
        for d in decs:
            if d.waiting:  # one multiplexed prefill at a time per decode instance
                continue
            slack = d.min_online_slack(now, tpot) - t_pre - self.decode_time(d)
            if slack >= tpot and slack > best_slack:
                best, best_slack = d, slack
        if best is not None:
            return best.idx
        return least_queued(candidates(cluster, Role.PREFILL)).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        if inst.role == Role.DECODE or not r.online:
            return inst.idx
        return least_decoding(candidates(cluster, Role.DECODE)).idx

    def sjf_with_deadline(self, inst: Instance, now: float) -> list:
        """Shortest first, but requests whose TTFT slack is nearly spent go ahead of the order."""
        ttft = self.cfg.ttft_slo_s
        urgent, rest = [], []
        for r in inst.waiting:
            left = r.prompt - r.prefilled
            slack = r.arrival + ttft - now - self.pm.prefill_time_s(left)
            (urgent if slack < 0.5 * ttft else rest).append(r)
        urgent.sort(key=lambda r: r.arrival)
        rest.sort(key=lambda r: r.prompt - r.prefilled)
        return fill_prefill_chunks(urgent + rest, self.cfg.max_batched_tokens)

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.role == Role.PREFILL:
            if inst.waiting:
                return StepPlan(chunks=tuple(self.sjf_with_deadline(inst, now)), decode=False)
            chunks = self.offline_prefill_chunks(inst, cluster, self.cfg.max_batched_tokens - inst.n_decoding)
            if not chunks and not inst.n_decoding:
                return IDLE
            return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0)
        chunks = tuple(self.online_prefill_chunks(inst)) if inst.waiting else ()
        if not chunks and not inst.n_decoding:
            return IDLE
        return StepPlan(chunks=chunks, decode=inst.n_decoding > 0)
