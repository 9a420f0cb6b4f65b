"""The scheduler service: knows the workers (from Redis heartbeats), places requests, runs offline work.

* Placement: the research policies (pd-static, online-priority, hygen, tropical, ooco, dopd, ooco+dopd)
  run the decision core (``duopool.core.brain``) through ``BrainDriver``: the same routing, decode targets,
  offline admission, evictions and role changes as the simulator, driven by the wall clock, its effects
  applied over gRPC. ``least-loaded`` is the role-aware least-loaded rule (``duopool.core.placement``) with
  the co-location limits below. Protobuf and Redis stay at this edge. The worker list is read from Redis at
  most every ``REFRESH_S``; in-flight counts (by class) are this service's own, released when requests end.
* Co-location (``duopool.core.colocation``): an online request placed on workers that hold offline work
  beyond the limit triggers ``Worker.Preempt`` there at once; the time from that decision until the worker
  reports the offline work stopped is the preemption latency (``Stats``).
* Offline batch jobs: the durable queue in Redis (``duopool.common.jobs``), fed to workers by the
  ``OfflineDispatcher`` running in this process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
from collections import Counter, deque

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from duopool.common import metrics, registry
from duopool.common.config import SchedulerConfig
from duopool.common.ids import check_id
from duopool.common.jobs import JobStore, job_item
from duopool.common.metrics import start_metrics_server
from duopool.common.rpc import Channels, Server
from duopool.common.tasks import TaskSet
from duopool.common.telemetry import init_telemetry
from duopool.common.wire import PB_POOL, PB_ROLE, POOL_PB, ROLE_PB, worker_info_pb
from duopool.core.colocation import (
    ColocationLimits,
    WorkerLoad,
    must_yield,
    offline_capacity,
    preemptions,
    update_pressure,
)
from duopool.core.placement import (
    PlacementDecision,
    PlacementRequest,
    PoolName,
    RequestClass,
    Role,
    WorkerView,
    get_placement_policy,
)
from duopool.core.policies import policy_names
from duopool.core.rolebalance import RoleBalanceConfig, RoleBalancer, RoleView
from duopool.scheduler.brain_driver import TICK_S, BrainDriver, build_brain
from duopool.scheduler.dispatcher import OfflineDispatcher
from duopool.v1 import common_pb2, router_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("duopool.scheduler")

REFRESH_S = 0.25
OFFER_PER_WORKER = 8  # decision core: offline requests offered per worker and dispatcher step (each admitted or held)
ROUTER_KEY = "duopool:router:{}"  # a router's liveness (set with a TTL by the router)
STATE_PB = {"enqueuing": router_pb2.QUEUED, "queued": router_pb2.QUEUED, "running": router_pb2.RUNNING, "done": router_pb2.DONE,
            "cancelled": router_pb2.CANCELLED}


def batch_status_pb(h: dict) -> router_pb2.BatchStatus:
    created, last = float(h.get("created_at", 0)), float(h.get("last_result_at", 0))
    tokens = int(h.get("output_tokens", 0))
    return router_pb2.BatchStatus(
        job_id=h["job_id"], state=STATE_PB.get(h.get("state", ""), 0), total=int(h.get("total", 0)),
        done=int(h.get("done", 0)), failed=int(h.get("failed", 0)), output_tokens=tokens, created_at=created,
        finished_at=float(h.get("finished_at", 0)), preemptions=int(h.get("preemptions", 0)),
        tokens_per_s=tokens / (last - created) if last > created else 0.0,
    )


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _SessionCall:
    """The context a Session message's handler runs with: a refusal is that message's reply."""

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise _Refused(code, details)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig, redis, clock=time.time) -> None:
        self.config = config
        self.redis = redis
        self.clock = clock
        self.policy_name = config.policy
        # the research policies: the decision core; least-loaded: the placement rule + co-location limits
        self.driver = BrainDriver(self, build_brain(config), clock) if config.policy in policy_names() else None
        self.policy = None if self.driver else get_placement_policy(config.policy)
        self.limits = ColocationLimits(config.offline_per_worker, config.offline_with_online,
                                       trigger=config.preempt_trigger, slo_low=config.slo_low,
                                       slo_high=config.slo_high, online_queue=config.online_queue,
                                       hold_s=config.preempt_hold_s)
        self.pressure: dict[str, float] = {}  # worker id -> recent online latency / SLO (moving average)
        self.preempted_at: dict[str, float] = {}  # worker id -> time.monotonic() of its last preemption
        self.balancer = RoleBalancer(RoleBalanceConfig(high=config.slo_high, low=config.slo_low)) \
            if config.role_balance_interval_s > 0 else None
        self.role_moves = 0
        self.channels = Channels()
        self.jobs = JobStore(redis)
        self.online: Counter[str] = Counter()  # worker id -> online requests in flight
        self.offline: Counter[str] = Counter()
        self.placed: dict[str, tuple[bool, tuple[str, ...]]] = {}  # request id -> (offline, workers)
        self.leases: dict[str, str] = {}  # request id -> the router (client id) whose liveness holds it
        self.preemption_ms: deque[float] = deque(maxlen=1000)
        self.preempted = 0
        self._preempting: set[str] = set()
        self._placing: Counter[str] = Counter()  # request id -> Place calls of it in progress
        self._released_early: set[str] = set()  # released while a Place of it was in progress
        self._workers: list[registry.WorkerRecord] = []
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        self.dispatcher: OfflineDispatcher | None = None

    # -- cluster state ---------------------------------------------------------------------------------
    async def workers(self) -> list[registry.WorkerRecord]:
        async with self._lock:
            now = self.clock()
            if now - self._refreshed > REFRESH_S:
                self._workers = await registry.live_workers(self.redis, self.config.worker_ttl_s, now)
                self._refreshed = now
                if self.driver is not None:
                    self.driver.sync(self._workers)
            return self._workers

    def views(self, workers: list[registry.WorkerRecord]) -> list[WorkerView]:
        return [
            WorkerView(worker_id=w.worker_id, role=Role(w.role), pool=PoolName(w.pool), running=w.running,
                       waiting=w.waiting, kv_usage=w.kv_usage,
                       inflight=self.online[w.worker_id] + self.offline[w.worker_id],
                       max_model_len=w.max_model_len, host=w.host)
            for w in workers
        ]

    def _domain(self, worker_id: str) -> list[str]:
        """The workers whose load counts together for co-location: the worker itself, or with
        ``--pressure-scope host`` every worker on its host (engines sharing a host's CPU cores slow each
        other: offline decode on one worker stretches online prefill on its neighbour)."""
        if self.config.pressure_scope != "host":
            return [worker_id]
        host = next((w.host for w in self._workers if w.worker_id == worker_id), None)
        same = [w.worker_id for w in self._workers if w.host == host] if host is not None else []
        return same or [worker_id]

    def load(self, worker_id: str) -> WorkerLoad:
        domain = self._domain(worker_id)
        last = max((self.preempted_at.get(w, float("-inf")) for w in domain), default=float("-inf"))
        return WorkerLoad(worker_id, sum(self.online[w] for w in domain), self.offline[worker_id],
                          max((self.pressure.get(w, 0.0) for w in domain), default=0.0),
                          since_preempt_s=time.monotonic() - last)

    # -- placement ---------------------------------------------------------------------------------------
    def _record(self, rid: str, offline: bool, worker_ids: tuple[str, ...]) -> None:
        self._unrecord(rid)
        self.placed[rid] = (offline, worker_ids)
        counter = self.offline if offline else self.online
        klass = "offline" if offline else "online"
        for wid in dict.fromkeys(worker_ids):
            counter[wid] += 1
            metrics.INFLIGHT.labels(wid, klass).set(counter[wid])

    def release(self, rid: str) -> None:
        """The request ended: its in-flight accounting goes (and it leaves the decision core's state)."""
        if self.driver is not None:
            self.driver.finished(rid)
        self._unrecord(rid)

    def _unrecord(self, rid: str) -> None:
        self.leases.pop(rid, None)
        placed = self.placed.pop(rid, None)
        if placed:
            offline, worker_ids = placed
            counter = self.offline if offline else self.online
            klass = "offline" if offline else "online"
            for wid in dict.fromkeys(worker_ids):
                counter[wid] -= 1
                metrics.INFLIGHT.labels(wid, klass).set(max(0, counter[wid]))
                if counter[wid] <= 0:
                    del counter[wid]

    async def offline_free_slots(self) -> int:
        workers = await self.workers()
        if self.driver is not None:  # how many to offer per dispatcher step; the brain admits or holds each
            return OFFER_PER_WORKER * len(workers)
        return sum(offline_capacity(self.load(w.worker_id), self.limits) for w in workers)

    async def place_offline(self, rid: str, prompt_tokens: int = 0, max_tokens: int = 0, key: str = "",
                            parked: bool = False):
        """Places an offline request on workers with offline capacity: (rid, prefill, decode) or None.
        ``parked``: a preempted decode whose KV is parked (the decision core places it where a plan pulls it)."""
        workers = await self.workers()
        if self.driver is not None:
            by_id = {w.worker_id: w for w in workers}
            d = self.driver.place(rid, False, by_id, prompt_tokens, max_tokens, key=key, parked=parked)
            if d is None:
                metrics.PLACEMENTS.labels("offline", "held").inc()
                return None
            metrics.PLACEMENTS.labels("offline", "placed").inc()
            self._record(rid, True, (d.prefill, d.decode))
            return rid, by_id[d.prefill], by_id[d.decode]
        full = frozenset(w.worker_id for w in workers if offline_capacity(self.load(w.worker_id), self.limits) <= 0)
        req = PlacementRequest(request_id=rid, request_class=RequestClass.OFFLINE, exclude=full)
        decision = self.policy.place(req, self.views(workers), self.clock())
        metrics.PLACEMENTS.labels("offline", "no_worker" if decision is None else "placed").inc()
        if decision is None:
            return None
        by_id = {w.worker_id: w for w in workers}
        self._record(rid, True, (decision.prefill_worker_id, decision.decode_worker_id))
        return rid, by_id[decision.prefill_worker_id], by_id[decision.decode_worker_id]

    def offline_must_yield(self, worker_id: str, rid: str = "") -> bool:
        """An offline request between phases must not start its next phase on this worker (online work
        landed there meanwhile; with the decision core: its decode worker's step plan evicts it as it joins).
        Counted as a preemption; no latency sample (nothing had to stop)."""
        if self.driver is not None:
            if rid not in self.driver.first_token(rid):
                return False
        elif not must_yield(self.load(worker_id), self.limits):
            return False
        self.preempted_at[worker_id] = time.monotonic()
        self.preempted += 1
        metrics.PREEMPTIONS.labels("yield").inc()
        return True

    def note_preempted(self, worker_id: str, n: int, seconds: float, reason: str) -> None:
        """Accounts ``n`` offline requests stopped on a worker ``seconds`` after the decision."""
        self.preempted_at[worker_id] = time.monotonic()
        self.preempted += n
        self.preemption_ms.append(seconds * 1e3)
        metrics.PREEMPTIONS.labels(reason).inc(n)
        metrics.PREEMPTION_LATENCY.observe(seconds)

    def _preempt_for_online(self, worker_ids: tuple[str, ...], by_id: dict[str, registry.WorkerRecord],
                            reason: str = "online_placed") -> None:
        if self.driver is not None:  # the decision core's step plans decide what stops
            return
        ids = dict.fromkeys(d for wid in worker_ids for d in self._domain(wid) if d in by_id)
        loads = {wid: self.load(wid) for wid in ids}
        for wid, count in preemptions(loads, self.limits).items():
            if wid not in self._preempting:
                self._preempting.add(wid)
                asyncio.create_task(self._preempt(by_id[wid], count, reason))

    async def _preempt(self, w: registry.WorkerRecord, count: int, reason: str = "online_placed") -> None:
        t0 = time.perf_counter()
        trace.get_current_span().add_event("duopool.preempt", {"duopool.worker": w.worker_id,
                                                               "duopool.max_requests": count,
                                                               "duopool.reason": reason})
        try:
            stub = self.channels.stub(w.address, worker_pb2_grpc.WorkerStub)
            resp = await stub.Preempt(worker_pb2.PreemptRequest(
                request_class=common_pb2.OFFLINE, max_requests=count, reason=reason), timeout=30)
            if resp.request_ids:
                self.note_preempted(w.worker_id, len(resp.request_ids), time.perf_counter() - t0, reason)
        except grpc.aio.AioRpcError as exc:
            log.warning("preempting offline work on %s failed: %s", w.worker_id, exc.code().name)
        finally:
            self._preempting.discard(w.worker_id)

    async def Place(self, request: scheduler_pb2.PlaceRequest, context: grpc.aio.ServicerContext):
        if request.request_class not in (common_pb2.ONLINE, common_pb2.OFFLINE):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_class: must be ONLINE or OFFLINE")
        rid, released = request.request_id, False
        self._placing[rid] += 1
        try:
            workers = await self.workers()
        except Exception as exc:  # noqa: BLE001 - Redis unreachable
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cluster state unavailable: {exc}")
        finally:
            self._placing[rid] -= 1
            if self._placing[rid] <= 0:
                del self._placing[rid]
                released = rid in self._released_early
                self._released_early.discard(rid)
        if released:
            # The router gave up on the request (its client went away) and released it while this call
            # waited: placing it now would count it in flight forever.
            await context.abort(grpc.StatusCode.CANCELLED, "request released before it was placed")
        if not workers:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no workers registered")
        online = request.request_class == common_pb2.ONLINE
        preq = PlacementRequest(
            request_id=request.request_id, request_class=RequestClass.ONLINE if online else RequestClass.OFFLINE,
            prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
            ttft_slo_ms=request.slo.ttft_ms, tpot_slo_ms=request.slo.tpot_ms,
            exclude=frozenset(request.exclude_workers),
        )
        with trace.get_tracer("duopool.scheduler").start_as_current_span("duopool.schedule") as span:
            decision = self._decide(preq, workers)
            span.set_attributes({
                "duopool.class": "online" if online else "offline", "duopool.policy": self.policy_name,
                "duopool.workers_registered": len(workers), "duopool.workers_excluded": len(request.exclude_workers),
                "duopool.placed": decision is not None})
            if decision is not None:
                span.set_attributes({"duopool.prefill_worker": decision.prefill_worker_id,
                                     "duopool.decode_worker": decision.decode_worker_id,
                                     "duopool.reason": decision.reason or decision.policy})
        metrics.PLACEMENTS.labels("online" if online else "offline", "no_worker" if decision is None else "placed").inc()
        if decision is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no worker can take this request ({len(workers)} registered, "
                                f"{len(request.exclude_workers)} excluded)")
        by_id = {w.worker_id: w for w in workers}
        chosen = (decision.prefill_worker_id, decision.decode_worker_id)
        self._record(request.request_id, not online, chosen)
        if request.client_id:
            self.leases[request.request_id] = request.client_id
        if online:
            self._preempt_for_online(chosen, by_id)
        return scheduler_pb2.Placement(
            request_id=request.request_id, prefill=worker_info_pb(by_id[decision.prefill_worker_id]),
            decode=worker_info_pb(by_id[decision.decode_worker_id]), policy=decision.policy,
            report_first_token=self.driver is not None,
        )

    def _decide(self, preq: PlacementRequest, workers: list[registry.WorkerRecord]) -> PlacementDecision | None:
        if self.driver is None:
            return self.policy.place(preq, self.views(workers), self.clock())
        d = self.driver.place(preq.request_id, preq.request_class == RequestClass.ONLINE,
                              {w.worker_id for w in workers}, preq.prompt_tokens, preq.max_tokens, preq.exclude,
                              key=preq.request_id)
        if d is None:
            return None
        return PlacementDecision(d.prefill, d.decode, self.policy_name, d.reason)

    async def FirstToken(self, request: scheduler_pb2.FirstTokenRequest, context):
        if self.driver is not None and request.request_id:
            self.driver.first_token(request.request_id)
        return scheduler_pb2.ReleaseResponse()

    async def Session(self, request_iterator, context):
        """Place and Release as messages of one stream (a router's): each Place runs as its own task (they
        wait on the cluster state concurrently, as unary calls do) and is answered by seq when done; a
        Release is handled in arrival order, so one sent after its Place is never handled before it."""
        replies: asyncio.Queue = asyncio.Queue()
        tasks = TaskSet()

        async def place(seq: int, req: scheduler_pb2.PlaceRequest, traceparent: str) -> None:
            token = otel_context.attach(propagate.extract({"traceparent": traceparent})) if traceparent else None
            try:
                reply = scheduler_pb2.SessionReply(seq=seq, placement=await self.Place(req, _SessionCall()))
            except _Refused as exc:
                reply = scheduler_pb2.SessionReply(seq=seq, code=exc.code.value[0], details=exc.details)
            except Exception as exc:  # noqa: BLE001 - one request's failure, not the session's
                log.exception("Place %s failed", req.request_id)
                reply = scheduler_pb2.SessionReply(seq=seq, code=grpc.StatusCode.INTERNAL.value[0], details=str(exc))
            finally:
                if token is not None:
                    otel_context.detach(token)
            replies.put_nowait(reply)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("call")
                    if kind == "place":
                        tasks.spawn(place(msg.seq, msg.place, msg.traceparent))
                    elif kind == "release":
                        await self.Release(msg.release, None)
                await tasks.wait()
            finally:
                replies.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def Release(self, request, context):
        if request.request_id in self._placing:
            self._released_early.add(request.request_id)
        placed = self.placed.get(request.request_id)
        self.release(request.request_id)
        if placed and not placed[0]:
            self._observe(placed[1], request)
        return scheduler_pb2.ReleaseResponse()

    def _observe(self, worker_ids: tuple[str, ...], request: scheduler_pb2.ReleaseRequest) -> None:
        """Folds an online request's observed TTFT (into its prefill worker's SLO pressure) and TPOT (into
        its decode worker's) and preempts where the pressure now calls for it."""
        prefill, decode = worker_ids[0], worker_ids[-1]
        ttft_slo = request.slo.ttft_ms or self.config.ttft_slo_ms
        tpot_slo = request.slo.tpot_ms or self.config.tpot_slo_ms
        if request.ttft_ms > 0:
            self.pressure[prefill] = update_pressure(self.pressure.get(prefill), request.ttft_ms, ttft_slo)
            metrics.SLO_PRESSURE.labels(prefill).set(self.pressure[prefill])
        if request.tpot_ms > 0:
            self.pressure[decode] = update_pressure(self.pressure.get(decode), request.tpot_ms, tpot_slo)
            metrics.SLO_PRESSURE.labels(decode).set(self.pressure[decode])
        if request.ttft_ms > 0:  # it produced a token: did it meet its SLO?
            met = request.ttft_ms <= ttft_slo and (request.tpot_ms <= tpot_slo or request.tpot_ms == 0)
            metrics.SLO.labels("online", "true" if met else "false").inc()
        self._preempt_for_online(worker_ids, {w.worker_id: w for w in self._workers}, "slo_pressure")

    async def expire_leases(self) -> int:
        """Releases the placements of routers whose liveness key has lapsed (a router killed mid-request
        never sends Release). Returns how many went."""
        clients = sorted(set(self.leases.values()))
        if not clients:
            return 0
        async with self.redis.pipeline(transaction=False) as p:
            for c in clients:
                p.exists(ROUTER_KEY.format(c))
            alive = dict(zip(clients, await p.execute(), strict=True))
        dead = [rid for rid, c in self.leases.items() if not alive[c]]
        for rid in dead:
            self.release(rid)
        if dead:
            log.warning("released %d placement(s) of router(s) no longer alive: %s", len(dead),
                        ", ".join(c for c in clients if not alive[c]))
        return len(dead)

    async def ListWorkers(self, request, context):
        try:
            workers = await self.workers()
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cluster state unavailable: {exc}")
        return common_pb2.ListWorkersResponse(workers=[worker_info_pb(w) for w in workers])

    # -- offline batch jobs -------------------------------------------------------------------------------
    async def SubmitBatch(self, request: router_pb2.SubmitBatchRequest, context):
        if not request.requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requests: must not be empty")
        problem = check_id("job_id", request.job_id, job=True)
        if problem:  # ids become Redis keys: one that could alias another job's keys never gets in
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        items = [job_item(it.custom_id or str(i), it) for i, it in enumerate(request.requests)]
        job_id, created = await self.jobs.submit(items, request.job_id, owner=request.owner)
        if created:
            log.info("batch job %s accepted: %d requests", job_id, len(items))
        h = await self.jobs.status(job_id)
        if h.get("owner", "") != request.owner:  # that id belongs to another key's job
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"job_id: {job_id!r} is taken")
        return batch_status_pb(h)

    async def _status_or_404(self, job_id: str, context, owner: str = "") -> dict:
        h = await self.jobs.status(job_id) if job_id and not check_id("job_id", job_id, job=True) else None
        if h is None or "state" not in h or h.get("owner", "") != owner:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no batch job {job_id!r}")
        return h

    async def GetBatch(self, request, context):
        return batch_status_pb(await self._status_or_404(request.job_id, context, request.owner))

    async def GetBatchResults(self, request, context):
        await self._status_or_404(request.job_id, context, request.owner)
        for index, r in await self.jobs.results(request.job_id):
            yield router_pb2.BatchResult(
                index=index, custom_id=r.get("custom_id", ""), text=r.get("text", ""),
                token_ids=r.get("token_ids", []), finish_reason=r.get("finish_reason", ""), error=r.get("error", ""),
                prefill_worker=r.get("prefill_worker", ""), decode_worker=r.get("decode_worker", ""),
                preemptions=r.get("preemptions", 0))

    async def CancelBatch(self, request, context):
        await self._status_or_404(request.job_id, context, request.owner)
        await self.jobs.cancel(request.job_id)
        return batch_status_pb(await self.jobs.status(request.job_id))

    # -- roles and pools: desired state in Redis, applied to workers -----------------------------------------
    async def SetWorkerRole(self, request: scheduler_pb2.SetWorkerRoleRequest, context):
        workers = {w.worker_id: w for w in await self.workers()}
        w = workers.get(request.worker_id)
        if w is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"worker_id: {request.worker_id!r} is not registered")
        info = await self._set_role(w, PB_ROLE.get(request.role, w.role), PB_POOL.get(request.pool, w.pool),
                                    request.reason or "operator")
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {w.worker_id} unreachable; desired state kept")
        return info

    async def _set_role(self, w: registry.WorkerRecord, role: str, pool: str, reason: str,
                        offline_only: bool = False):
        """Records the desired role/pool in Redis first (so it survives the worker restarting), then applies
        it; returns the worker's new info, or None if it was unreachable (``reconcile_roles`` retries)."""
        await registry.set_desired(self.redis, w.worker_id, role, pool, reason, self.clock())
        if role != w.role:
            metrics.ROLE_CHANGES.labels(role, "balancer" if reason.startswith("role balance") else "operator").inc()
        info = await self._apply_role(w, role, pool, offline_only)
        self._refreshed = 0.0  # the next placement sees the change
        return info

    async def _apply_role(self, w: registry.WorkerRecord, role: str, pool: str, offline_only: bool = False):
        try:
            stub = self.channels.stub(w.address, worker_pb2_grpc.WorkerStub)
            info = await stub.SetRole(worker_pb2.SetRoleRequest(role=ROLE_PB[role], pool=POOL_PB[pool],
                                                                offline_only=offline_only), timeout=5)
            log.info("worker %s set to role %s, pool %s", w.worker_id, role, pool)
            return info
        except grpc.aio.AioRpcError as exc:
            log.warning("SetRole on %s failed: %s", w.worker_id, exc.code().name)
            return None

    async def reconcile_roles(self) -> int:
        """Applies desired roles/pools that differ from what workers report; returns how many changed."""
        workers = await self.workers()
        desired = await registry.desired_states(self.redis, [w.worker_id for w in workers])
        changed = 0
        for w in workers:
            d = desired.get(w.worker_id)
            if d and (d["role"], d["pool"]) != (w.role, w.pool):
                changed += await self._apply_role(w, d["role"], d["pool"]) is not None
        return changed

    async def balance_roles(self) -> bool:
        """One role-balancer tick: moves at most one worker between prefill and decode (desired state first,
        like SetWorkerRole, so the move survives the worker restarting). Returns whether one moved."""
        if self.balancer is None:
            return False
        workers = await self.workers()
        move = self.balancer.tick([
            RoleView(w.worker_id, w.role, self.pressure.get(w.worker_id), self.online[w.worker_id],
                     self.offline[w.worker_id]) for w in workers])
        if move is None:
            return False
        w = next(w for w in workers if w.worker_id == move.worker_id)
        log.info("%s -> %s (%s)", w.worker_id, move.role, move.reason)
        self.pressure.pop(w.worker_id, None)  # it said how the old role went; the new one starts unobserved
        self.role_moves += 1
        await self._set_role(w, move.role, balanced_pool(move.role, w.pool, self.driver is not None), move.reason)
        return True

    def _decision_counts(self) -> dict[str, int]:
        """The decision core's counts, and the preemptions the workers' own step plans made (in-engine, at a
        step boundary, no RPC), from their heartbeats."""
        out = self.driver.counts() if self.driver else {}
        in_engine = sum(w.preempted for w in self._workers)
        if in_engine:
            out["preempt:in-engine step plan"] = in_engine
        return out

    async def Stats(self, request, context):
        samples = list(self.preemption_ms)
        p50 = statistics.median(samples) if samples else 0.0
        p99 = sorted(samples)[min(len(samples) - 1, int(0.99 * len(samples)))] if samples else 0.0
        d = self.dispatcher
        return scheduler_pb2.SchedulerStats(
            online_inflight=sum(self.online.values()), offline_inflight=sum(self.offline.values()),
            preemptions=self.preempted, preemption_ms_p50=p50, preemption_ms_p99=p99,
            offline_completed=d.completed if d else 0, offline_requeued=d.requeued if d else 0,
            offline_tokens=d.tokens if d else 0,
            resumed_parked=d.resumed_parked if d else 0,
            resumed_recomputed=dict(d.resumed_recomputed) if d else {},
            tokens_not_recomputed=d.tokens_not_recomputed if d else 0,
            offline_moved=d.moved if d else 0,
            policy=self.policy_name, preemption_ms=samples, preempt_trigger=self.limits.trigger,
            slo_pressure=self.pressure, role_moves=self.role_moves,
            decisions=self._decision_counts(),
            request_decisions=self.driver.why(request.request_id) if self.driver and request.request_id else [],
        )


def balanced_pool(role: str, pool: str, research: bool) -> str:
    """The pool of a worker the role balancer moves to ``role``: under a research policy, the pool its layouts
    give that role (decode instances are OOCO's strict pool, prefill ones the relaxed pool: what DOPD's own
    role changes set), so a balanced worker is never a decode instance in the relaxed pool, which OOCO's pulls
    and routing would treat as neither; otherwise it keeps its pool."""
    if research and role in ("prefill", "decode"):
        return "strict" if role == "decode" else "relaxed"
    return pool


async def serve(config: SchedulerConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("scheduler")
    start_metrics_server(config.host, config.metrics_port)
    r = registry.connect(config.redis_url)
    await r.ping()
    service = SchedulerService(config, r)
    server = Server(config.bind, [(scheduler_pb2_grpc.add_SchedulerServicer_to_server, service,
                                   "duopool.v1.Scheduler")])
    await server.start()
    consumer = config.scheduler_id or f"scheduler-{socket.gethostname()}"
    service.dispatcher = OfflineDispatcher(service, service.jobs, consumer)
    dispatch = asyncio.create_task(service.dispatcher.run(stop))
    ticking = asyncio.create_task(_tick_loop(service, stop)) if service.driver is not None else None
    log.info("scheduler serving on %s:%d (policy %s, offline dispatcher %s)", config.host, server.port,
             config.policy, consumer)
    if ready is not None:
        ready.set()
    balance_s = config.role_balance_interval_s
    next_balance = time.monotonic() + balance_s
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), min(1.0, balance_s) if balance_s > 0 else 1.0)
        except TimeoutError:
            try:
                await service.expire_leases()
                await service.reconcile_roles()
                if balance_s > 0 and time.monotonic() >= next_balance:
                    next_balance = time.monotonic() + balance_s
                    await service.balance_roles()
            except Exception:  # noqa: BLE001 - Redis blips: try again next second
                log.debug("role reconciliation failed", exc_info=True)
    await dispatch
    if ticking is not None:
        await ticking
        await service.driver.close()
    await server.stop()
    await service.channels.close()
    await r.aclose()


async def _tick_loop(service: SchedulerService, stop: asyncio.Event) -> None:
    """The decision core's periodic control: refreshes the workers (heartbeats into the brain) and ticks
    (evictions from each worker's step plan, the policy's layout and role changes)."""
    while not stop.is_set():
        try:
            await service.workers()
            service.driver.tick()
        except Exception:  # noqa: BLE001 - Redis blips: tick again
            log.debug("decision-core tick failed", exc_info=True)
        try:
            await asyncio.wait_for(stop.wait(), TICK_S)
        except TimeoutError:
            pass
