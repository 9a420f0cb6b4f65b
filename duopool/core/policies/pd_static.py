"""``pd-static``: the baseline "offline isolated" deployment.

A fixed set of instances serves only the offline backlog with plain continuous batching (chunked prefill +
decode, vLLM-style); the rest is a static prefill/decode split that serves only online traffic. The split is
``static_split`` = (prefill, decode, offline-only) when given (``duopool sim`` sizes it from the workload,
``duopool compare --best-static`` sweeps it), else ``offline_share`` / ``prefill_fraction``.
"""

from __future__ import annotations

from duopool.core.placement import PoolName, Role
from duopool.core.policies.base import SchedulingPolicy, pd_layout, register_policy
from duopool.core.state import IDLE, Cluster, Instance, StepPlan


@register_policy("pd-static")
class PDStatic(SchedulingPolicy):
    def layout(self, n: int) -> list[tuple[Role, PoolName, bool]]:
        split = self.cfg.static_split
        if split is not None:
            p, d, o = split
            if p + d + o != n:
                raise ValueError(f"pd-static: static_split {p}:{d}:{o} does not add up to {n} instances")
            return ([(Role.PREFILL, PoolName.RELAXED, False)] * p + [(Role.DECODE, PoolName.STRICT, False)] * d
                    + [(Role.MIXED, PoolName.RELAXED, True)] * o)
        n_off = min(n - 2, max(1, round(n * self.cfg.offline_share))) if n >= 3 else 0
        return pd_layout(n - n_off, self.cfg.prefill_fraction) + [(Role.MIXED, PoolName.RELAXED, True)] * n_off

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.offline_only:
            chunks = self.offline_prefill_chunks(inst, cluster, self.cfg.max_batched_tokens - inst.n_decoding)
            pull = self.resume_pulls(inst, cluster, 8)
            if not chunks and not inst.n_decoding:
                return StepPlan(decode=False, pull=pull) if pull else IDLE
            return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0, pull=pull)
        chunks = self.online_prefill_chunks(inst) if inst.waiting else []
        if inst.role == Role.PREFILL:
            return StepPlan(chunks=tuple(chunks), decode=False) if chunks else IDLE
        if not chunks and not inst.n_decoding:
            return IDLE
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0)
