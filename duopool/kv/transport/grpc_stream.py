"""Chunked gRPC stream transport: the fallback every endpoint has (pull through ``KvTransfer.Read``).

Source side (the kvtransfer service's ``Read`` handler)::

    def Read(self, request, context):
        yield from grpc_stream.read_chunks(request.transfer_id, request.chunk_bytes)

Destination side::

    with GrpcStreamTransport("10.0.0.5:50061") as t:
        t.receive(transfer_id)   # writes <kv_dir>/<transfer_id>.kv, sealed

Stream format: the first chunk is the source segment's 4 KiB header at offset 0 (the receiver learns the
layout from it), then data chunks at their file offsets. Data chunks hold whole units (blocks of one
layer) when a unit fits in ``chunk_bytes``, else consecutive pieces of one unit, so the receiver marks a
unit received exactly when all of its bytes have landed. Re-sent chunks are written to the same place
(idempotent); a receiver whose segment is already complete cancels the stream.

Resume: the destination keeps a received map. If ``ReadRequest`` has a ``units`` field (proposed:
``repeated uint32 units = 3;``, the units to send, empty = all) the receiver asks only for missing units;
with today's proto the whole segment is streamed again and units already present are skipped.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator, Sequence

import grpc

from duopool.kv.segment import HEADER_BYTES, KvSegment, SegmentMeta, segment_path
from duopool.kv.transport import (
    KvTransport,
    TransferError,
    TransferResult,
    default_dir,
    finish_destination,
    open_destination,
    register_transport,
    runs_of,
    split_runs,
)
from duopool.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 8 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + (64 << 10)),
]
_HAS_UNITS_FIELD = "units" in kvtransfer_pb2.ReadRequest.DESCRIPTOR.fields_by_name


def iter_segment_chunks(seg: KvSegment, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        units: Sequence[int] | None = None) -> Iterator[tuple[int, memoryview]]:
    """(file offset, bytes) chunks of a segment: its header, then the given units (default all)."""
    chunk_bytes = min(max(chunk_bytes or DEFAULT_CHUNK_BYTES, 4096), MAX_CHUNK_BYTES)
    yield 0, memoryview(seg.header_bytes())
    bb = seg.meta.block_bytes
    runs = runs_of(units) if units else ([(0, seg.num_units)] if seg.num_units else [])
    if bb <= chunk_bytes:
        for start, count in split_runs(runs, chunk_bytes // bb):
            yield seg.unit_offset(start), seg.units_view(start, count)
    else:
        for start, count in runs:
            for u in range(start, start + count):
                view = seg.units_view(u)
                for o in range(0, bb, chunk_bytes):
                    yield seg.unit_offset(u) + o, view[o : o + chunk_bytes]


def read_chunks(transfer_id: str, chunk_bytes: int = 0, *, kv_dir: pathlib.Path | str | None = None,
                units: Sequence[int] | None = None) -> Iterator[kvtransfer_pb2.DataChunk]:
    """Body of the ``Read`` RPC: ``DataChunk`` messages of the sealed segment ``transfer_id``.

    Raises ``SegmentError`` at the first ``next()`` if the segment is missing or unsealed (map it to
    NOT_FOUND / FAILED_PRECONDITION). The segment is unmapped when the generator ends or is closed.
    """
    seg = KvSegment.open(segment_path(transfer_id, default_dir(kv_dir)))
    try:
        for offset, data in iter_segment_chunks(seg, chunk_bytes, units):
            yield kvtransfer_pb2.DataChunk(offset=offset, data=bytes(data))
    finally:
        seg.close()


class ChunkReceiver:
    """Writes (offset, bytes) chunks of one transfer into its destination segment; idempotent, resumable.

    Feed the header chunk first (offset 0); then data chunks in any order, any number of times.
    ``finish()`` seals the segment if every unit arrived, else raises :class:`TransferError` and leaves
    the segment unsealed with its received map (resume later with another receiver).
    """

    def __init__(self, transfer_id: str, kv_dir: pathlib.Path | str | None = None) -> None:
        self.transfer_id = transfer_id
        self.kv_dir = default_dir(kv_dir)
        self.segment: KvSegment | None = None
        self.units_moved = 0
        self.units_skipped = 0
        self.bytes_moved = 0
        self._pieces: dict[int, dict[int, int]] = {}  # unit -> offsets of pieces received (units > one chunk)

    @property
    def complete(self) -> bool:
        return self.segment is not None and self.segment.is_complete()

    def missing_units(self) -> list[int]:
        return self.segment.missing_units() if self.segment else []

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset == 0:
            if self.segment is None:
                self._open(bytes(data[:HEADER_BYTES]))
            return
        seg = self.segment
        if seg is None:
            raise TransferError(f"{self.transfer_id}: data chunk before the header")
        bb, n = seg.meta.block_bytes, len(data)
        rel = offset - HEADER_BYTES
        if rel < 0 or offset + n > seg.meta.total_bytes:
            raise TransferError(f"{self.transfer_id}: chunk [{offset}, {offset + n}) outside the segment")
        first, within = divmod(rel, bb)
        if within == 0 and n % bb == 0:  # whole units
            count = n // bb
            missing = [r for r in seg.missing_runs() if r[0] < first + count and r[0] + r[1] > first]
            if not missing:
                self.units_skipped += count
                return
            seg.units_view(first, count)[:] = data
            seg.mark_units(first, count)
            self.units_moved += count
            self.bytes_moved += n
            return
        if within + n > bb:
            raise TransferError(f"{self.transfer_id}: chunk at {offset} straddles units")
        if seg.is_received(first):
            self.units_skipped += within == 0
            return
        seg.units_view(first)[within : within + n] = data
        self.bytes_moved += n
        got = self._pieces.setdefault(first, {})
        got[within] = max(n, got.get(within, 0))
        if _covers(got, bb):
            seg.mark_units(first)
            self.units_moved += 1
            del self._pieces[first]

    def _open(self, header: bytes) -> None:
        meta = _parse_header(header)
        if meta.transfer_id != self.transfer_id:
            raise TransferError(f"stream carries transfer {meta.transfer_id!r}, expected {self.transfer_id!r}")
        self.segment, _ = open_destination(meta, self.kv_dir)

    def finish(self) -> KvSegment:
        if self.segment is None:
            raise TransferError(f"{self.transfer_id}: no header received")
        finish_destination(self.segment)
        if not self.segment.meta.sealed:
            raise TransferError(f"{self.transfer_id}: stream ended with {len(self.missing_units())} units missing")
        return self.segment

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()


def _covers(pieces: dict[int, int], size: int) -> bool:
    end = 0
    for start in sorted(pieces):
        if start > end:
            return False
        end = max(end, start + pieces[start])
    return end >= size


def _parse_header(header: bytes) -> SegmentMeta:
    import struct

    from duopool.kv.segment import MAGIC, VERSION

    magic, version, length = struct.unpack_from("<4sII", header)
    if magic != MAGIC or version != VERSION:
        raise TransferError(f"not a duopool KV segment header (magic {magic!r}, version {version})")
    return SegmentMeta.from_json(header[12 : 12 + length])


@register_transport
class GrpcStreamTransport(KvTransport):
    """Pulls segments from a remote kvtransfer service's ``Read`` stream into the local ``kv_dir``."""

    name = "grpc"
    push = False

    def __init__(self, target: str | grpc.Channel | None = None, kv_dir: pathlib.Path | str | None = None, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, source_kv_dir: pathlib.Path | str | None = None) -> None:
        """``target`` (host:port or a channel) is the source's kvtransfer service; None for a source-only
        instance. ``source_kv_dir`` is where ``send`` looks for segments (default ``kv_dir``)."""
        self.kv_dir = default_dir(kv_dir)
        self.source_kv_dir = default_dir(source_kv_dir) if source_kv_dir is not None else self.kv_dir
        self.chunk_bytes = chunk_bytes
        self._own_channel = isinstance(target, str)
        if isinstance(target, str):
            from duopool.common.clusterauth import sync_channel

            self._channel = sync_channel(target, options=GRPC_OPTIONS)  # kvtransfer wants the cluster token
        else:
            self._channel = target
        self._stub = kvtransfer_pb2_grpc.KvTransferStub(self._channel) if self._channel is not None else None

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        """Checks the sealed segment; the destination pulls it through ``Read``."""
        with KvSegment.open(segment_path(transfer_id, self.source_kv_dir)) as seg:
            return TransferResult(transfer_id, self.name, "ready", location=str(seg.path))

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        if transfer_id is None:
            raise TransferError("grpc is pull-based: give a transfer_id")
        if self._stub is None:
            raise TransferError("no source target configured")
        t0 = time.perf_counter()
        rx = ChunkReceiver(transfer_id, self.kv_dir)
        path = segment_path(transfer_id, self.kv_dir)
        request = kvtransfer_pb2.ReadRequest(transfer_id=transfer_id, chunk_bytes=self.chunk_bytes)
        if path.exists():
            try:
                seg = KvSegment.open(path, require_sealed=False, writable=True)
            except Exception:
                seg = None
            if seg is not None and seg.meta.sealed:
                n = seg.num_units
                seg.close()
                return TransferResult(transfer_id, self.name, "completed", 0, 0, n, time.perf_counter() - t0,
                                      str(path))
            if seg is not None:
                if _HAS_UNITS_FIELD and seg.has_block_map:
                    request.units.extend(seg.missing_units())  # type: ignore[attr-defined]
                seg.close()
        call = self._stub.Read(request, timeout=timeout_s)
        try:
            for chunk in call:
                rx.write(chunk.offset, chunk.data)
                if rx.segment is not None and rx.units_moved == 0 and rx.complete:
                    call.cancel()  # already complete: idempotent no-op
                    break
            rx.finish()
            return TransferResult(transfer_id, self.name, "completed", rx.bytes_moved, rx.units_moved,
                                  rx.segment.num_units - rx.units_moved if rx.segment else 0,
                                  time.perf_counter() - t0, str(path))
        except grpc.RpcError as exc:
            raise TransferError(f"{transfer_id}: Read failed: {exc.code()} {exc.details()}") from exc
        finally:
            rx.close()

    def close(self) -> None:
        if self._own_channel and self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None


class KvReadServicer(kvtransfer_pb2_grpc.KvTransferServicer):
    """Serves only ``Read`` from a directory of segments (tests, the benchmark, a bare data agent)."""

    def __init__(self, kv_dir: pathlib.Path | str | None = None, *, fail_after_chunks: int | None = None) -> None:
        """``fail_after_chunks`` aborts the first stream after that many chunks (fault injection)."""
        self.kv_dir = default_dir(kv_dir)
        self.fail_after_chunks = fail_after_chunks

    def Read(self, request, context):  # noqa: N802 (grpc naming)
        from duopool.kv.segment import SegmentError

        try:
            gen = read_chunks(request.transfer_id, request.chunk_bytes, kv_dir=self.kv_dir,
                              units=list(getattr(request, "units", ())) or None)
            first = next(gen)
        except SegmentError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            return
        yield first
        for i, chunk in enumerate(gen, start=1):
            if self.fail_after_chunks is not None and i >= self.fail_after_chunks:
                self.fail_after_chunks = None
                gen.close()
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
                return
            yield chunk


def serve_read(kv_dir: pathlib.Path | str | None = None, *, host: str = "127.0.0.1", port: int = 0,
               max_workers: int = 4, fail_after_chunks: int | None = None) -> tuple[grpc.Server, int]:
    """Starts a gRPC server with :class:`KvReadServicer` on ``host:port`` (0 = free port)."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    kvtransfer_pb2_grpc.add_KvTransferServicer_to_server(KvReadServicer(kv_dir, fail_after_chunks=fail_after_chunks), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound
