"""torch.distributed gloo transport: CPU KV segments across hosts over a long-lived pair group.

The CPU twin of the NCCL path (same protocol, :mod:`duopool.kv.transport._torchdist`). The pair group is
created once per pair of agents (``GlooTransport.connect``), not per request: a round trip costs ~0.3 ms,
a group set-up tens of ms.

Rendezvous: a ``file://`` store (``init_file``, both agents on one host or a shared filesystem) and the
gloo device bound to ``host`` (default 127.0.0.1), so nothing listens on other interfaces. Across hosts
pass ``host`` = this agent's data-plane address and a ``store`` both agents reach (e.g. a TCPStore run by
one of them).

Usage (both ranks, e.g. source agent rank 0, destination agent rank 1)::

    t = GlooTransport.connect(rank, init_file, kv_dir=...)
    t.send(transfer_id)          # rank 0: push the sealed segment <kv_dir>/<id>.kv
    t.receive()                  # rank 1: accept the next push into <kv_dir>/<id>.kv (sealed)
    t.close()
"""

from __future__ import annotations

import datetime
import os
import pathlib

from duopool.kv.segment import KvSegment, segment_path
from duopool.kv.transport import (
    KvTransport,
    TransferError,
    TransferResult,
    TransportUnavailable,
    default_dir,
    register_transport,
)


def _torch_dist():
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - torch is installed with vllm
        raise TransportUnavailable(f"torch.distributed unavailable: {exc}") from exc
    if not dist.is_available() or not hasattr(dist, "ProcessGroupGloo"):
        raise TransportUnavailable("torch.distributed has no gloo backend")
    return dist


@register_transport
class GlooTransport(KvTransport):
    name = "gloo"
    push = True

    def __init__(self, channel: object, kv_dir: pathlib.Path | str | None = None, *,
                 piece_bytes: int | None = None, init_file: pathlib.Path | None = None) -> None:
        from duopool.kv.transport._torchdist import DEFAULT_PIECE_BYTES

        self.channel = channel
        self.kv_dir = default_dir(kv_dir)
        self.piece_bytes = piece_bytes or DEFAULT_PIECE_BYTES
        self._init_file = init_file
        self._closed = False

    @classmethod
    def is_available(cls) -> bool:
        try:
            _torch_dist()
        except (TransportUnavailable, ImportError):
            return False
        return True

    @classmethod
    def connect(cls, rank: int, init_file: pathlib.Path | str, kv_dir: pathlib.Path | str | None = None, *,
                host: str = "127.0.0.1", store: object | None = None, timeout_s: float = 300.0,
                window: int = 4, piece_bytes: int | None = None) -> GlooTransport:
        """Creates this rank's end of the pair group (blocks until the peer joins, up to ``timeout_s``).

        ``timeout_s`` is also the longest any single wait may take (gloo closes the pair on timeout).
        """
        dist = _torch_dist()
        from duopool.kv.transport._torchdist import PairChannel, file_store

        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 or 1, not {rank}")
        if host.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = datetime.timedelta(seconds=timeout_s)
        opts._threads = 2
        pg = dist.ProcessGroupGloo(store or file_store(init_file), rank, 2, opts)
        pg.barrier().wait()  # both ends connected: the rendezvous file is no longer needed
        if store is None and rank == 0:
            try:
                os.unlink(init_file)
            except FileNotFoundError:
                pass
        return cls(PairChannel(pg, rank, "cpu", window=window, timeout_s=timeout_s), kv_dir,
                   piece_bytes=piece_bytes)

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        """Pushes the units of the sealed segment that the peer is missing; returns after its ack."""
        from duopool.kv.transport._torchdist import SegmentBlocks

        self._check_open()
        with KvSegment.open(segment_path(transfer_id, self.kv_dir)) as seg:
            res = self.channel.push(SegmentBlocks(seg, self.piece_bytes))  # type: ignore[attr-defined]
        return TransferResult(transfer_id, self.name, res.state, res.bytes_moved, res.units_moved,
                              res.units_skipped, res.seconds)

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        """Accepts the peer's next push into ``kv_dir`` (resuming a partial segment of the same id).

        Blocks until an offer arrives (at most the pair's timeout, after which the pair is broken). If
        ``transfer_id`` is given and the peer pushed another transfer, that one is still stored and
        :class:`TransferError` is raised.
        """
        from duopool.kv.transport._torchdist import receive_into_segments

        self._check_open()
        res = receive_into_segments(self.channel, self.kv_dir, self.piece_bytes)  # type: ignore[arg-type]
        if transfer_id is not None and res.transfer_id != transfer_id:
            raise TransferError(f"expected transfer {transfer_id!r}, peer pushed {res.transfer_id!r} (stored)")
        return TransferResult(res.transfer_id, self.name, res.state, res.bytes_moved, res.units_moved,
                              res.units_skipped, res.seconds, res.location)

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("transport closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ch = self.channel
        ch.say_bye()  # type: ignore[attr-defined]
        try:
            ch.pg.shutdown()  # type: ignore[attr-defined]
        except Exception:
            pass
