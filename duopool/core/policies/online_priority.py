"""``online-priority``: co-location with online first and no SLO awareness.

Same prefill/decode split as OOCO, but offline requests are ordinary lower-priority requests everywhere:
prefill instances run offline prefill whenever no online prompt is queued (a running offline step is not
interrupted); offline decodes go to the decode instances like online ones and fill them up to
``max_num_seqs`` and KV memory, with online requests preempting offline ones only for slots or memory.
"""

from __future__ import annotations

from duopool.core.placement import Role
from duopool.core.policies.base import SchedulingPolicy, register_policy
from duopool.core.state import IDLE, Cluster, Instance, StepPlan


@register_policy("online-priority")
class OnlinePriority(SchedulingPolicy):
    def decode_room(self, cluster: Cluster) -> bool:
        """Back-pressure only (no SLO rule): admit offline prompts while some decode instance can still
        take a sequence, counting the ones already on their way or waiting to join."""
        for d in cluster.instances:
            if d.role == Role.DECODE and not d.offline_only \
                    and d.n_decoding + d.incoming + len(d.inbox) < self.cfg.max_num_seqs:
                return True
        return False

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        if inst.role == Role.PREFILL:
            if inst.waiting:
                return StepPlan(chunks=tuple(self.online_prefill_chunks(inst)), decode=inst.n_decoding > 0)
            chunks = self.offline_prefill_chunks(inst, cluster, self.cfg.max_batched_tokens,
                                                 admit_new=self.decode_room(cluster))
            if not chunks and not inst.n_decoding:
                return IDLE
            return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0)
        # decode instance: everything it holds, plus swapped offline work while slots and memory last
        chunks = self.online_prefill_chunks(inst) if inst.waiting else []
        pull = self.resume_pulls(inst, cluster, 16)
        if not chunks and not inst.n_decoding:
            return StepPlan(decode=False, pull=pull) if pull else IDLE
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0, pull=pull)
