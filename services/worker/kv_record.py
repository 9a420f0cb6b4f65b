"""A worker's KV bookkeeping to kvtransfer, batched without delay: ``KvRecorder``.

Every exported KV is announced (StartTransfer) and every load reported (CompleteTransfer). Sent one by one
they cost two broker calls per request, which at a few hundred requests a second is a large share of a
small host's CPU. The recorder sends the first item at once; what arrives while that call is in flight
goes together in the next ``Record`` call, and so on. So at low load nothing waits (one call per item, as
before) and at high load the calls per request fall with the load. Each item's caller gets its own answer.
A ``Record`` call runs in the context of its batch's first item (so it shows in that request's trace).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

from duopool.v1 import kvtransfer_pb2

Send = Callable[[kvtransfer_pb2.RecordRequest], Awaitable[kvtransfer_pb2.RecordResponse]]


class KvRecorder:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._starts: list[tuple[kvtransfer_pb2.StartTransferRequest, asyncio.Future]] = []
        self._completes: list[tuple[kvtransfer_pb2.CompleteTransferRequest, asyncio.Future]] = []
        self._contexts: list[contextvars.Context] = []  # of each pending item, oldest first
        self._flushing: asyncio.Task | None = None
        self.calls = 0  # Record calls sent (for tests and stats)

    def start(self, item: kvtransfer_pb2.StartTransferRequest) -> asyncio.Future:
        """The broker's answer to this StartTransfer (a TransferStatus; ``error`` set if it was refused).
        The future raises the call's error (grpc.aio.AioRpcError) if the batch could not be sent."""
        return self._add(self._starts, item)

    def complete(self, item: kvtransfer_pb2.CompleteTransferRequest) -> asyncio.Future:
        return self._add(self._completes, item)

    def _add(self, queue: list, item) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        queue.append((item, fut))
        self._contexts.append(contextvars.copy_context())
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        try:
            while self._starts or self._completes:
                starts, self._starts = self._starts, []
                completes, self._completes = self._completes, []
                context, self._contexts = self._contexts[0], []
                self.calls += 1
                try:
                    resp = await asyncio.get_running_loop().create_task(self._send(kvtransfer_pb2.RecordRequest(
                        starts=[s for s, _ in starts], completes=[c for c, _ in completes])), context=context)
                except Exception as exc:  # noqa: BLE001 - every waiting caller gets the call's error
                    for _, fut in starts + completes:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), st in zip(starts, resp.starts, strict=False):
                    if not fut.done():
                        fut.set_result(st)
                for (_, fut), st in zip(completes, resp.completes, strict=False):
                    if not fut.done():
                        fut.set_result(st)
                for _, fut in starts + completes:  # an answer shorter than the batch: say so, never hang
                    if not fut.done():
                        fut.set_result(kvtransfer_pb2.TransferStatus(error="INTERNAL: no answer for this item"))
        finally:
            self._flushing = None
