"""The kvtransfer service: brokers KV transfers between workers and owns the segments' lifetime.

Transfer life cycle (``TransferState``)::

    StartTransfer (source, after prefill) ──▶ READY ──CompleteTransfer(ok)──▶ COMPLETED   (segment unlinked)
                                              │    └─CompleteTransfer(!ok)─▶ FAILED      (segment unlinked)
                                              ├──lease runs out───────────▶ EXPIRED     (segment unlinked)
                                              └──Release──────────────────▶ RELEASED    (segment unlinked)

Every end state frees the segment, so a destination that never pulls cannot leak shared memory. Ended
transfers are remembered for a while so late callers get a definite answer instead of NOT_FOUND.

Data paths: on one host the destination maps the source's segment (shared memory: no copy beyond the
engines' own); ``Read`` streams a segment's bytes in chunks for a destination on another host (the gRPC
fallback). The state table lives in this process: transfers are short-lived (seconds) and a restart of
this service ends them all, after which decode workers recompute (their failure policy).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import time
from dataclasses import dataclass

import grpc

from duopool.common.config import KvTransferConfig
from duopool.common.rpc import Server
from duopool.common.telemetry import init_telemetry
from duopool.kv.segment import KvSegment, SegmentError, unlink_segment
from duopool.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

log = logging.getLogger("duopool.kvtransfer")

S = kvtransfer_pb2
ENDED = (S.COMPLETED, S.FAILED, S.EXPIRED, S.RELEASED)
KEEP_ENDED_S = 300.0


@dataclass
class Transfer:
    kv: common_pb2.KvHandle
    destination_worker: str
    destination_host: str
    state: int
    deadline: float
    error: str = ""
    ended_at: float = 0.0

    def status(self) -> kvtransfer_pb2.TransferStatus:
        return kvtransfer_pb2.TransferStatus(transfer_id=self.kv.transfer_id, state=self.state, kv=self.kv,
                                             error=self.error)


class KvTransferService(kvtransfer_pb2_grpc.KvTransferServicer):
    def __init__(self, config: KvTransferConfig, clock=time.monotonic) -> None:
        self.config = config
        self.kv_dir = pathlib.Path(config.kv_dir)
        self.clock = clock
        self.transfers: dict[str, Transfer] = {}
        self.endpoints: dict[str, kvtransfer_pb2.RegisterEndpointRequest] = {}
        self.counters = {"completed": 0, "failed": 0, "expired": 0, "bytes_moved": 0}
        self._changed = asyncio.Condition()

    def _path_ok(self, location: str) -> bool:
        try:
            return pathlib.Path(location).resolve().parent == self.kv_dir.resolve()
        except OSError:
            return False

    async def _end(self, t: Transfer, state: int, error: str = "") -> None:
        if t.state in ENDED:
            return
        t.state, t.error, t.ended_at = state, error or t.error, self.clock()
        unlink_segment(pathlib.Path(t.kv.location))
        key = {S.COMPLETED: "completed", S.FAILED: "failed", S.EXPIRED: "expired"}.get(state)
        if key:
            self.counters[key] += 1
        if state == S.COMPLETED:
            self.counters["bytes_moved"] += t.kv.num_bytes
        async with self._changed:
            self._changed.notify_all()

    # -- RPCs ---------------------------------------------------------------------------------------
    async def RegisterEndpoint(self, request, context):
        if not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id: required")
        self.endpoints[request.worker_id] = request
        return kvtransfer_pb2.RegisterEndpointResponse()

    async def StartTransfer(self, request, context):
        kv = request.kv
        if not kv.transfer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kv.transfer_id: required")
        if kv.transport == "shm" and not self._path_ok(kv.location):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kv.location: {kv.location!r} is not a segment under {self.kv_dir}")
        existing = self.transfers.get(kv.transfer_id)
        if existing is not None:  # idempotent: a retried StartTransfer returns the same transfer
            return existing.status()
        lease = request.lease_s or self.config.lease_s
        t = Transfer(kv=kv, destination_worker=request.destination_worker,
                     destination_host=request.destination_host, state=S.READY, deadline=self.clock() + lease)
        self.transfers[kv.transfer_id] = t
        async with self._changed:
            self._changed.notify_all()
        return t.status()

    async def PollTransfer(self, request, context):
        deadline = self.clock() + request.wait_ms / 1000
        while True:
            t = self.transfers.get(request.transfer_id)
            if t is not None and t.state != S.PENDING:
                return t.status()
            remaining = deadline - self.clock()
            if remaining <= 0:
                if t is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {request.transfer_id!r} unknown")
                return t.status()
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass

    async def CompleteTransfer(self, request, context):
        t = self.transfers.get(request.transfer_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {request.transfer_id!r} unknown")
        await self._end(t, S.COMPLETED if request.ok else S.FAILED, request.error)
        return t.status()

    async def Release(self, request, context):
        t = self.transfers.get(request.transfer_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {request.transfer_id!r} unknown")
        await self._end(t, S.RELEASED)
        return t.status()

    async def Read(self, request, context):
        t = self.transfers.get(request.transfer_id)
        if t is None or t.state != S.READY:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"transfer_id: {request.transfer_id!r} is not READY")
        chunk = request.chunk_bytes or (1 << 20)
        if not 4096 <= chunk <= 16 << 20:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes: must be in [4096, 16 MiB]")
        try:
            seg = KvSegment.open(pathlib.Path(t.kv.location))
        except SegmentError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        with seg:
            data = seg.data_view()
            for off in range(0, len(data), chunk):
                yield kvtransfer_pb2.DataChunk(offset=off, data=bytes(data[off : off + chunk]))
            del data

    async def Stats(self, request, context):
        active = [t for t in self.transfers.values() if t.state not in ENDED]
        return kvtransfer_pb2.KvStatsResponse(
            active_transfers=len(active), active_bytes=sum(t.kv.num_bytes for t in active),
            completed=self.counters["completed"], failed=self.counters["failed"],
            expired=self.counters["expired"], bytes_moved=self.counters["bytes_moved"],
        )

    # -- housekeeping --------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Expires transfers past their lease and forgets long-ended ones."""
        now = self.clock()
        for tid, t in list(self.transfers.items()):
            if t.state not in ENDED and now > t.deadline:
                log.warning("transfer %s expired (destination %s never completed it)", tid, t.destination_worker)
                await self._end(t, S.EXPIRED, "lease expired")
            elif t.state in ENDED and now - t.ended_at > KEEP_ENDED_S:
                del self.transfers[tid]

    def remove_orphans(self, older_than_s: float) -> int:
        """Deletes segment files no transfer refers to (left by a crashed engine) older than the lease."""
        known = {pathlib.Path(t.kv.location).name for t in self.transfers.values() if t.state not in ENDED}
        removed = 0
        if not self.kv_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        for p in self.kv_dir.iterdir():
            if p.name not in known and p.suffix in (".kv", ".tmp"):
                try:
                    if p.stat().st_mtime < cutoff:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


async def serve(config: KvTransferConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("kvtransfer")
    os.makedirs(config.kv_dir, exist_ok=True)
    service = KvTransferService(config)
    server = Server(config.bind, [(kvtransfer_pb2_grpc.add_KvTransferServicer_to_server, service,
                                   "duopool.v1.KvTransfer")])
    await server.start()
    log.info("kvtransfer serving on %s:%d (segments in %s, lease %.0fs)", config.host, server.port,
             config.kv_dir, config.lease_s)
    if ready is not None:
        ready.set()
    tick = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
        await service.sweep()
        tick += 1
        if tick % 60 == 0:
            service.remove_orphans(older_than_s=config.lease_s * 2)
    await server.stop()
    for t in list(service.transfers.values()):
        await service._end(t, S.RELEASED, "kvtransfer shutting down")
