"""Cluster state the scheduling policies read, and the plan objects they return.

The state is plain data (no I/O). The simulator owns and mutates it; the live scheduler builds the same
objects from worker heartbeats. Policies never mutate it: they return a :class:`StepPlan` per instance step,
an instance index per routing decision, and :class:`Action` objects from their periodic tick; the owner
applies them.

Decode batches are kept lazily so a step costs O(1) in the batch size: an instance counts the decode
iterations it has run (``steps``); a sequence that joined at ``join_step`` with ``gen_join`` tokens generated
has ``gen_join + steps - join_step`` now. Per request class the instance keeps Σ(context − join_step), so
Σ context = that + n·steps.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from duopool.core.placement import PoolName, Role

ONLINE, OFFLINE = 0, 1  # request class index (hot path; RequestClass is the public enum)


class Phase:
    QUEUED = "queued"  # waiting for (more) prefill on an instance, or in the offline backlog
    TRANSFER = "transfer"  # KV moving to another instance
    DECODING = "decoding"
    SWAPPED = "swapped"  # evicted offline decode, KV parked in host memory
    DONE = "done"
    REJECTED = "rejected"  # can never fit (prompt larger than an instance's KV memory): a counted failure


@dataclass(eq=False, slots=True)
class Req:
    rid: int
    cls: int  # ONLINE or OFFLINE
    arrival: float
    prompt: int
    output: int
    prefix: tuple[int, ...] | None = None
    prefilled: int = 0
    generated: int = 0  # valid while not decoding; use Instance.gen_of(r) while decoding
    inst: int = -1  # instance holding its KV (or queued on), -1 none
    phase: str = Phase.QUEUED
    first_token_t: float = math.nan
    finish_t: float = math.nan
    join_step: int = 0
    gen_join: int = 0
    epoch: int = 0  # bumps when it leaves a decode batch (lazy heap deletion)
    slack_base: float = 0.0  # Tropical: first_token_t + tpot·(gen_join − join_step)
    preemptions: int = 0
    queued_t: float = 0.0  # when it (re)entered a queue: freshness / starvation
    moving: bool = False  # a pull is pending at its instance's next step boundary
    kv_res: int = 0  # KV tokens reserved for it on ``inst`` while prefilling / arriving / waiting to join
    src: int = -1  # while its KV moves: the instance still holding the source copy (-1: host memory)
    src_res: int = 0  # ... and the tokens held there until the transfer completes

    @property
    def online(self) -> bool:
        return self.cls == ONLINE


@dataclass(eq=False)
class Instance:
    idx: int
    role: Role
    pool: PoolName
    kv_capacity: int  # tokens
    block_size: int = 16
    offline_only: bool = False  # pd-static's isolated offline share
    engine_plans: bool = False  # live: its engine forms each step by this policy's plan itself (sim --step-policy)
    accepting: bool = True  # False while DOPD drains it for a role change
    waiting: deque = field(default_factory=deque)  # online prefill queue (Req, prefilled < prompt)
    waiting_off: deque = field(default_factory=deque)  # offline requests admitted here, prefill in progress
    decoding: dict = field(default_factory=dict)  # rid -> Req
    online_decoding: dict = field(default_factory=dict)  # rid -> Req, the online part of ``decoding``
    n_dec: list = field(default_factory=lambda: [0, 0])
    ctx_base: list = field(default_factory=lambda: [0, 0])
    steps: int = 0
    kv_reserved: int = 0  # tokens held by prefilling / arriving sequences (not in decoding)
    finish_heap: list = field(default_factory=list)  # (finish_step, rid, epoch, Req)
    join_order: deque = field(default_factory=deque)  # (Req, epoch) in join order; back = newest
    slack_heap: list = field(default_factory=list)  # (slack_base, rid, epoch, Req) online decodes
    queued_prefill_tokens: int = 0  # online prompt tokens still to prefill here
    incoming: int = 0  # sequences whose KV is on its way here (transfer or pull)
    # of those, the ones whose context is known on the way (a live move: the source still has to stop it,
    # which takes an RPC and a step there) and their context tokens; the others are estimated by the policy
    incoming_known: int = 0
    incoming_ctx: int = 0
    inbox: deque = field(default_factory=deque)  # arrived KV waiting to join the decode batch (KV reserved)
    # KV transfers to this instance waiting for memory to be allocated here: (Req, tokens). Their KV stays
    # on the source (an instance's reservation, or host memory) until they are admitted and have moved.
    xfer_wait: deque = field(default_factory=deque)
    kv_growth: int = 0  # tokens the running step's decodes add by its end (reserved when it starts)
    kv_peak: int = 0  # highest kv_used() seen (tokens)
    # The NIC's send / receive queues: [tail of online transfers, tail of all transfers]. Online transfers queue
    # only behind online ones and push the offline queue back by their duration (online has priority).
    nic_tx: list = field(default_factory=lambda: [0.0, 0.0])
    nic_rx: list = field(default_factory=lambda: [0.0, 0.0])
    pending_out: list = field(default_factory=list)  # (Req, dst) pulls to release at the next boundary
    pending_role: tuple | None = None  # (Role, PoolName) to take at the next boundary
    busy: bool = False
    starting: bool = False  # the simulator is planning its next step (guards re-entry)
    running_offline_prefill: bool = False  # current step is an all-offline step with prefill chunks
    step_start: float = 0.0
    step_end: float = 0.0
    # bumps whenever the decode batch changes (a sequence joins or leaves) or one of its sequences starts or
    # stops moving: callers may cache what they derive from the batch's membership and order (contexts move
    # together: ``ctx_of(r) - steps`` is fixed while ``r`` stays)
    version: int = 0

    # ---------------------------------------------------------------- decode batch
    def gen_of(self, r: Req) -> int:
        return r.gen_join + self.steps - r.join_step

    def ctx_of(self, r: Req) -> int:
        return r.prompt + self.gen_of(r)

    def ctx_sum(self, cls: int | None = None) -> int:
        if cls is None:
            return self.ctx_base[0] + self.ctx_base[1] + (self.n_dec[0] + self.n_dec[1]) * self.steps
        return self.ctx_base[cls] + self.n_dec[cls] * self.steps

    @property
    def n_decoding(self) -> int:
        return self.n_dec[0] + self.n_dec[1]

    def add_decode(self, r: Req, tpot_s: float = 0.0) -> None:
        r.inst = self.idx
        r.phase = Phase.DECODING
        r.join_step = self.steps
        r.gen_join = r.generated
        self.decoding[r.rid] = r
        if r.cls == ONLINE:
            self.online_decoding[r.rid] = r
        self.version += 1
        self.n_dec[r.cls] += 1
        self.ctx_base[r.cls] += r.prompt + r.generated - self.steps
        heapq.heappush(self.finish_heap, (self.steps + r.output - r.generated, r.rid, r.epoch, r))
        self.join_order.append((r, r.epoch))
        if r.cls == ONLINE and tpot_s > 0:
            r.slack_base = r.first_token_t + tpot_s * (r.gen_join - 1 - r.join_step)
            heapq.heappush(self.slack_heap, (r.slack_base, r.rid, r.epoch, r))

    def remove_decode(self, r: Req) -> None:
        """Take ``r`` out of the batch, fixing its generated count; the caller decides where it goes."""
        r.generated = self.gen_of(r)
        del self.decoding[r.rid]
        if r.cls == ONLINE:
            del self.online_decoding[r.rid]
        self.version += 1
        self.n_dec[r.cls] -= 1
        self.ctx_base[r.cls] -= r.prompt + r.gen_join - r.join_step
        r.epoch += 1

    def next_finish_step(self) -> int | None:
        h = self.finish_heap
        while h and (h[0][2] != h[0][3].epoch or h[0][3].phase != Phase.DECODING):
            heapq.heappop(h)
        return h[0][0] if h else None

    def pop_finished(self) -> list[Req]:
        out = []
        h = self.finish_heap
        steps = self.steps
        while h and h[0][0] <= steps:
            _, _, ep, r = heapq.heappop(h)
            if ep == r.epoch and r.phase == Phase.DECODING:
                out.append(r)
        return out

    def newest_offline_decodes(self):
        """Offline decodes from the back of the running queue (newest first)."""
        # The queue as of the first ``next``: callers add and remove decodes while iterating, and additions
        # only append to ``join_order`` (compaction replaces it), so its first ``n`` entries stay put. The
        # newest few are read in place (callers mostly stop there), the rest from a copy.
        order, idx = self.join_order, self.idx
        n = len(order)
        k = min(n, 16)
        for i in range(n - 1, n - 1 - k, -1):
            r, ep = order[i]
            if ep == r.epoch and r.phase == Phase.DECODING and r.cls == OFFLINE and r.inst == idx and not r.moving:
                yield r
        for r, ep in reversed(list(islice(order, n - k))):
            if ep == r.epoch and r.phase == Phase.DECODING and r.cls == OFFLINE and r.inst == idx and not r.moving:
                yield r

    def compact_join_order(self) -> None:
        if len(self.join_order) > 2 * len(self.decoding) + 64:
            self.join_order = deque((r, ep) for r, ep in self.join_order if ep == r.epoch and r.phase == Phase.DECODING)

    def min_online_slack(self, now: float, tpot_s: float) -> float:
        """Tropical slack of the tightest online decode: first token + TPOT × tokens since − now."""
        h = self.slack_heap
        while h and (h[0][2] != h[0][3].epoch or h[0][3].phase != Phase.DECODING):
            heapq.heappop(h)
        if not h:
            return math.inf
        return h[0][0] + tpot_s * self.steps - now

    # ---------------------------------------------------------------- memory
    def kv_used(self) -> int:
        """Tokens of KV held: decoding contexts rounded up by a block each, reservations (prefills, KV
        arriving or waiting to join, source copies still moving out), and what the running step adds."""
        n = self.n_dec[0] + self.n_dec[1]
        return (self.ctx_base[0] + self.ctx_base[1] + n * self.steps + n * self.block_size + self.kv_reserved
                + self.kv_growth)

    def note_kv_peak(self) -> None:
        """Record the KV use now if it is the highest seen (``kv_peak``)."""
        u = self.kv_used()
        if u > self.kv_peak:
            self.kv_peak = u

    def admission_watermark(self) -> int:
        """Free KV kept back when admitting new work (prompts, incoming KV): a block per running sequence,
        at least 1% of memory (vLLM keeps a watermark too), so running sequences can grow and admitted work
        cannot fill memory so tightly that sequences swap each other out in turn."""
        return max(self.block_size * (self.n_decoding + 1), self.kv_capacity // 100)

    def kv_free(self) -> int:
        return self.kv_capacity - self.kv_used()

    def kv_usage(self) -> float:
        return self.kv_used() / self.kv_capacity

    @property
    def n_seqs(self) -> int:
        return self.n_decoding + len(self.waiting) + len(self.waiting_off)


@dataclass(eq=False)
class Cluster:
    instances: list[Instance]
    backlog: deque = field(default_factory=deque)  # offline requests not yet started (policy order)
    resume: deque = field(default_factory=deque)  # evicted offline decodes (SWAPPED), oldest first
    now: float = 0.0
    # observed online load (for DOPD): arrivals since the last tick
    arrived_prefill_s: float = 0.0
    arrived_requests: int = 0

    def by_role(self, role: Role) -> list[Instance]:
        return [i for i in self.instances if i.role == role and not i.offline_only]

    def by_pool(self, pool: PoolName) -> list[Instance]:
        return [i for i in self.instances if i.pool == pool and not i.offline_only]


# -------------------------------------------------------------------- plans (frozen, returned by policies)
@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one instance runs next.

    ``chunks``: prefill work (request, new tokens); a request not yet on this instance (offline backlog or
    resume queue) is admitted by the step. ``decode``: run the instance's decode batch in the step.
    ``evict``: offline decodes to park in host memory before the step. ``pull``: offline decodes elsewhere
    (or swapped) whose KV should move here. ``max_steps`` caps a decode-only run; ``wake_at`` asks to be
    woken when idle. ``fast_preemptible``: an online arrival may abort the step (OOCO)."""

    chunks: tuple = ()
    decode: bool = True
    evict: tuple = ()
    pull: tuple = ()
    max_steps: int = 1 << 30
    wake_at: float | None = None
    fast_preemptible: bool = False

    @property
    def idle(self) -> bool:
        return not self.chunks and not self.decode


IDLE = StepPlan(decode=False)
DECODE = StepPlan()  # decode the running batch, nothing else


@dataclass(frozen=True, slots=True)
class SetRole:
    """Re-assign an instance (DOPD). The owner drains what the new role cannot run."""

    instance: int
    role: Role
    pool: PoolName
