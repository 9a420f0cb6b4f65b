"""The decision core: one scheduler state machine for the simulator and the live cluster.

Events go in (a worker's report, a request arriving, its first token, its end, a periodic tick); effects
come out (place a request, hold offline work, preempt offline requests on a worker, move an offline decode
to another worker, set a worker's role and pool), each with a short reason. No I/O; the clock is passed in
(``now``) by whoever drives it:

* the simulator (``duopool.sim.engine``) owns the :class:`~duopool.core.state.Cluster` and its physics and
  asks the brain the routing, decode-target and control questions with its virtual clock
  (:meth:`Brain.route`, :meth:`Brain.decode_target`, :meth:`Brain.control`);
* the scheduler service (``services/scheduler/brain_driver.py``) converts protobuf and Redis state into the
  events below with the wall clock, calls :meth:`Brain.handle`, and applies the effects over gRPC. Its
  brain keeps the same ``Cluster`` as a *mirror* of the live cluster: a ``Req`` per request it placed, on
  the instance that holds it (queued for prefill until its first token, then in its decode instance's
  batch), and the engine step counts the workers report.

Both ask the same questions of the same policy object (``duopool.core.policies``): ``layout`` gives the
pools, ``route``/``decode_target`` place online work, the policy's own step plan (``plan``) decides which
offline request an instance admits, which offline decodes it evicts (preemption) and which it pulls
(OOCO), and ``tick`` changes roles (DOPD). A policy's named pieces are exactly those hooks; nothing live
bypasses them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from duopool.core.placement import PoolName, RequestClass, Role
from duopool.core.state import OFFLINE, ONLINE, Cluster, Instance, Phase, Req

DEFAULT_PROMPT = 256  # tokens assumed for a request whose prompt was not tokenized before placement
DEFAULT_OUTPUT = 256  # ... and for one that gave no max_tokens
LOG_REQUESTS = 20_000  # requests whose decisions are kept for ``why``
ENGINE_QUEUE = 8  # offline requests kept waiting in an engine that runs the step plans itself
MOVE_TIMEOUT_S = 30.0  # a move's reservation on its puller lapses if the request's resume has not come by then
RESUME_WAIT_S = 30.0  # a parked resume no instance's plan pulls for this long is admitted as new offline work
RESUMES_KEPT = 100_000  # parked resumes whose first hold is remembered (oldest forgotten first)


# -------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's heartbeat: its role and pool, and its engine's load."""

    worker_id: str
    role: Role
    pool: PoolName
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_capacity: int = 0  # KV tokens the engine holds (0: unknown, the performance model's figure is used)
    steps: int = -1  # engine steps run so far (-1: not reported)
    step_ms: float = 0.0  # the engine's last step
    step_plans: str = ""  # the policy whose step plans the engine runs itself ("" none)
    offline_only: bool = False  # the worker knows itself as the policy's isolated offline share
    # its step plans read a latency predictor fitted to the engine's own steps (a real engine), not the
    # performance model this brain plans with: the brain then only keeps its queue stocked, KV permitting
    own_predictor: bool = False


@dataclass(frozen=True, slots=True)
class WorkerGone:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Arrived:
    """A request to place. Offline requests come from the batch queue, one at a time, as they are offered."""

    request_id: str
    request_class: RequestClass
    prompt_tokens: int = 0
    max_tokens: int = 0
    exclude: frozenset[str] = frozenset()
    key: str = ""  # a stable name of the work item across retries (offline: job and index)
    # an offline request preempted with its KV parked: a swapped decode (prompt_tokens = its context), which
    # an instance's step plan pulls to decode on, as the simulator's instances pull ``Cluster.resume``
    parked: bool = False


@dataclass(frozen=True, slots=True)
class FirstToken:
    request_id: str


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str


@dataclass(frozen=True, slots=True)
class Tick:
    pass


Event = WorkerReport | WorkerGone | Arrived | FirstToken | Finished | Tick


# -------------------------------------------------------------------- effects
@dataclass(frozen=True, slots=True)
class Place:
    request_id: str
    prefill: str
    decode: str
    reason: str
    kind: str = "place"


@dataclass(frozen=True, slots=True)
class Reject:
    """No worker can take the request now (online: the caller answers UNAVAILABLE)."""

    request_id: str
    reason: str
    kind: str = "reject"


@dataclass(frozen=True, slots=True)
class Hold:
    """Offline work stays queued: no instance's plan admits it now."""

    request_id: str
    reason: str
    kind: str = "hold"


@dataclass(frozen=True, slots=True)
class Preempt:
    """Stop these offline requests on ``worker`` (they resume later, possibly elsewhere)."""

    worker: str
    request_ids: tuple[str, ...]
    reason: str
    kind: str = "preempt"


@dataclass(frozen=True, slots=True)
class Move:
    """Move offline decode ``request_id`` from ``src`` to ``dst`` (OOCO's pull)."""

    request_id: str
    src: str
    dst: str
    reason: str
    kind: str = "move"


@dataclass(frozen=True, slots=True)
class SetRole:
    worker: str
    role: Role
    pool: PoolName
    reason: str
    kind: str = "set_role"
    offline_only: bool = False  # the policy's isolated offline share (pd-static)


Effect = Place | Reject | Hold | Preempt | Move | SetRole


@dataclass(frozen=True, slots=True)
class _Move:
    """A move under way (OOCO's pull): what its puller holds for it until the resume arrives there."""

    dst: int  # the puller
    kv: int  # KV tokens reserved there (its context and what it has left)
    ctx: int  # its context (counted in the puller's incoming_ctx)
    request_id: str  # the request it stopped
    until: float  # the reservation lapses then


@dataclass
class _Live:
    """What the mirror keeps of one live request beside its ``Req``."""

    request_id: str
    decode: int  # instance chosen to decode it
    key: str = ""


@dataclass
class Decisions:
    """Counts by (kind, reason) and the recent decisions per request (what ``duopool stats`` shows)."""

    counts: Counter = field(default_factory=Counter)
    log: OrderedDict = field(default_factory=OrderedDict)
    keep: int = LOG_REQUESTS

    def note(self, e: Effect, now: float) -> None:
        self.counts[(e.kind, e.reason)] += 1
        if self.keep <= 0:
            return
        if isinstance(e, Preempt):
            ids: Iterable[str] = e.request_ids
        elif isinstance(e, SetRole):
            return
        else:
            ids = (e.request_id,)
        for rid in ids:
            entry = self.log.get(rid)
            if entry is None:
                entry = self.log[rid] = []
                if len(self.log) > self.keep:
                    self.log.popitem(last=False)
            entry.append((now, describe(e)))

    def why(self, request_id: str) -> list[tuple[float, str]]:
        return list(self.log.get(request_id, ()))


def describe(e: Effect) -> str:
    if isinstance(e, Place):
        return f"placed: prefill {e.prefill}, decode {e.decode} ({e.reason})"
    if isinstance(e, Preempt):
        return f"preempted on {e.worker} ({e.reason})"
    if isinstance(e, Move):
        return f"moved {e.src} -> {e.dst} ({e.reason})"
    if isinstance(e, SetRole):
        return f"{e.worker} -> {e.role}/{e.pool} ({e.reason})"
    return f"{e.kind} ({e.reason})"


class Brain:
    """The scheduling state machine around one policy. ``cluster`` given: the caller (the simulator) owns
    the state and the brain only decides; none: the brain keeps a mirror of the live cluster from events."""

    def __init__(self, policy, cluster: Cluster | None = None, apply_layout: bool = True,
                 log_requests: int = LOG_REQUESTS, moves: bool = True, settle_s: float = 0.0) -> None:
        self.policy = policy
        self.settle_s = settle_s  # the policy's layout waits until the set of workers held still this long
        self._changed_at = -math.inf
        self.moves = moves  # the data plane can move a running offline decode's KV (OOCO's pull)
        self.live = cluster is None
        self.cluster = cluster if cluster is not None else Cluster(instances=[])
        self.apply_layout = apply_layout
        self.decisions = Decisions(keep=log_requests)
        self.names: list[str] = [f"i{i.idx}" for i in self.cluster.instances]
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self.reqs: dict[str, Req] = {}
        self.request_of: dict[int, str] = {}  # Req.rid -> request id (the plans name Req objects)
        self.meta: dict[str, _Live] = {}
        self.pinned: dict[str, int] = {}  # work-item key -> instance it was pulled to (resumes there)
        # moves under way by work-item key: the puller counts each incoming until its resume arrives there
        # (else the next tick pulls again into the same room)
        self.moving: dict[str, _Move] = {}
        self.held_resumes: OrderedDict[str, float] = OrderedDict()  # key -> first hold of a parked resume
        self.reported_steps: dict[int, int] = {}
        self.own_predictor: set[int] = set()  # instances whose engines plan with their own measured predictor
        self.next_tick = 0.0
        self._laid_out: tuple[str, ...] = ()
        self._ids = itertools.count()
        self._tpot = policy.cfg.tpot_slo_s

    # ================================================================ decisions shared by both drivers
    def route(self, r: Req, now: float, exclude: frozenset[int] = frozenset()) -> tuple[Instance | None, str]:
        """The instance that prefills a new online request (the policy's ``route``), and why."""
        insts = self.cluster.instances
        usable = [i for i in insts if i.idx not in exclude]
        if not usable:
            return None, "no worker"
        if exclude:
            saved = [(i, i.accepting) for i in insts if i.idx in exclude]
            for i, _ in saved:
                i.accepting = False
            try:
                idx = self.policy.route(r, self.cluster, now)
            finally:
                for i, a in saved:
                    i.accepting = a
            if idx in exclude:  # the policy's fallback reached an excluded instance: the least queued other
                inst = min([i for i in usable if not i.offline_only] or usable,
                           key=lambda i: (i.queued_prefill_tokens, i.idx))
                return inst, "excluded: least queued other"
        else:
            idx = self.policy.route(r, self.cluster, now)
        inst = insts[idx]
        return inst, _route_reason(inst, r)

    def decode_target(self, r: Req, inst: Instance, now: float, exclude: frozenset[int] = frozenset()) -> int:
        """Where a request prefilled on ``inst`` decodes (the policy's ``decode_target``)."""
        dst = self.policy.decode_target(r, inst, self.cluster, now)
        if dst in exclude:
            others = [i for i in self.cluster.instances if i.idx not in exclude and i.role != Role.PREFILL
                      and not i.offline_only]
            dst = min(others, key=lambda i: (i.n_dec[ONLINE] + i.incoming, i.idx)).idx if others else inst.idx
        return dst

    def plan(self, inst: Instance, now: float):
        """The instance's next step (the policy's ``plan``): prefill chunks, offline admission, evictions,
        pulls."""
        return self.policy.plan(inst, self.cluster, now)

    def control(self, now: float) -> list:
        """The policy's periodic control (DOPD's role changes): ``state.SetRole`` actions by instance."""
        return self.policy.tick(self.cluster, now)

    # ================================================================ live driver API
    def handle(self, event: Event, now: float) -> list[Effect]:
        self.cluster.now = now
        if isinstance(event, WorkerReport):
            out = self._report(event, now)
        elif isinstance(event, Arrived):
            out = self._arrived(event, now)
        elif isinstance(event, FirstToken):
            out = self._first_token(event.request_id, now)
        elif isinstance(event, Finished):
            self._forget(event.request_id)
            self._move_ended(event.request_id)
            out = []
        elif isinstance(event, WorkerGone):
            out = self._gone(event.worker_id)
        elif isinstance(event, Tick):
            out = self._tick(now)
        else:
            raise TypeError(f"not a brain event: {event!r}")
        for e in out:
            self.decisions.note(e, now)
        return out

    def why(self, request_id: str) -> list[tuple[float, str]]:
        return self.decisions.why(request_id)

    def counts(self) -> dict[str, int]:
        return {f"{k}:{r}": n for (k, r), n in sorted(self.decisions.counts.items())}

    # ---------------------------------------------------------------- workers
    def _report(self, w: WorkerReport, now: float) -> list[Effect]:
        idx = self.index.get(w.worker_id)
        if idx is None:
            idx = len(self.names)
            cap = w.kv_capacity or self.policy.kv_capacity
            self.cluster.instances.append(Instance(idx, Role(w.role), PoolName(w.pool), kv_capacity=cap))
            self.names.append(w.worker_id)
            self.index[w.worker_id] = idx
            self._changed_at = now
        inst = self.cluster.instances[idx]
        inst.role, inst.pool = Role(w.role), PoolName(w.pool)
        inst.engine_plans = w.step_plans == self.policy.name
        if inst.engine_plans and w.own_predictor:
            self.own_predictor.add(idx)
        else:
            self.own_predictor.discard(idx)
        if inst.engine_plans and self._laid_out and w.offline_only != inst.offline_only:
            # an engine that plans its own steps must know it is the offline share (after a restart too)
            return [SetRole(w.worker_id, inst.role, inst.pool, "policy layout: offline share",
                            offline_only=inst.offline_only)]
        if w.kv_capacity:
            inst.kv_capacity = w.kv_capacity
        if w.steps >= 0:  # the lazy decode batch advances by the steps the engine ran (a restart counts anew)
            last = self.reported_steps.get(idx)
            delta = w.steps - last if last is not None and w.steps >= last else (0 if last is None else w.steps)
            inst.steps += delta
            self.reported_steps[idx] = w.steps
        return []

    def _gone(self, worker_id: str) -> list[Effect]:
        """A worker left: its requests leave the mirror (their callers retry them) and the instances are
        re-indexed so that an instance's ``idx`` stays its position."""
        idx = self.index.pop(worker_id, None)
        if idx is None:
            return []
        for rid in [rid for rid, r in self.reqs.items() if r.inst == idx or self.meta[rid].decode == idx]:
            self._forget(rid)
        insts = self.cluster.instances
        del insts[idx]
        del self.names[idx]
        remap = {}
        for pos, inst in enumerate(insts):
            remap[inst.idx] = pos
            inst.idx = pos
        self.index = {n: i for i, n in enumerate(self.names)}
        self.reported_steps = {remap[k]: v for k, v in self.reported_steps.items() if k in remap}
        for rid, r in self.reqs.items():
            r.inst = remap.get(r.inst, -1)
            self.meta[rid].decode = remap.get(self.meta[rid].decode, r.inst)
        self.pinned = {k: remap[v] for k, v in self.pinned.items() if v in remap}
        self.moving = {k: replace(m, dst=remap[m.dst]) for k, m in self.moving.items() if m.dst in remap}
        self._laid_out = ()
        self._changed_at = self.cluster.now
        return []

    def layout_effects(self, now: float = math.inf) -> list[SetRole]:
        """The policy's layout for the workers there now, as role changes (only when the set of workers
        changed since the last layout, and has held still ``settle_s``): existing roles are kept where the
        layout has a slot for them."""
        names = tuple(sorted(self.names))
        if not self.apply_layout or names == self._laid_out or not names or now - self._changed_at < self.settle_s:
            return []
        self._laid_out = names
        slots = list(self.policy.layout(len(names)))
        insts = [self.cluster.instances[self.index[n]] for n in names]
        assigned: dict[int, tuple] = {}
        for inst in insts:  # keep what already fits a free slot (no restart of a worker that is right)
            for k, s in enumerate(slots):
                if s is not None and (s[0], s[1]) == (inst.role, inst.pool):
                    assigned[inst.idx] = s
                    slots[k] = None
                    break
        rest = [s for s in slots if s is not None]
        out = []
        for inst in insts:
            s = assigned.get(inst.idx) or rest.pop(0)
            inst.offline_only = bool(s[2])
            if (s[0], s[1]) != (inst.role, inst.pool) or (inst.offline_only and inst.engine_plans):
                out.append(SetRole(self.names[inst.idx], s[0], s[1], "policy layout", offline_only=inst.offline_only))
                inst.role, inst.pool = s[0], s[1]
        return out

    # ---------------------------------------------------------------- requests
    def _arrived(self, a: Arrived, now: float) -> list[Effect]:
        if a.request_id in self.reqs:
            self._forget(a.request_id)
        online = a.request_class == RequestClass.ONLINE
        r = Req(next(self._ids), ONLINE if online else OFFLINE, now, max(1, a.prompt_tokens or DEFAULT_PROMPT),
                max(1, a.max_tokens or DEFAULT_OUTPUT), queued_t=now)
        exclude = frozenset(self.index[w] for w in a.exclude if w in self.index)
        if not self.cluster.instances:
            return [Reject(a.request_id, "no worker")]
        if online:
            return self._place_online(a, r, now, exclude)
        return self._offer_offline(a, r, now, exclude)

    def _place_online(self, a: Arrived, r: Req, now: float, exclude: frozenset[int]) -> list[Effect]:
        self.cluster.arrived_prefill_s += self.policy.pm.prefill_time_s(r.prompt)
        self.cluster.arrived_requests += 1
        inst, reason = self.route(r, now, exclude)
        if inst is None:
            return [Reject(a.request_id, reason)]
        dst = self.decode_target(r, inst, now, exclude)
        self._track(a, r, inst, dst, online=True)
        out: list[Effect] = [Place(a.request_id, self.names[inst.idx], self.names[dst],
                                   f"{reason}; {_decode_reason(inst.idx, dst, self.cluster.instances[dst])}")]
        out += self._evictions(self.cluster.instances[inst.idx], now, "online prefill arrived")
        if dst != inst.idx:
            out += self._evictions(self.cluster.instances[dst], now, "online decode arriving")
        return out

    def _offer_offline(self, a: Arrived, r: Req, now: float, exclude: frozenset[int]) -> list[Effect]:
        """Offline work joins an instance whose own step plan admits it from the backlog (the policy's
        offline admission: KV, sequence, token and latency budgets); a request pulled before resumes on the
        instance that pulled it."""
        insts = self.cluster.instances
        pin = self.pinned.pop(a.key, None) if a.key else None
        if a.key in self.moving:
            self._unreserve_move(a.key)
        if pin is not None and pin < len(insts) and pin not in exclude:
            inst = insts[pin]
            self._track(a, r, inst, inst.idx, online=False)
            return [Place(a.request_id, self.names[pin], self.names[pin], "resumes where it was pulled")]
        if a.parked and a.key:
            puller = self._pull_parked(r, now, exclude)
            if puller is not None:
                self.held_resumes.pop(a.key, None)
                self._track(a, r, puller, puller.idx, online=False)
                return [Place(a.request_id, self.names[puller.idx], self.names[puller.idx],
                              f"parked decode pulled by {puller.role} instance's plan")]
            first = self.held_resumes.setdefault(a.key, now)
            while len(self.held_resumes) > RESUMES_KEPT:
                self.held_resumes.popitem(last=False)
            if now - first < RESUME_WAIT_S:
                return [Hold(a.request_id, "parked decode: no instance's plan pulls it now")]
            self.held_resumes.pop(a.key, None)  # waited long enough: admitted like new work from here on
        if not self.moves:  # a strict instance that would pull it takes it at its first token
            puller = self._pull_at_first_token(r, now, exclude)
            src = self._prefill_for_pull(r, exclude) if puller is not None else None
            if src is not None:
                self._track(a, r, src, puller, online=False, prefill_only=True)
                return [Place(a.request_id, self.names[src.idx], self.names[puller],
                              f"{src.role} instance prefills it; pulled by a strict instance at its first token")]
        saved = self.cluster.backlog
        self.cluster.backlog = deque([r])
        found = None
        try:  # the least loaded instance whose plan admits it (asked in that order: the first yes wins)
            order = sorted((i for i in insts if i.idx not in exclude and i.accepting),
                           key=lambda i: (len(i.waiting_off) + i.n_dec[OFFLINE], i.kv_usage(), i.idx))
            for inst in order:
                if inst.engine_plans:
                    # its engine runs the plan at every step, on its exact state: the brain keeps the engine's
                    # own queue stocked (a few requests waiting there, KV permitting) and the plan admits
                    # from it, as a simulated instance admits from the backlog
                    if len(inst.waiting_off) < ENGINE_QUEUE and self._admits_past_queue(inst, r, now):
                        found = inst
                        break
                elif any(c[0] is r for c in self.policy.plan(inst, self.cluster, now).chunks):
                    found = inst
                    break
        finally:
            self.cluster.backlog = saved
        if found is None:
            return [Hold(a.request_id, "no instance's plan admits offline work now")]
        inst = found
        dst = self.decode_target(r, inst, now, exclude)
        where = "decodes in place" if dst == inst.idx else "decodes elsewhere"
        self._track(a, r, inst, dst, online=False)
        return [Place(a.request_id, self.names[inst.idx], self.names[dst],
                      f"{inst.role} instance's plan admits it; {where}")]

    def _prefill_for_pull(self, r: Req, exclude: frozenset[int]) -> Instance | None:
        """The relaxed instance that prefills a request a strict instance pulls at its first token (it holds
        only the prompt's KV until then): no online prompt queued, KV for the prompt, the fewest offline
        prompt tokens queued."""
        best, best_q = None, None
        for i in self.cluster.instances:
            if i.pool != PoolName.RELAXED or i.role == Role.DECODE or i.offline_only or not i.accepting \
                    or i.idx in exclude or i.waiting or len(i.waiting_off) >= ENGINE_QUEUE \
                    or i.kv_free() < r.prompt + 1 + i.block_size:
                continue
            q = sum(x.prompt - x.prefilled for x in i.waiting_off)
            if best_q is None or q < best_q:
                best, best_q = i, q
        return best

    def _pull_parked(self, r: Req, now: float, exclude: frozenset[int]) -> Instance | None:
        """The instance whose step plan pulls ``r``, a preempted offline decode whose KV is parked, as it
        pulls the swapped decodes of ``Cluster.resume`` in the simulator (the policy's own pull: which
        instances pull, how many, with what KV and step-time margins); those with the most room are asked
        first, and only those with a sequence slot and KV for its whole context."""
        insts = [i for i in self.cluster.instances if i.idx not in exclude and i.accepting and not i.offline_only
                 and i.n_seqs + i.incoming + len(i.inbox) < self.policy.cfg.max_num_seqs
                 and i.kv_free() >= r.prompt + r.output + i.block_size]
        if not insts:
            return None
        insts.sort(key=lambda i: (i.n_decoding + i.incoming, i.ctx_sum(), i.idx))
        resume = self.cluster.resume
        resume.append(r)
        try:
            for i in insts:
                if any(p is r for p in self.policy.plan(i, self.cluster, now).pull):
                    return i
        finally:
            resume.remove(r)
        return None

    def _pull_at_first_token(self, r: Req, now: float, exclude: frozenset[int]) -> int | None:
        """Where a running decode's KV cannot move (``moves`` off), a pull can still happen at the one point
        the KV moves anyway, the prefill → decode transfer: a strict instance whose plan would pull ``r``
        now (as a swapped decode of its prompt's context; OOCO's KV and step-time margins) decodes it from
        its first token."""
        strict = [i for i in self.cluster.instances if i.pool == PoolName.STRICT and i.idx not in exclude and i.accepting and not i.offline_only]
        if not strict:
            return None
        strict.sort(key=lambda i: (i.n_decoding + i.incoming, i.ctx_sum(), i.idx))  # the most room first
        resume = self.cluster.resume
        resume.append(r)
        try:
            for i in strict:
                if any(p is r for p in self.policy.plan(i, self.cluster, now).pull):
                    return i.idx
        finally:
            resume.remove(r)
        return None

    def _admits_past_queue(self, inst: Instance, r: Req, now: float) -> bool:
        """Would ``inst``'s plan admit ``r`` once the offline requests queued there have started? (Its
        engine's own plans admit them as they fit; the mirror does not see their prefill progress.)"""
        queued = inst.waiting_off
        held = sum(q.kv_res for q in queued)
        inst.waiting_off = deque()
        inst.kv_reserved -= held
        try:
            if inst.kv_free() - held < r.prompt + r.output + inst.block_size:
                return False
            if inst.idx in self.own_predictor:  # its plan's budgets are the engine's, measured there
                return True
            return any(c[0] is r for c in self.policy.plan(inst, self.cluster, now).chunks)
        finally:
            inst.waiting_off = queued
            inst.kv_reserved += held

    def _track(self, a: Arrived, r: Req, inst: Instance, dst: int, online: bool, prefill_only: bool = False) -> None:
        r.inst = inst.idx
        r.phase = Phase.QUEUED
        r.kv_res = r.prompt + (0 if online else 1 if prefill_only else r.output) + inst.block_size
        inst.kv_reserved += r.kv_res
        if online:
            inst.waiting.append(r)
            inst.queued_prefill_tokens += r.prompt
        else:
            inst.waiting_off.append(r)
        if dst != inst.idx:
            self.cluster.instances[dst].incoming += 1
        self.reqs[a.request_id] = r
        self.request_of[r.rid] = a.request_id
        self.meta[a.request_id] = _Live(a.request_id, dst, a.key)

    def _first_token(self, rid: str, now: float) -> list[Effect]:
        """Prefill done: the request joins its decode instance's batch (its KV moves there)."""
        r, m = self.reqs.get(rid), self.meta.get(rid)
        if r is None or r.phase != Phase.QUEUED:
            return []
        insts = self.cluster.instances
        src = insts[r.inst]
        self._unqueue(src, r)
        dst = insts[m.decode]
        if dst is not src:
            dst.incoming -= 1
        r.prefilled = r.prompt
        r.generated = 1
        r.first_token_t = now
        if r.output <= 1:  # done with its first token (already off the queue and the incoming count)
            self.reqs.pop(rid, None)
            self.meta.pop(rid, None)
            self.request_of.pop(r.rid, None)
            r.phase = Phase.DONE
            return []
        dst.add_decode(r, self._tpot)
        reason = "online decode joined" if r.online else "offline decode joined"
        return self._evictions(dst, now, reason)

    def _unqueue(self, inst: Instance, r: Req) -> None:
        if r.online:
            try:
                inst.waiting.remove(r)
                inst.queued_prefill_tokens -= r.prompt - r.prefilled
            except ValueError:
                pass
        else:
            try:
                inst.waiting_off.remove(r)
            except ValueError:
                pass
        inst.kv_reserved -= r.kv_res
        r.kv_res = 0

    def _forget(self, rid: str) -> None:
        r = self.reqs.pop(rid, None)
        m = self.meta.pop(rid, None)
        if r is None:
            return
        self.request_of.pop(r.rid, None)
        insts = self.cluster.instances
        if 0 <= r.inst < len(insts):
            inst = insts[r.inst]
            if r.phase == Phase.QUEUED:
                self._unqueue(inst, r)
                if m is not None and m.decode != r.inst and 0 <= m.decode < len(insts):
                    insts[m.decode].incoming -= 1
            elif r.phase == Phase.DECODING and r.rid in inst.decoding:
                inst.remove_decode(r)
        r.phase = Phase.DONE

    # ---------------------------------------------------------------- step plans: evict, pull
    def _evictions(self, inst: Instance, now: float, why: str, plan=None) -> list[Effect]:
        """The offline decodes ``inst``'s step plan evicts, as one ``Preempt`` (they leave the mirror)."""
        if inst.engine_plans:  # its engine evicts at its own step boundary, on its exact state, without an RPC
            return []
        plan = plan or self.policy.plan(inst, self.cluster, now)
        ids = []
        for r in plan.evict:
            rid = self.request_of.get(r.rid)
            if rid is not None:
                ids.append(rid)
                self._forget(rid)
        return [Preempt(self.names[inst.idx], tuple(ids), f"{why}: step over its budget")] if ids else []

    def _tick(self, now: float) -> list[Effect]:
        out: list[Effect] = list(self.layout_effects(now))
        p = self.policy
        if p.tick_s > 0 and now >= self.next_tick:
            self.next_tick = now + p.tick_s
            for act in self.control(now):
                if 0 <= act.instance < len(self.names):
                    inst = self.cluster.instances[act.instance]
                    if (inst.role, inst.pool) != (act.role, act.pool):
                        inst.role, inst.pool = act.role, act.pool
                        out.append(SetRole(self.names[act.instance], act.role, act.pool, "forecast ratio"))
        for inst in list(self.cluster.instances):
            plan = p.plan(inst, self.cluster, now)
            out += self._evictions(inst, now, "tick", plan)
            for r in plan.pull if self.moves else ():
                rid = self.request_of.get(r.rid)
                if rid is None or r.phase != Phase.DECODING or r.inst == inst.idx:
                    continue
                src = self.names[r.inst]
                key = self.meta[rid].key
                ctx = self.cluster.instances[r.inst].ctx_of(r)
                need = ctx + max(1, r.prompt + r.output - ctx) + inst.block_size  # its context and what is left
                self._forget(rid)
                if key:
                    self.pinned[key] = inst.idx
                    self.moving[key] = _Move(inst.idx, need, ctx, rid, now + MOVE_TIMEOUT_S)
                    inst.incoming += 1
                    inst.incoming_known += 1
                    inst.incoming_ctx += ctx
                    inst.kv_reserved += need
                out.append(Move(rid, src, self.names[inst.idx], "pull: KV and step-time margin"))
        for key in [k for k, m in self.moving.items() if now >= m.until]:  # its resume never came
            self.pinned.pop(key, None)
            self._unreserve_move(key)
        return out

    def _unreserve_move(self, key: str) -> None:
        m = self.moving.pop(key)
        if 0 <= m.dst < len(self.cluster.instances):
            inst = self.cluster.instances[m.dst]
            inst.incoming = max(0, inst.incoming - 1)
            inst.incoming_known -= 1
            inst.incoming_ctx -= m.ctx
            inst.kv_reserved -= m.kv

    def _move_ended(self, request_id: str) -> None:
        """The request a move stopped ended without a resume (it finished before it stopped): the puller's
        reservation goes."""
        if not self.moving:
            return
        for key, m in self.moving.items():
            if m.request_id == request_id:
                self.pinned.pop(key, None)
                self._unreserve_move(key)
                return


def _route_reason(inst: Instance, r: Req) -> str:
    if inst.role == Role.DECODE:
        return "decode instance prefills it (multiplexed / burst overflow)"
    if inst.role == Role.MIXED:
        return "mixed instance"
    return "prefill instance"


def _decode_reason(src: int, dst: int, d: Instance) -> str:
    return "decodes in place" if src == dst else f"decodes on a {d.role} instance"
