"""The scheduler service's driver of the decision core (``duopool.core.brain``) for the research policies.

It only converts: Redis worker records and scheduler RPCs become brain events with the wall clock
(``WorkerReport``/``WorkerGone`` from the heartbeats, ``Arrived`` from ``Place`` and the offline dispatcher,
``FirstToken`` from the router or the dispatcher, ``Finished`` from ``Release``, ``Tick`` every
``TICK_S``), and the brain's effects are applied over gRPC (``Preempt`` → ``Worker.Preempt`` naming the
requests, ``SetRole`` → the scheduler's desired-state role change). Every decision the brain takes while
this driver runs it is counted by kind and reason (``duopool_scheduler_decisions_total``, ``duopool stats``)
and kept per request (``duopool stats --request ID``).

OOCO's pull (``Move``) moves a running offline decode's KV to the pulling worker. With ``offline_moves``
on, it is applied as a ``Worker.Preempt`` of that request on the source (its KV is parked in kvtransfer's
pool); the offline dispatcher, whose stream of that request ends there, hands it straight to the puller
(a placement the brain pins there, then a decode from the parked KV: no re-queue). Off (the default),
the brain is built with ``moves=False``: a pull happens only at a request's first token, where the KV moves
anyway, and the policy keeps every other piece (pools, routing, decode targets, admission and eviction).
"""

from __future__ import annotations

import logging
import time

import grpc

from duopool.common import metrics, registry
from duopool.common.config import SchedulerConfig
from duopool.common.tasks import TaskSet
from duopool.core import brain as b
from duopool.core.perfmodel import PerfModel
from duopool.core.placement import PoolName, RequestClass, Role
from duopool.core.policies import PolicyConfig, get_policy
from duopool.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("duopool.scheduler.brain")

TICK_S = 0.1  # how often the brain's periodic control runs (evictions, role changes)
MIRROR_LOG_S = 30.0  # how often the brain's view of each worker is logged
LAYOUT_SETTLE_S = 3.0  # the policy's layout is applied once the set of workers held still this long


def build_brain(config: SchedulerConfig) -> b.Brain:
    """The brain for ``config.policy``, its performance model the hardware and model the workers run."""
    pm = PerfModel.load(config.perf_hardware, config.perf_model)
    cfg = PolicyConfig(ttft_slo_s=config.ttft_slo_ms / 1e3, tpot_slo_s=config.tpot_slo_ms / 1e3)
    return b.Brain(get_policy(config.policy, pm, cfg), moves=config.offline_moves == "on", settle_s=LAYOUT_SETTLE_S)


def worker_report(w: registry.WorkerRecord) -> b.WorkerReport:
    return b.WorkerReport(w.worker_id, Role(w.role), PoolName(w.pool), running=w.running, waiting=w.waiting,
                          kv_usage=w.kv_usage, kv_capacity=w.kv_capacity, steps=w.steps, step_ms=w.step_ms,
                          step_plans=w.step_plans, offline_only=w.offline_only,
                          own_predictor=bool(w.step_plans) and w.engine != "sim")


class BrainDriver:
    def __init__(self, service, brain: b.Brain, clock=time.time) -> None:
        self.service = service  # SchedulerService: worker records, channels, role changes
        self.brain = brain
        self.clock = clock
        self.known: set[str] = set()
        self.preempt_ms: list[float] = []
        self._tasks = TaskSet()
        self._logged = clock()

    # ---------------------------------------------------------------- events in
    def handle(self, event: b.Event) -> list[b.Effect]:
        effects = self.brain.handle(event, self.clock())
        for e in effects:
            metrics.DECISIONS.labels(e.kind, e.reason).inc()
            if isinstance(e, b.Preempt | b.Move | b.SetRole):
                log.info("decision: %s", b.describe(e))
        return effects

    def sync(self, workers: list[registry.WorkerRecord]) -> None:
        """The workers' heartbeats: reports for those there, ``WorkerGone`` for those that left."""
        now_ids = {w.worker_id for w in workers}
        for gone in self.known - now_ids:
            self.apply(self.handle(b.WorkerGone(gone)))
        for w in workers:
            self.apply(self.handle(worker_report(w)))
        self.known = now_ids

    def place(self, request_id: str, online: bool, known, prompt_tokens: int = 0, max_tokens: int = 0,
              exclude: frozenset[str] = frozenset(), key: str = "", parked: bool = False) -> b.Place | None:
        """Places a request: the brain's ``Place`` if it names workers in ``known`` (its other effects,
        preemptions, are applied in the background), else None (rejected or held)."""
        ev = b.Arrived(request_id, RequestClass.ONLINE if online else RequestClass.OFFLINE, prompt_tokens,
                       max_tokens, exclude, key, parked)
        effects = self.handle(ev)
        first = None
        rest = []
        for e in effects:
            if first is None and getattr(e, "request_id", None) == request_id and not isinstance(e, b.Preempt):
                first = e
            else:
                rest.append(e)
        self.apply(rest)
        if isinstance(first, b.Place) and first.prefill in known and first.decode in known:
            return first
        return None

    def first_token(self, request_id: str) -> set[str]:
        """The request's prefill is done; returns the requests the brain preempts because of it (an offline
        request may be among them: it steps back before it decodes)."""
        effects = self.handle(b.FirstToken(request_id))
        stopped = {rid for e in effects if isinstance(e, b.Preempt) for rid in e.request_ids}
        self.apply(effects)
        return stopped

    def moving(self, key: str) -> bool:
        """Whether the brain moved work item ``key`` (OOCO's pull) and waits for its resume on the puller."""
        return key in self.brain.moving

    def finished(self, request_id: str) -> None:
        self.handle(b.Finished(request_id))

    def tick(self) -> None:
        self.apply(self.handle(b.Tick()))
        now = self.clock()
        if now - self._logged >= MIRROR_LOG_S:
            self._logged = now
            self.log_mirror()

    def log_mirror(self) -> None:
        """One line per worker of what the brain believes is there (its decisions follow from this): role
        and pool, decodes online/offline, queued online/offline, incoming, KV used + reserved / capacity."""
        for inst in self.brain.cluster.instances:
            log.info("mirror %s %s/%s: decoding %d/%d, queued %d/%d, incoming %d, KV %d+%d/%d",
                     self.brain.names[inst.idx], inst.role, inst.pool, inst.n_dec[0], inst.n_dec[1],
                     len(inst.waiting), len(inst.waiting_off), inst.incoming, inst.kv_used() - inst.kv_reserved,
                     inst.kv_reserved, inst.kv_capacity)

    # ---------------------------------------------------------------- effects out
    def apply(self, effects: list[b.Effect]) -> None:
        for e in effects:
            if isinstance(e, b.Preempt):
                self._spawn(self._preempt(e))
            elif isinstance(e, b.Move):  # stop it at the source, KV parked; its resume is pinned to dst
                self._spawn(self._preempt(b.Preempt(e.src, (e.request_id,), e.reason), why="move"))
            elif isinstance(e, b.SetRole):
                self._spawn(self._set_role(e))

    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)

    def _record(self, worker_id: str) -> registry.WorkerRecord | None:
        return next((w for w in self.service._workers if w.worker_id == worker_id), None)

    async def _preempt(self, e: b.Preempt, why: str = "brain") -> None:
        w = self._record(e.worker)
        if w is None:
            return
        t0 = time.perf_counter()
        try:
            stub = self.service.channels.stub(w.address, worker_pb2_grpc.WorkerStub)
            resp = await stub.Preempt(worker_pb2.PreemptRequest(
                request_class=common_pb2.OFFLINE, request_ids=list(e.request_ids), reason=e.reason), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.warning("preempting %d offline request(s) on %s failed: %s", len(e.request_ids), e.worker,
                        exc.code().name)
            resp = worker_pb2.PreemptResponse()
        if resp.request_ids:
            self.service.note_preempted(w.worker_id, len(resp.request_ids), time.perf_counter() - t0, why)
        if why == "move":  # a move that stopped nothing (the request ended, or was not running there yet):
            for rid in set(e.request_ids) - set(resp.request_ids):  # its puller's room and pin go now
                self.handle(b.Finished(rid))

    async def _set_role(self, e: b.SetRole) -> None:
        w = self._record(e.worker)
        if w is not None and (w.role, w.pool, w.offline_only) != (str(e.role), str(e.pool), e.offline_only):
            await self.service._set_role(w, str(e.role), str(e.pool), e.reason, offline_only=e.offline_only)

    async def close(self) -> None:
        await self._tasks.close()

    # ---------------------------------------------------------------- visibility
    def counts(self) -> dict[str, int]:
        return self.brain.counts()

    def why(self, request_id: str) -> list[str]:
        return [f"{t:.3f} {what}" for t, what in self.brain.why(request_id)]
