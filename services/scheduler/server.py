"""The scheduler service: knows the workers (from Redis heartbeats) and answers placement.

Decisions are made by a placement policy from the pure core (``duopool.core.placement``), given
``WorkerView`` dataclasses and the time: protobuf and Redis stay at this edge. The worker list is read from
Redis at most every ``REFRESH_S`` (Redis stays off the per-request path); in-flight counts are this
service's own, released by the router when a request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import grpc

from duopool.common import registry
from duopool.common.config import SchedulerConfig
from duopool.common.rpc import Server
from duopool.common.telemetry import init_telemetry
from duopool.core.placement import (
    PlacementRequest,
    PoolName,
    RequestClass,
    Role,
    WorkerView,
    get_placement_policy,
)
from duopool.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("duopool.scheduler")

REFRESH_S = 0.25
ROLE_PB = {"prefill": common_pb2.PREFILL, "decode": common_pb2.DECODE, "mixed": common_pb2.MIXED}
POOL_PB = {"strict": common_pb2.STRICT, "relaxed": common_pb2.RELAXED}


def worker_pb(w: registry.WorkerRecord) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=w.worker_id, address=w.address, role=ROLE_PB.get(w.role, 0), pool=POOL_PB.get(w.pool, 0),
        engine=w.engine, model=w.model, max_model_len=w.max_model_len, block_size=w.block_size, host=w.host,
        running=w.running, waiting=w.waiting, kv_usage=w.kv_usage, last_heartbeat=w.last_heartbeat,
    )


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig, redis, clock=time.time) -> None:
        self.config = config
        self.redis = redis
        self.clock = clock
        self.policy = get_placement_policy(config.policy)
        self.inflight: Counter[str] = Counter()
        self.placed: dict[str, tuple[str, str]] = {}
        self._workers: list[registry.WorkerRecord] = []
        self._refreshed = 0.0
        self._lock = asyncio.Lock()

    async def workers(self) -> list[registry.WorkerRecord]:
        async with self._lock:
            now = self.clock()
            if now - self._refreshed > REFRESH_S:
                self._workers = await registry.live_workers(self.redis, self.config.worker_ttl_s, now)
                self._refreshed = now
            return self._workers

    def views(self, workers: list[registry.WorkerRecord]) -> list[WorkerView]:
        return [
            WorkerView(worker_id=w.worker_id, role=Role(w.role), pool=PoolName(w.pool), running=w.running,
                       waiting=w.waiting, kv_usage=w.kv_usage, inflight=self.inflight[w.worker_id],
                       max_model_len=w.max_model_len, host=w.host)
            for w in workers
        ]

    async def Place(self, request: scheduler_pb2.PlaceRequest, context: grpc.aio.ServicerContext):
        if request.request_class not in (common_pb2.ONLINE, common_pb2.OFFLINE):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_class: must be ONLINE or OFFLINE")
        try:
            workers = await self.workers()
        except Exception as exc:  # noqa: BLE001 - Redis unreachable
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cluster state unavailable: {exc}")
        if not workers:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no workers registered")
        preq = PlacementRequest(
            request_id=request.request_id,
            request_class=RequestClass.ONLINE if request.request_class == common_pb2.ONLINE else RequestClass.OFFLINE,
            prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
            ttft_slo_ms=request.slo.ttft_ms, tpot_slo_ms=request.slo.tpot_ms,
            exclude=frozenset(request.exclude_workers),
        )
        decision = self.policy.place(preq, self.views(workers), self.clock())
        if decision is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no worker can take this request ({len(workers)} registered, "
                                f"{len(request.exclude_workers)} excluded)")
        by_id = {w.worker_id: w for w in workers}
        self._release(request.request_id)
        self.placed[request.request_id] = (decision.prefill_worker_id, decision.decode_worker_id)
        self.inflight[decision.prefill_worker_id] += 1
        self.inflight[decision.decode_worker_id] += 1
        return scheduler_pb2.Placement(
            request_id=request.request_id, prefill=worker_pb(by_id[decision.prefill_worker_id]),
            decode=worker_pb(by_id[decision.decode_worker_id]), policy=decision.policy,
        )

    def _release(self, request_id: str) -> None:
        placed = self.placed.pop(request_id, None)
        if placed:
            for wid in placed:
                self.inflight[wid] -= 1
                if self.inflight[wid] <= 0:
                    del self.inflight[wid]

    async def Release(self, request, context):
        self._release(request.request_id)
        return scheduler_pb2.ReleaseResponse()

    async def ListWorkers(self, request, context):
        try:
            workers = await self.workers()
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cluster state unavailable: {exc}")
        return common_pb2.ListWorkersResponse(workers=[worker_pb(w) for w in workers])


async def serve(config: SchedulerConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("scheduler")
    r = registry.connect(config.redis_url)
    await r.ping()
    service = SchedulerService(config, r)
    server = Server(config.bind, [(scheduler_pb2_grpc.add_SchedulerServicer_to_server, service,
                                   "duopool.v1.Scheduler")])
    await server.start()
    log.info("scheduler serving on %s:%d (policy %s)", config.host, server.port, config.policy)
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop()
    await r.aclose()
