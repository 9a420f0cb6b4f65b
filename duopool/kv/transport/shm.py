"""Shared-memory transport: source and destination on one host share the segment file itself.

Nothing is copied by the transport: the prefill side's connector wrote the blocks into
``<kv_dir>/<transfer_id>.kv`` (one copy out of its paged cache) and the decode side maps the same file and
copies the blocks into its own cache (one copy in, :meth:`ShmTransport.load_into`). That is the minimum
for two processes with separate caches.

Layer-wise overlap: a producer may create the segment with ``block_map=True`` and ``mark_units`` each
layer as it is written; ``load_into(..., stream=True)`` then copies each run of units as soon as it is
marked, before the segment is sealed, so the consumer's copy-in overlaps the producer's prefill.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from duopool.kv.segment import KvSegment, SegmentError, segment_path
from duopool.kv.transport import KvTransport, TransferError, TransferResult, default_dir, register_transport

_POLL_S = 0.0002


@register_transport
class ShmTransport(KvTransport):
    name = "shm"
    push = False

    def __init__(self, kv_dir: pathlib.Path | str | None = None) -> None:
        self.kv_dir = default_dir(kv_dir)

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        """Checks that the segment is sealed; the destination reads the same file."""
        with KvSegment.open(segment_path(transfer_id, self.kv_dir)) as seg:
            return TransferResult(transfer_id, self.name, "ready", location=str(seg.path))

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        """Waits (up to ``timeout_s``) for the shared segment to be sealed and returns its path."""
        if transfer_id is None:
            raise TransferError("shm is pull-based: give a transfer_id")
        path = segment_path(transfer_id, self.kv_dir)
        deadline = time.monotonic() + (timeout_s or 0.0)
        while True:
            try:
                with KvSegment.open(path) as seg:
                    return TransferResult(transfer_id, self.name, "completed", location=str(path),
                                          units_skipped=seg.num_units)
            except SegmentError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.001)

    def load_into(self, transfer_id: str, dest: memoryview | bytearray, *, stream: bool = False,
                  timeout_s: float = 10.0) -> TransferResult:
        """Copies the segment's data (layer-major blocks) into the preallocated buffer ``dest``.

        With ``stream=True`` runs are copied as the producer marks them (segment created with a block map),
        and the call returns when every unit is copied; otherwise the segment must be sealed.
        """
        t0 = time.perf_counter()
        path = segment_path(transfer_id, self.kv_dir)
        out = memoryview(dest).cast("B")
        deadline = time.monotonic() + timeout_s
        seg = self._open(path, sealed=not stream, deadline=deadline)
        try:
            if out.nbytes < seg.meta.data_bytes:
                raise ValueError(f"destination buffer of {out.nbytes} bytes < {seg.meta.data_bytes}")
            bb = seg.meta.block_bytes
            if not stream or seg.meta.sealed or not seg.has_block_map:
                if not seg.meta.sealed:
                    raise SegmentError(f"{path} is not sealed and has no block map to stream from")
                out[: seg.meta.data_bytes] = seg.data_view()
            else:
                done = bytearray(seg.num_units)
                remaining = seg.num_units
                while remaining:
                    ready = _ready_runs(seg, done)
                    if not ready:
                        if time.monotonic() >= deadline:
                            raise TransferError(f"{transfer_id}: {remaining} units not written within {timeout_s}s")
                        time.sleep(_POLL_S)
                        continue
                    for start, count in ready:
                        out[start * bb : (start + count) * bb] = seg.units_view(start, count)
                        done[start : start + count] = b"\x01" * count
                        remaining -= count
            if not seg.unchanged():
                raise SegmentError(f"{path} was rewritten while it was read (retired and reused for another transfer)")
            return TransferResult(transfer_id, self.name, "completed", seg.meta.data_bytes, seg.num_units, 0,
                                  time.perf_counter() - t0, str(path))
        finally:
            seg.close()

    @staticmethod
    def _open(path: pathlib.Path, *, sealed: bool, deadline: float) -> KvSegment:
        while True:
            try:
                return KvSegment.open(path, require_sealed=sealed, populate=sealed)
            except SegmentError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.001)


def _ready_runs(seg: KvSegment, done: bytearray) -> list[tuple[int, int]]:
    """Runs of units the producer has marked and we have not copied yet."""
    have = np.frombuffer(bytes(seg._map_view()), np.uint8) != 0
    new = have & (np.frombuffer(done, np.uint8) == 0)
    if not new.any():
        return []
    edges = np.diff(np.concatenate(([0], new.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
