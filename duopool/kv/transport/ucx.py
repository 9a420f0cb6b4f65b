"""UCX transport through ``ucxx`` (GPU hosts with UCX; RDMA / NVLink / TCP chosen by UCX).

Import-guarded: ``ucxx`` is not installed on CPU development hosts, where ``is_available()`` is False
and ``connect`` raises :class:`TransportUnavailable`. The wire protocol is the torch.distributed one
(:class:`duopool.kv.transport._torchdist.PairChannel`): :class:`UcxPairGroup` adapts a ucxx endpoint to the
``send([tensor], peer, tag)`` / ``recv(...)`` -> work-with-``wait(timeout)`` surface the channel uses, so
the protocol, resume and idempotency code is the one tested with gloo. Device tensors (CUDA) are sent
directly (ucxx takes ``__cuda_array_interface__`` buffers).

Not exercised on this machine: the adapter below is the whole UCX-specific surface, kept small on purpose.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import pathlib
import threading

from duopool.kv.transport import (
    KvTransport,
    TransferResult,
    TransportUnavailable,
    default_dir,
    register_transport,
)


def unavailable_reason() -> str:
    return "" if importlib.util.find_spec("ucxx") is not None else "ucxx is not installed (pip install ucxx-cu12)"


class _Work:
    def __init__(self, fut) -> None:
        self._fut = fut

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self._fut.result(timeout.total_seconds() if timeout else None)
        return True


class UcxPairGroup:  # pragma: no cover - needs ucxx
    """A ucxx endpoint driven from a private event loop thread, looking like a 2-rank process group."""

    def __init__(self, endpoint, loop: asyncio.AbstractEventLoop, closer) -> None:
        self.ep, self.loop, self._closer = endpoint, loop, closer

    def send(self, tensors, peer: int, tag: int) -> _Work:
        return _Work(asyncio.run_coroutine_threadsafe(self.ep.send(tensors[0], tag=tag), self.loop))

    def recv(self, tensors, peer: int, tag: int) -> _Work:
        return _Work(asyncio.run_coroutine_threadsafe(self.ep.recv(tensors[0], tag=tag), self.loop))

    def barrier(self):
        return _Work(asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop))

    def shutdown(self) -> None:
        self._closer()


@register_transport
class UcxTransport(KvTransport):
    name = "ucx"
    push = True

    unavailable_reason = staticmethod(unavailable_reason)

    def __init__(self, channel: object, kv_dir: pathlib.Path | str | None = None) -> None:
        self.channel = channel
        self.kv_dir = default_dir(kv_dir)

    @classmethod
    def is_available(cls) -> bool:
        return not unavailable_reason()

    @classmethod
    def connect(cls, rank: int, host: str, port: int, kv_dir: pathlib.Path | str | None = None, *,
                device: str = "cpu", timeout_s: float = 300.0) -> UcxTransport:  # pragma: no cover - needs ucxx
        """Rank 0 listens on ``host:port`` (this agent's data-plane address), rank 1 connects to it."""
        reason = unavailable_reason()
        if reason:
            raise TransportUnavailable(f"ucx: {reason}")
        import ucxx

        from duopool.kv.transport._torchdist import PairChannel

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="ucx-pair", daemon=True)
        thread.start()
        ready: asyncio.Future = loop.create_future()

        async def setup():
            if rank == 0:
                listener = ucxx.create_listener(lambda ep: ready.set_result(ep) if not ready.done() else None, port)
                ep = await asyncio.wait_for(ready, timeout_s)
                return ep, listener
            return await ucxx.create_endpoint(host, port), None

        ep, listener = asyncio.run_coroutine_threadsafe(setup(), loop).result(timeout_s)

        def closer() -> None:
            async def _close():
                await ep.close()
                if listener is not None:
                    listener.close()
            try:
                asyncio.run_coroutine_threadsafe(_close(), loop).result(5)
            finally:
                loop.call_soon_threadsafe(loop.stop)

        return cls(PairChannel(UcxPairGroup(ep, loop, closer), rank, device, timeout_s=timeout_s), kv_dir)

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:  # pragma: no cover
        from duopool.kv.segment import KvSegment, segment_path
        from duopool.kv.transport._torchdist import SegmentBlocks

        with KvSegment.open(segment_path(transfer_id, self.kv_dir)) as seg:
            return self.channel.push(SegmentBlocks(seg))  # type: ignore[attr-defined]

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:  # pragma: no cover
        from duopool.kv.transport._torchdist import DEFAULT_PIECE_BYTES, receive_into_segments

        return receive_into_segments(self.channel, self.kv_dir, DEFAULT_PIECE_BYTES)  # type: ignore[arg-type]

    def close(self) -> None:
        ch, self.channel = self.channel, None
        if ch is not None:
            try:
                ch.pg.shutdown()  # type: ignore[attr-defined]
            except Exception:
                pass
