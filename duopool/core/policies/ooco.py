"""``ooco``: latency-disaggregated pools (OOCO).

* Relaxed pool (the former prefill instances): online prefill > offline prefill > offline decode; a batch is
  all-online or all-offline. New offline requests are admitted only while the local offline decode batch
  is below the GEMM saturation batch size. An online arrival interrupts a running offline step (fast
  preemption: the step stops at the next layer boundary, its chunk is re-queued).
* Strict pool (the former decode instances): online decode; offline decode only while the predicted step
  stays under ``step_margin`` × TPOT target. While its KV use is under ``kv_watermark`` and its step
  under the margin, a strict instance *pulls* offline decodes: a binary search on the roofline model gives
  the largest context that keeps the batch — padded to the saturation batch size — within the target, and
  the relaxed pool hands over the offline decode closest to that length (its KV moves with it). When the
  step or memory runs over, offline decodes are evicted from the back of the running queue.
"""

from __future__ import annotations

import bisect

from duopool.core.placement import PoolName, Role
from duopool.core.policies.base import SchedulingPolicy, candidates, least_decoding, register_policy
from duopool.core.state import IDLE, OFFLINE, Cluster, Instance, Req, StepPlan


@register_policy("ooco")
class Ooco(SchedulingPolicy):
    fast_preemption = True
    scan_per_instance = 32
    pull_backoff_s = 0.05  # after a pull finds nothing, the instance waits this long before asking again

    def __init__(self, perf, cfg=None) -> None:
        super().__init__(perf, cfg)
        self._no_pull_until: dict[int, float] = {}

    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        relaxed = candidates(cluster, Role.PREFILL)
        return min(relaxed, key=lambda i: (i.queued_prefill_tokens, i.running_offline_prefill, i.idx)).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        if not r.online or inst.role != Role.PREFILL:
            return inst.idx  # offline decodes start in the relaxed pool, where their KV is
        return least_decoding(candidates(cluster, Role.DECODE)).idx

    # ---------------------------------------------------------------- relaxed pool
    def plan_relaxed(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.waiting:  # all-online batch
            return StepPlan(chunks=tuple(self.online_prefill_chunks(inst)), decode=False)
        admit = inst.n_dec[OFFLINE] + len(inst.waiting_off) < self.sat_batch
        chunks = self.offline_prefill_chunks(inst, cluster, self.cfg.max_batched_tokens - inst.n_decoding,
                                             admit_new=admit)
        if not chunks and not inst.n_decoding:
            return IDLE
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0, fast_preemptible=True)

    # ---------------------------------------------------------------- strict pool
    def step_target(self) -> float:
        return self.cfg.step_margin * self.cfg.tpot_slo_s

    def preferred_length(self, inst: Instance, n: int = 0, ctx: int = 0) -> int:
        """Largest context of one more offline decode keeping the batch — its linear layers padded to the
        saturation batch size — within the step target (OOCO's binary search, here in closed form on the
        same roofline, which is monotone and piecewise linear in the context)."""
        cmax = self.pm.decode_ctx_budget(inst.n_decoding + n + 1, self.step_target(), pad_to=self.sat_batch)
        return max(0, int(cmax - inst.ctx_sum() - ctx))

    def pull_candidates(self, cluster: Cluster) -> list[tuple[int, int, Req]]:
        """(context, rid, request) of offline decodes that may move: swapped ones, then up to
        ``scan_per_instance`` of
        each relaxed instance's running batch; sorted by context."""
        out = [(r.prompt + r.generated, r.rid, r) for r in cluster.resume if not r.moving]
        for src in cluster.instances:
            if src.pool != PoolName.RELAXED or not src.n_dec[OFFLINE]:
                continue
            k = 0
            steps = src.steps
            for r in src.decoding.values():
                if r.cls != OFFLINE or r.moving:
                    continue
                out.append((r.prompt + r.gen_join + steps - r.join_step, r.rid, r))
                k += 1
                if k >= self.scan_per_instance:
                    break
        out.sort()
        return out

    def plan_strict(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        target = self.step_target()
        evict = self.evict_for_budget(inst, target)
        if not evict and inst.kv_usage() > 0.98:
            evict = tuple(list(inst.newest_offline_decodes())[:4])
        chunks = tuple(self.online_prefill_chunks(inst)) if inst.waiting else ()  # leftovers after a role change
        pull: list[Req] = []
        if not evict and not chunks and now >= self._no_pull_until.get(inst.idx, 0.0) \
                and inst.kv_usage() < self.cfg.kv_watermark and self.decode_time(inst) < target:
            n_add, ctx_add = inst.incoming, inst.incoming * 2048
            free = inst.kv_free() - ctx_add
            cands = None
            for _ in range(self.cfg.pull_per_step):
                want = self.preferred_length(inst, n_add, ctx_add)
                if want <= 0:
                    break
                if cands is None:
                    cands = self.pull_candidates(cluster)
                j = bisect.bisect_right(cands, (want, 1 << 62)) - 1  # closest length not above the target
                while j >= 0 and cands[j][0] + cands[j][2].output > free:
                    j -= 1
                if j < 0:
                    break
                c, _rid, r = cands.pop(j)
                pull.append(r)
                n_add += 1
                ctx_add += c
                free -= c + r.output
            if not pull:
                self._no_pull_until[inst.idx] = now + self.pull_backoff_s
        if not inst.n_decoding and not chunks:
            return StepPlan(decode=False, pull=tuple(pull)) if pull else IDLE
        return StepPlan(chunks=chunks, decode=inst.n_decoding > 0, evict=evict, pull=tuple(pull))

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.role == Role.PREFILL:
            return self.plan_relaxed(inst, cluster, now)
        return self.plan_strict(inst, cluster, now)
