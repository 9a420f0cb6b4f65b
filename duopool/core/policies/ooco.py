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

What the online requests need sets the margins (ours, beyond the paper):

* the step target is ``step_margin`` × TPOT, lowered to what the tightest online request decoding on the
  instance can afford: (its deadline − now) / its tokens still to generate, where the deadline is
  ``deadline_margin`` × TPOT × (max tokens − 1) after its first token — so the KV transfer and the wait to
  join the batch, which land in a short request's TPOT, are paid for by shorter steps (offline decodes
  are evicted to get there, and pulled again once the short requests are gone);
* a request whose KV transfer would take more than ``local_decode_frac`` of its whole TPOT budget
  (long prompt, few output tokens) decodes where it was prefilled; a relaxed instance with online decodes
  keeps its step within the same deadline-based target (offline decodes evicted as far as needed; such
  requests are routed to the relaxed instance with the least offline decode work).

The simulator's traces give each request's output length, which stands in for the ``max_tokens`` a live
request carries; a request that stops early is protected only by ``step_margin``.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import islice
from operator import itemgetter

from duopool.core.placement import PoolName, Role
from duopool.core.policies.base import SchedulingPolicy, candidates, least_decoding, register_policy
from duopool.core.state import DECODE, IDLE, OFFLINE, Cluster, Instance, Req, StepPlan

Candidates = list[tuple[int, int, Req]]  # (context − the instance's step count, rid, request), sorted
_base = itemgetter(0)


@register_policy("ooco")
class Ooco(SchedulingPolicy):
    fast_preemption = True
    scan_per_instance = 32
    pull_backoff_s = 0.05  # after a pull finds nothing, the instance waits this long before asking again

    def __init__(self, perf, cfg=None) -> None:
        super().__init__(perf, cfg)
        self._no_pull_until: dict[int, float] = {}
        self._cands: dict[int, tuple[Instance, int, Candidates]] = {}  # idx -> (instance, version, list)

    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        relaxed = candidates(cluster, Role.PREFILL)
        if self.transfer_breaks_tpot(r):  # it will decode where it prefills: pick the least offline decode work
            return self.route_local_decode(relaxed).idx
        best = min(relaxed, key=lambda i: (i.queued_prefill_tokens, i.running_offline_prefill, i.idx))
        return self.overflow_prefill(r, best, cluster).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        if not r.online or inst.role != Role.PREFILL or self.decodes_in_place(r, inst):
            return inst.idx  # offline decodes start in the relaxed pool, where their KV is
        return least_decoding(candidates(cluster, Role.DECODE)).idx

    # ---------------------------------------------------------------- relaxed pool
    def plan_relaxed(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.online_decoding:
            return self.plan_local_online_decode(inst, cluster, now)
        if inst.waiting:  # all-online batch
            return StepPlan(chunks=tuple(self.online_prefill_chunks(inst)), decode=False)
        admit = inst.n_dec[OFFLINE] + len(inst.waiting_off) < self.sat_batch
        chunks = self.offline_prefill_chunks(inst, cluster, self.cfg.max_batched_tokens - inst.n_decoding,
                                             admit_new=admit)
        if not chunks and not inst.n_decoding:
            return IDLE
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0, fast_preemptible=True)

    # ---------------------------------------------------------------- strict pool
    def preferred_length(self, inst: Instance, n: int = 0, ctx: int = 0, target: float | None = None) -> int:
        """Largest context of one more offline decode keeping the batch — its linear layers padded to the
        saturation batch size — within the step target (OOCO's binary search, here in closed form on the
        same roofline, which is monotone and piecewise linear in the context)."""
        cmax = self.pm.decode_ctx_budget(inst.n_decoding + n + 1, target or self.step_target(),
                                         pad_to=self.sat_batch)
        return max(0, int(cmax - inst.ctx_sum() - ctx))

    def relaxed_candidates(self, src: Instance) -> Candidates:
        """(context − ``src.steps``, rid, request) of the first ``scan_per_instance`` offline decodes of
        relaxed instance ``src``'s running batch that may move, sorted. The contexts of one batch advance
        together, so the list is kept per instance and rebuilt only when ``src.version`` moves."""
        hit = self._cands.get(src.idx)
        if hit is not None and hit[0] is src and hit[1] == src.version:
            return hit[2]
        cap = self.scan_per_instance
        out = [(r.prompt + r.gen_join - r.join_step, r.rid, r)
               for r in islice(src.decoding.values(), cap) if r.cls == OFFLINE and not r.moving]
        if len(out) < cap < len(src.decoding):  # some of the first ones may not move: scan further
            for r in islice(src.decoding.values(), cap, None):
                if r.cls == OFFLINE and not r.moving:
                    out.append((r.prompt + r.gen_join - r.join_step, r.rid, r))
                    if len(out) >= cap:
                        break
        out.sort()
        self._cands[src.idx] = (src, src.version, out)
        return out

    def pick_pull(self, cluster: Cluster, sources: list[tuple[int, Candidates]], want: int, free: int,
                  taken: set[int]) -> tuple[int, Req] | None:
        """(context, request) of the offline decode to pull: among the swapped ones and the ``sources``
        (step count and :meth:`relaxed_candidates` of each relaxed instance) not in ``taken`` (rids) whose
        context + output fits ``free``, the longest context not above ``want`` (ties: the larger rid)."""
        best_c, best_rid, best = -1, -1, None
        for r in cluster.resume:
            if r.moving or r.rid in taken:
                continue
            c = r.prompt + r.generated
            if c <= want and c + r.output <= free and (c > best_c or (c == best_c and r.rid > best_rid)):
                best_c, best_rid, best = c, r.rid, r
        for steps, cands in sources:
            j = bisect_right(cands, want - steps, key=_base) - 1  # longest context not above ``want``
            while j >= 0:
                base, rid, r = cands[j]
                c = base + steps
                if c < best_c or (c == best_c and rid < best_rid):
                    break  # the rest of this list cannot beat the best so far
                if c + r.output <= free and rid not in taken:
                    best_c, best_rid, best = c, rid, r
                    break
                j -= 1
        return None if best is None else (best_c, best)

    def plan_strict(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.waiting:  # overflow prompts (or leftovers after a role change): chunks inside the target
            return self.plan_local_online_decode(inst, cluster, now)
        target = self.online_step_target(inst, now)
        step = self.decode_time(inst)
        evict = self.evict_for_budget(inst, target) if step > target else ()
        usage = inst.kv_usage()
        if not evict and usage > 0.98:
            evict = tuple(list(inst.newest_offline_decodes())[:4])
        pull: list[Req] = []
        if not evict and now >= self._no_pull_until.get(inst.idx, 0.0) \
                and usage < self.cfg.kv_watermark and step < target:
            n_add = inst.incoming
            ctx_add = inst.incoming_ctx + (inst.incoming - inst.incoming_known) * 2048
            # a known incoming move's KV is reserved already (kv_reserved) and its context is taken off once
            # more here: a margin for the contexts that grow while moves land (subtracting only the guessed
            # part pulled more and broke TPOT: ooco 60 s 94.8% SLO against 100% in three runs with it)
            free = inst.kv_free() - ctx_add
            taken: set[int] = set()
            sources: list[tuple[int, Candidates]] | None = None
            for _ in range(self.cfg.pull_per_step):
                want = self.preferred_length(inst, n_add, ctx_add, target)
                if want <= 0:
                    break
                if sources is None:
                    relaxed = PoolName.RELAXED
                    sources = [(src.steps, self.relaxed_candidates(src)) for src in cluster.instances
                               if src.pool == relaxed and src.n_dec[OFFLINE]]
                pick = self.pick_pull(cluster, sources, want, free, taken)
                if pick is None:
                    break
                c, r = pick
                taken.add(r.rid)
                pull.append(r)
                n_add += 1
                ctx_add += c
                free -= c + r.output
            if not pull:
                self._no_pull_until[inst.idx] = now + self.pull_backoff_s
        if not inst.n_decoding:
            return StepPlan(decode=False, pull=tuple(pull)) if pull else IDLE
        if not evict and not pull:
            return DECODE
        return StepPlan(decode=True, evict=evict, pull=tuple(pull))

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.role == Role.PREFILL:
            return self.plan_relaxed(inst, cluster, now)
        return self.plan_strict(inst, cluster, now)
