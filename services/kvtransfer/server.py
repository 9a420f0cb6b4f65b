"""The kvtransfer service: brokers KV transfers between workers, owns the segments' lifetime, and holds the
host-memory KV pool where preempted offline requests' KV waits for any worker to take it.

Transfer life cycle (``TransferState``)::

    StartTransfer (source, after prefill) ──▶ READY ──CompleteTransfer(ok)──▶ COMPLETED   (segment unlinked)
    Take (from the pool) ───────────────────▶   │  └─CompleteTransfer(!ok)─▶ FAILED      (segment unlinked)
                                                ├──segment gone / unreadable▶ FAILED      (found by Read)
                                                ├──lease runs out──────────▶ EXPIRED     (segment unlinked)
                                                ├──Release─────────────────▶ RELEASED    (segment unlinked)
                                                └──Park────────────────────▶ PARKED      (segment renamed into the pool)

Every end state frees the segment (or hands it to the pool), so a destination that never pulls cannot
leak shared memory. Ended transfers are remembered for a while so late callers get a definite answer
instead of NOT_FOUND. A Read stream in progress renews the lease at every chunk (a slow pull that makes
progress is not cut off; a stalled one is).

Data paths: on one host the destination maps the source's segment (shared memory: no copy beyond the
engines' own); ``Read`` streams a segment's bytes in chunks (``duopool.kv.transport.grpc_stream``) for a
destination on another host, optionally only the units it is missing (``ReadRequest.units``). A stream
stops with an error as soon as its transfer ends or its file disappears, and never holds the mapping past
the stream.

Pool (``duopool.kv.pool.KvPool`` in ``<kv_dir>/pool``): ``Park`` renames a sealed segment in, ``Take``
renames it back out as a new READY transfer, ``Drop`` deletes it; capacity ``--kv-pool-gib`` with LRU or
priority eviction. Parked files survive a restart of this service (the pool adopts them).

The transfer table lives in this process: transfers are short-lived (seconds) and a restart of this
service ends them all, after which decode workers recompute (their failure policy); segments left behind
are removed by the orphan sweep once older than a lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import grpc

from duopool.common import metrics
from duopool.common.config import KvTransferConfig
from duopool.common.ids import check_id
from duopool.common.metrics import start_metrics_server
from duopool.common.rpc import Server
from duopool.common.telemetry import init_telemetry
from duopool.kv.pool import KvPool, PoolFull
from duopool.kv.segment import KvSegment, SegmentError, huge_pages, is_sealed, segment_path, unlink_segment
from duopool.kv.transport import grpc_stream
from duopool.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

log = logging.getLogger("duopool.kvtransfer")

S = kvtransfer_pb2
ENDED = (S.COMPLETED, S.FAILED, S.EXPIRED, S.RELEASED, S.PARKED)
KEEP_ENDED_S = 300.0
SEAL_WAIT_S = 5.0  # how long a Read waits for a segment its prefill's engine is still writing (written off the forward pass)
KEEP_EVICTED = 10_000  # evicted pool keys remembered (for the NOT_FOUND message of a later Take)


@dataclass
class Transfer:
    kv: common_pb2.KvHandle
    destination_worker: str
    destination_host: str
    state: int
    deadline: float
    lease_s: float
    error: str = ""
    ended_at: float = 0.0
    readers: int = 0

    def status(self) -> kvtransfer_pb2.TransferStatus:
        return kvtransfer_pb2.TransferStatus(transfer_id=self.kv.transfer_id, state=self.state, kv=self.kv,
                                             error=self.error)


class KvTransferService(kvtransfer_pb2_grpc.KvTransferServicer):
    def __init__(self, config: KvTransferConfig, clock=time.monotonic) -> None:
        self.config = config
        self.kv_dir = pathlib.Path(config.kv_dir)
        self.host = config.host_id or socket.gethostname()
        self.clock = clock
        self.transfers: dict[str, Transfer] = {}
        # segments of transfers not ended (normalised path -> how many): Park by location checks it in O(1)
        # (the ended transfers kept for late callers are tens of thousands on a busy cluster)
        self._active_at: dict[str, int] = {}
        self._active: dict[str, Transfer] = {}  # transfers not ended, by id (what the sweep expires)
        self._ended: deque[tuple[float, str, Transfer]] = deque()  # (ended at, id, transfer), oldest first
        self._kv_dir_real: pathlib.Path | None = None
        self.endpoints: dict[str, kvtransfer_pb2.RegisterEndpointRequest] = {}
        self.counters = {"completed": 0, "failed": 0, "expired": 0, "released": 0, "parked": 0,
                         "bytes_moved": 0, "bytes_streamed": 0}
        self.active_reads = 0
        self._changed = asyncio.Condition()
        self.evicted: OrderedDict[str, int] = OrderedDict()
        # Transfers ended (completed, failed, released) before their StartTransfer arrived: the source worker
        # announces its KV in the background, so a fast decode's CompleteTransfer can overtake it. The late
        # StartTransfer then ends at once (its segment freed) instead of waiting out its lease.
        self._ended_early: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._evicted_now: list[str] = []
        self.pool: KvPool | None = None
        if config.kv_pool_bytes > 0:
            self.pool = KvPool(config.kv_pool_bytes, policy=config.kv_pool_policy, directory=self.kv_dir / "pool",
                               on_evict=self._on_evict)

    def _on_evict(self, key: str, nbytes: int) -> None:
        log.info("pool: evicted %s (%d bytes); its request will recompute", key, nbytes)
        self._evicted_now.append(key)
        self.evicted[key] = nbytes
        while len(self.evicted) > KEEP_EVICTED:
            self.evicted.popitem(last=False)

    def _path_ok(self, location: str) -> bool:
        try:
            if self._kv_dir_real is None:
                self._kv_dir_real = self.kv_dir.resolve()
            return pathlib.Path(location).resolve().parent == self._kv_dir_real
        except OSError:
            return False

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _end(self, t: Transfer, state: int, error: str = "") -> None:
        if t.state in ENDED:
            return
        t.state, t.error, t.ended_at = state, error or t.error, self.clock()
        if self._active.get(t.kv.transfer_id) is t:
            del self._active[t.kv.transfer_id]
        self._ended.append((t.ended_at, t.kv.transfer_id, t))
        where = os.path.normpath(t.kv.location)
        n = self._active_at.get(where, 0) - 1
        if n > 0:
            self._active_at[where] = n
        else:
            self._active_at.pop(where, None)
        if state != S.PARKED:
            unlink_segment(pathlib.Path(t.kv.location), recycle_file=True)
        key = {S.COMPLETED: "completed", S.FAILED: "failed", S.EXPIRED: "expired", S.RELEASED: "released",
               S.PARKED: "parked"}.get(state)
        if key:
            self.counters[key] += 1
        transport = "grpc" if t.readers else (t.kv.transport or "shm")  # read by a remote host: pulled over gRPC
        if key and key != "parked":
            metrics.KV_TRANSFERS.labels(transport, key).inc()
        if state == S.COMPLETED:
            self.counters["bytes_moved"] += t.kv.num_bytes
            if not t.readers:  # pulled bytes are counted as they stream
                metrics.KV_TRANSFER_BYTES.labels(transport).inc(t.kv.num_bytes)
        await self._notify()

    def _new_transfer(self, kv: common_pb2.KvHandle, destination_worker: str, destination_host: str,
                      lease_s: float) -> Transfer:
        lease = lease_s if lease_s > 0 else self.config.lease_s
        t = Transfer(kv=kv, destination_worker=destination_worker, destination_host=destination_host,
                     state=S.READY, deadline=self.clock() + lease, lease_s=lease)
        self.transfers[kv.transfer_id] = t
        self._active[kv.transfer_id] = t
        where = os.path.normpath(kv.location)
        self._active_at[where] = self._active_at.get(where, 0) + 1
        return t

    # -- RPCs: transfers ----------------------------------------------------------------------------
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
        t = self._new_transfer(kv, request.destination_worker, request.destination_host, request.lease_s)
        early = self._ended_early.pop(kv.transfer_id, None)
        if early is not None:
            await self._end(t, *early)
            return t.status()
        await self._notify()
        return t.status()

    def _end_unknown(self, transfer_id: str, state: int, error: str = "") -> None:
        """A transfer ended before it was announced: remembered (bounded) for its StartTransfer, and its
        segment, if the source wrote one here already, freed."""
        self._ended_early[transfer_id] = (state, error)
        while len(self._ended_early) > KEEP_EVICTED:
            self._ended_early.popitem(last=False)
        if not check_id("transfer_id", transfer_id):
            unlink_segment(segment_path(transfer_id, self.kv_dir), recycle_file=True)

    async def _transfer_or_abort(self, transfer_id: str, context) -> Transfer:
        t = self.transfers.get(transfer_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {transfer_id!r} unknown")
        return t

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
        if request.transfer_id and request.transfer_id not in self.transfers:
            self._end_unknown(request.transfer_id, S.COMPLETED if request.ok else S.FAILED, request.error)
        t = await self._transfer_or_abort(request.transfer_id, context)
        await self._end(t, S.COMPLETED if request.ok else S.FAILED, request.error)
        return t.status()

    async def Release(self, request, context):
        if request.transfer_id and request.transfer_id not in self.transfers:
            self._end_unknown(request.transfer_id, S.RELEASED)
        t = await self._transfer_or_abort(request.transfer_id, context)
        await self._end(t, S.RELEASED)
        return t.status()

    async def Read(self, request, context):
        t = await self._transfer_or_abort(request.transfer_id, context)
        if t.state != S.READY:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"transfer_id: {request.transfer_id!r} is {S.TransferState.Name(t.state)}, not READY")
        chunk = request.chunk_bytes or grpc_stream.DEFAULT_CHUNK_BYTES
        if not 4096 <= chunk <= grpc_stream.MAX_CHUNK_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"chunk_bytes: must be in [4096, {grpc_stream.MAX_CHUNK_BYTES}]")
        location = pathlib.Path(t.kv.location)
        deadline = self.clock() + SEAL_WAIT_S
        while is_sealed(location) is False and self.clock() < deadline and t.state == S.READY:
            await asyncio.sleep(0.002)  # announced before its engine's writer sealed it: a few ms at most
        units = list(request.units) or None
        gen = grpc_stream.read_chunks(location.stem, chunk, kv_dir=location.parent, units=units)
        try:
            try:
                first = next(gen)  # opens (maps) the sealed segment
                with KvSegment.open(location) as seg:
                    num_units = seg.num_units
            except SegmentError as exc:
                await self._end(t, S.FAILED, f"segment unreadable: {exc}")
                await context.abort(grpc.StatusCode.DATA_LOSS, f"kv: transfer {t.kv.transfer_id}: {exc}")
            if units and max(units) >= num_units:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"units: {max(units)} is outside the segment's {num_units} units")
            self.active_reads += 1
            t.readers += 1
            try:
                pending = first
                while pending is not None:
                    if self.config.read_max_mib_s > 0:  # paced by this service: still progress, keep the lease
                        pause = len(pending.data) / (self.config.read_max_mib_s * (1 << 20))
                        t.deadline = max(t.deadline, self.clock() + t.lease_s + pause)
                        await asyncio.sleep(pause)
                    if t.state != S.READY:
                        await context.abort(grpc.StatusCode.UNAVAILABLE,
                                            f"kv: transfer {t.kv.transfer_id} ended mid-stream "
                                            f"({S.TransferState.Name(t.state)}: {t.error})")
                    if not location.exists():
                        await self._end(t, S.FAILED, "segment vanished mid-stream")
                        await context.abort(grpc.StatusCode.DATA_LOSS,
                                            f"kv: segment of transfer {t.kv.transfer_id} vanished mid-stream")
                    t.deadline = max(t.deadline, self.clock() + t.lease_s)  # progress renews the lease
                    self.counters["bytes_streamed"] += len(pending.data)
                    metrics.KV_TRANSFER_BYTES.labels("grpc").inc(len(pending.data))
                    yield pending
                    pending = next(gen, None)
            finally:
                self.active_reads -= 1
                t.readers -= 1
        finally:
            gen.close()  # unmaps the segment

    async def Stats(self, request, context):
        active = list(self._active.values())
        resp = kvtransfer_pb2.KvStatsResponse(
            active_transfers=len(active), active_bytes=sum(t.kv.num_bytes for t in active),
            completed=self.counters["completed"], failed=self.counters["failed"],
            expired=self.counters["expired"], bytes_moved=self.counters["bytes_moved"],
            released=self.counters["released"], parked_transfers=self.counters["parked"],
            bytes_streamed=self.counters["bytes_streamed"], active_reads=self.active_reads,
        )
        if self.pool is not None:
            p = self.pool.stats()
            resp.pool_capacity_bytes, resp.pool_used_bytes, resp.pool_entries = p.capacity_bytes, p.used_bytes, p.entries
            resp.pool_parks, resp.pool_evictions, resp.pool_evicted_bytes = p.parked, p.evictions, p.evicted_bytes
            resp.pool_hits, resp.pool_misses, resp.pool_refused = p.hits, p.misses, p.refused
            resp.pool_policy = p.policy
        return resp

    # -- RPCs: the host KV pool ---------------------------------------------------------------------
    async def _check_key(self, key: str, context, name: str = "key") -> None:
        try:
            segment_path(key, self.kv_dir)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {key!r} is not a valid key "
                                "(non-empty, no '/', not starting with '.')")

    async def Park(self, request, context):
        await self._check_key(request.key, context)
        if self.pool is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "pool: disabled (--kv-pool-gib 0)")
        if bool(request.transfer_id) == bool(request.location):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer_id: give exactly one of transfer_id or location")
        t = None
        if request.transfer_id:
            t = await self._transfer_or_abort(request.transfer_id, context)
            if t.state != S.READY:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"transfer_id: {request.transfer_id!r} is {S.TransferState.Name(t.state)}")
            if t.readers:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"transfer_id: {request.transfer_id!r} is being read")
            source = pathlib.Path(t.kv.location)
        else:
            source = pathlib.Path(request.location)
            if not self._path_ok(request.location):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"location: {request.location!r} is not a segment under {self.kv_dir}")
            if os.path.normpath(request.location) in self._active_at:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"location: {request.location!r} belongs to an active transfer; park by transfer_id")
        self._evicted_now = []
        try:
            entry = self.pool.park(request.key, source, priority=request.priority)
        except PoolFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"pool: {exc}")
        except (SegmentError, OSError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"kv: cannot park: {exc}")
        evicted, self._evicted_now = self._evicted_now, []
        self.evicted.pop(request.key, None)
        if t is not None:
            await self._end(t, S.PARKED)
        log.info("pool: parked %s (%d bytes, priority %d)%s", request.key, entry.nbytes, request.priority,
                 f", evicted {evicted}" if evicted else "")
        return kvtransfer_pb2.ParkResponse(key=request.key, num_bytes=entry.nbytes, num_tokens=entry.num_tokens,
                                           evicted=evicted)

    async def Take(self, request, context):
        await self._check_key(request.key, context)
        new_id = request.new_transfer_id or request.key
        await self._check_key(new_id, context, "new_transfer_id")
        if self.pool is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "pool: disabled (--kv-pool-gib 0); recompute")
        existing = self.transfers.get(new_id)
        if existing is not None and existing.state not in ENDED:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"new_transfer_id: {new_id!r} is an active transfer")
        try:
            path = self.pool.checkout(request.key, new_id, directory=self.kv_dir)
        except PoolFull as exc:  # pinned by a reader
            await context.abort(grpc.StatusCode.ABORTED, f"pool: {exc}")
        if path is None:
            why = "was evicted" if request.key in self.evicted else "was never parked or was already taken"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"key: {request.key!r} is not in the pool ({why}); recompute")
        try:
            with KvSegment.open(path, writable=True) as seg:
                seg.retag(new_id)
                meta = seg.meta
        except (SegmentError, OSError) as exc:
            unlink_segment(path)
            await context.abort(grpc.StatusCode.DATA_LOSS, f"kv: parked segment {request.key!r} unusable: {exc}")
        kv = common_pb2.KvHandle(transfer_id=new_id, num_tokens=meta.num_tokens, num_blocks=meta.num_blocks,
                                 num_bytes=meta.data_bytes, transport="shm", location=str(path),
                                 source_worker="kvtransfer-pool", source_host=self.host)
        t = self._new_transfer(kv, request.destination_worker, request.destination_host, request.lease_s)
        await self._notify()
        return t.status()

    async def Drop(self, request, context):
        await self._check_key(request.key, context)
        found = self.pool.release(request.key) if self.pool is not None else False
        return kvtransfer_pb2.DropResponse(found=found)

    # -- housekeeping --------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Expires transfers past their lease and forgets long-ended ones."""
        now = self.clock()
        for tid, t in [(tid, t) for tid, t in self._active.items() if now > t.deadline]:
            log.warning("transfer %s expired (destination %s never completed it)", tid, t.destination_worker)
            await self._end(t, S.EXPIRED, "lease expired")
        while self._ended and now - self._ended[0][0] > KEEP_ENDED_S:
            _, tid, t = self._ended.popleft()
            if self.transfers.get(tid) is t:  # (a Take may have reused the id since)
                del self.transfers[tid]

    def remove_orphans(self, older_than_s: float) -> int:
        """Deletes segment files no active transfer refers to (left by a crashed engine or a previous run of
        this service) once older than ``older_than_s``. Subdirectories (the pool, workers' pulls) are not
        touched: their owners clean them."""
        known = {pathlib.Path(t.kv.location).name for t in self._active.values()}
        removed = 0
        if not self.kv_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        for p in self.kv_dir.iterdir():
            if p.name not in known and p.suffix in (".kv", ".tmp"):
                try:
                    if p.is_file() and p.stat().st_mtime < cutoff:
                        p.unlink()
                        removed += 1
                        log.info("removed orphan segment %s", p.name)
                except FileNotFoundError:
                    pass
        return removed


async def serve(config: KvTransferConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("kvtransfer")
    start_metrics_server(config.host, config.metrics_port)
    os.makedirs(config.kv_dir, exist_ok=True)
    os.environ["DUOPOOL_KV_RECYCLE_MIB"] = str(config.kv_recycle_mib)  # read by duopool.kv.recycle
    service = KvTransferService(config)
    server = Server(config.bind, [(kvtransfer_pb2_grpc.add_KvTransferServicer_to_server, service,
                                   "duopool.v1.KvTransfer")])
    await server.start()
    pool = service.pool.stats() if service.pool else None
    log.info("kvtransfer serving on %s:%d (segments in %s, lease %.1fs, pool %s)", config.host, server.port,
             config.kv_dir, config.lease_s,
             f"{pool.capacity_bytes} bytes {pool.policy}, {pool.entries} adopted" if pool else "disabled")
    huge = huge_pages(pathlib.Path(config.kv_dir))
    if huge:
        log.info("KV segments on a huge-page tmpfs (%s)", huge)
    else:
        log.info("KV segments on 4 KiB pages: same-host transfers run at ~55-60%% of memcpy; a tmpfs mounted "
                 "with huge=within_size as --kv-dir brings them near memcpy (docs/kv-transfer.md)")
    if ready is not None:
        ready.set()
    tick_s = min(0.5, config.lease_s / 4)
    orphan_every_s = max(config.lease_s, 1.0)
    next_orphans = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), tick_s)
        except TimeoutError:
            pass
        await service.sweep()
        metrics.KV_ACTIVE.set(sum(1 for t in service._active.values() if t.state == S.READY))
        if service.pool is not None:
            st = service.pool.stats()
            metrics.KV_PARKED_BYTES.set(st.used_bytes)
            metrics.KV_PARKED.set(st.entries)
        if time.monotonic() >= next_orphans:
            service.remove_orphans(older_than_s=config.lease_s)
            next_orphans = time.monotonic() + orphan_every_s
    await server.stop()
    for t in list(service._active.values()):
        await service._end(t, S.RELEASED, "kvtransfer shutting down")
