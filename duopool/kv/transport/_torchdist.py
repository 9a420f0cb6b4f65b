"""The push protocol shared by the torch.distributed transports (gloo on CPU, NCCL on GPU).

A *pair* is a long-lived two-rank process group between two agents, created once (``connect``), off the
request path. Either rank can push a transfer to the other; the two directions use separate tags, so
pushes can run both ways at once (one at a time per direction).

One push (sender S, receiver R; ``tag = 10 + 2 * S_rank`` for S→R, ``+1`` for R→S)::

    S → R  offer   {"transfer_id", "meta": SegmentMeta JSON, "piece_units"}
    R → S  reply   {"missing": [[start, count], ...], "piece_units"}     # resume / idempotency
    S → R  data    the missing units, cut into pieces of min(piece_units) units, ``window`` in flight
    R → S  ack     {"ok": true, "units": n}                               # R has marked and sealed

Messages are an int64 length followed by a uint8 payload (JSON). The data pieces are byte views of
contiguous units (layer-major), so a CPU segment sends straight from its mapping and receives straight into
the destination mapping (no staging copy). Device blocks (NCCL) go through :class:`BlockSource` /
:class:`BlockSink` implementations that stage scattered paged blocks into one contiguous device buffer.

Failure model: any error or timeout inside a push leaves the pair unusable (gloo closes it on timeout)
and raises ``TransferError``; the destination segment keeps its received map, so the next push of the same
transfer (over a new pair, or another transport) moves only what is missing.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import threading
import time
import warnings
from typing import Protocol

import torch

from duopool.kv.segment import KvSegment, SegmentMeta, segment_path
from duopool.kv.transport import (
    TransferError,
    TransferResult,
    finish_destination,
    open_destination,
    split_runs,
)

DEFAULT_PIECE_BYTES = 4 << 20
DEFAULT_WINDOW = 4


class BlockSource(Protocol):
    meta: SegmentMeta

    def max_piece_units(self) -> int: ...

    def units_tensor(self, start: int, count: int) -> torch.Tensor:
        """1-D uint8 tensor of ``count`` consecutive units (layer-major) to send."""
        ...


class BlockSink(Protocol):
    meta: SegmentMeta

    def max_piece_units(self) -> int: ...

    def missing_runs(self) -> list[tuple[int, int]]: ...

    def units_tensor(self, start: int, count: int) -> torch.Tensor:
        """1-D uint8 tensor to receive ``count`` units into."""
        ...

    def commit(self, start: int, count: int) -> None:
        """The units have landed in ``units_tensor(start, count)``: place and mark them."""
        ...

    def finish(self) -> bool:
        """Called after the last piece; True if every unit is present (and sealed)."""
        ...


def _as_tensor(view: memoryview) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only source mappings: we only send from them
        return torch.frombuffer(view, dtype=torch.uint8)


class SegmentBlocks:
    """A KV segment as a block source (sealed, read-only) or sink (with a received map)."""

    def __init__(self, seg: KvSegment, piece_bytes: int = DEFAULT_PIECE_BYTES) -> None:
        self.seg = seg
        self.meta = seg.meta
        self._piece_units = max(1, piece_bytes // max(1, seg.meta.block_bytes))

    def max_piece_units(self) -> int:
        return self._piece_units

    def missing_runs(self) -> list[tuple[int, int]]:
        return self.seg.missing_runs()

    def units_tensor(self, start: int, count: int) -> torch.Tensor:
        return _as_tensor(self.seg.units_view(start, count))

    def commit(self, start: int, count: int) -> None:
        self.seg.mark_units(start, count)

    def finish(self) -> bool:
        finish_destination(self.seg)
        return self.seg.meta.sealed


class PairChannel:
    """One rank's end of a two-rank process group, speaking the push protocol above."""

    def __init__(self, pg: object, rank: int, device: str = "cpu", *, window: int = DEFAULT_WINDOW,
                 timeout_s: float = 300.0) -> None:
        self.pg = pg
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device(device)
        self.window = max(1, window)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.broken: str | None = None
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()

    # -- framing ----------------------------------------------------------------------------------------
    def _tag(self, sender: int, back: bool) -> int:
        return 10 + 2 * sender + int(back)

    def _wait(self, work: object) -> None:
        work.wait(self.timeout)  # type: ignore[attr-defined]

    def _send_msg(self, obj: dict, tag: int) -> None:
        raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        n = torch.tensor([raw.numel()], dtype=torch.int64)
        works = [self.pg.send([n.to(self.device)], self.peer, tag),  # type: ignore[attr-defined]
                 self.pg.send([raw.to(self.device)], self.peer, tag)]  # type: ignore[attr-defined]
        for w in works:
            self._wait(w)

    def _recv_msg(self, tag: int) -> dict:
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(self.pg.recv([n], self.peer, tag))  # type: ignore[attr-defined]
        raw = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self._wait(self.pg.recv([raw], self.peer, tag))  # type: ignore[attr-defined]
        return json.loads(raw.cpu().numpy().tobytes())

    def _check(self) -> None:
        if self.broken:
            raise TransferError(f"pair is broken ({self.broken}); reconnect")

    # -- sender -----------------------------------------------------------------------------------------
    def push(self, source: BlockSource) -> TransferResult:
        """Moves the units of ``source`` the receiver is missing; returns after its ack."""
        self._check()
        t0 = time.perf_counter()
        fwd, back = self._tag(self.rank, False), self._tag(self.rank, True)
        meta = source.meta
        with self._send_lock:
            try:
                self._send_msg({"op": "offer", "transfer_id": meta.transfer_id, "meta": meta.to_json().decode(),
                                "piece_units": source.max_piece_units()}, fwd)
                reply = self._recv_msg(back)
                if "error" in reply:
                    raise TransferError(f"{meta.transfer_id}: receiver refused: {reply['error']}")
                missing = [tuple(r) for r in reply["missing"]]
                pieces = split_runs(missing, min(source.max_piece_units(), int(reply["piece_units"])))
                inflight: list[object] = []
                for start, count in pieces:
                    inflight.append(self.pg.send([source.units_tensor(start, count)], self.peer, fwd))  # type: ignore[attr-defined]
                    if len(inflight) >= self.window:
                        self._wait(inflight.pop(0))
                for w in inflight:
                    self._wait(w)
                ack = self._recv_msg(back)
            except TransferError:
                raise
            except Exception as exc:  # gloo/nccl errors: the pair is unusable now
                self.broken = str(exc)[:200]
                raise TransferError(f"{meta.transfer_id}: push failed: {exc}") from exc
        if not ack.get("ok"):
            raise TransferError(f"{meta.transfer_id}: receiver failed: {ack.get('error', 'unknown')}")
        moved = sum(c for _, c in missing)
        return TransferResult(meta.transfer_id, "", "completed", moved * meta.block_bytes, moved,
                              meta.num_layers * meta.num_blocks - moved, time.perf_counter() - t0)

    # -- receiver ---------------------------------------------------------------------------------------
    def accept(self, open_sink) -> TransferResult:  # open_sink: (SegmentMeta) -> BlockSink
        """Waits for the peer's next offer and receives it into ``open_sink(meta)``."""
        self._check()
        fwd, back = self._tag(self.peer, False), self._tag(self.peer, True)
        with self._recv_lock:
            try:
                offer = self._recv_msg(fwd)
                t0 = time.perf_counter()
                if offer.get("op") == "bye":
                    self.broken = "peer closed"
                    raise TransferError("peer closed the pair")
                meta = SegmentMeta.from_json(offer["meta"].encode())
                try:
                    sink = open_sink(meta)
                except Exception as exc:
                    self._send_msg({"error": str(exc)}, back)
                    raise TransferError(f"{meta.transfer_id}: cannot open destination: {exc}") from exc
                missing = sink.missing_runs()
                piece_units = min(sink.max_piece_units(), int(offer["piece_units"]))
                self._send_msg({"missing": missing, "piece_units": sink.max_piece_units()}, back)
                inflight: list[tuple[object, int, int]] = []
                for start, count in split_runs(missing, piece_units):
                    work = self.pg.recv([sink.units_tensor(start, count)], self.peer, fwd)  # type: ignore[attr-defined]
                    inflight.append((work, start, count))
                    if len(inflight) >= self.window:
                        w, s, c = inflight.pop(0)
                        self._wait(w)
                        sink.commit(s, c)
                for w, s, c in inflight:
                    self._wait(w)
                    sink.commit(s, c)
                ok = sink.finish()
                self._send_msg({"ok": ok, "units": sum(c for _, c in missing)}, back)
            except TransferError:
                raise
            except Exception as exc:
                self.broken = str(exc)[:200]
                raise TransferError(f"receive failed: {exc}") from exc
        moved = sum(c for _, c in missing)
        return TransferResult(meta.transfer_id, "", "completed", moved * meta.block_bytes, moved,
                              meta.num_layers * meta.num_blocks - moved, time.perf_counter() - t0,
                              extra={"sink": sink})

    def say_bye(self) -> None:
        """Tells the peer's receiver this end is closing (best effort)."""
        if self.broken:
            return
        saved, self.timeout = self.timeout, datetime.timedelta(seconds=2)
        try:
            if self._send_lock.acquire(timeout=2):
                try:
                    self._send_msg({"op": "bye"}, self._tag(self.rank, False))
                finally:
                    self._send_lock.release()
        except Exception:
            pass
        finally:
            self.timeout = saved
            self.broken = "closed"


def file_store(init_file: pathlib.Path | str, world_size: int = 2) -> object:
    """A FileStore rendezvous (both agents on one host / a shared filesystem; no listening socket)."""
    from torch.distributed import FileStore

    return FileStore(str(init_file), world_size)


def receive_into_segments(channel: PairChannel, kv_dir: pathlib.Path, piece_bytes: int) -> TransferResult:
    """``accept`` with sinks that are destination segments in ``kv_dir`` (resumable, idempotent)."""
    opened: list[KvSegment] = []

    def open_sink(meta: SegmentMeta) -> SegmentBlocks:
        seg, _ = open_destination(meta, kv_dir)
        opened.append(seg)
        return SegmentBlocks(seg, piece_bytes)

    try:
        res = channel.accept(open_sink)
    finally:
        for seg in opened:
            seg.close()
    return TransferResult(res.transfer_id, "", res.state, res.bytes_moved, res.units_moved, res.units_skipped,
                          res.seconds, str(segment_path(res.transfer_id, kv_dir)))
