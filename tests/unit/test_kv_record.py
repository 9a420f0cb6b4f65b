"""The worker's batched KV bookkeeping (KvRecorder): nothing waits at low load, what piles up while a call is
in flight goes in one next call, every caller gets its own item's answer or the call's error."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from duopool.v1 import kvtransfer_pb2
from duopool.worker.kv_record import KvRecorder

pytestmark = pytest.mark.unit
S = kvtransfer_pb2


def start(tid: str) -> S.StartTransferRequest:
    return S.StartTransferRequest(kv={"transfer_id": tid})


class Broker:
    def __init__(self, fail: Exception | None = None, short: bool = False) -> None:
        self.batches: list[tuple[list[str], list[str]]] = []
        self.gate = asyncio.Event()
        self.fail, self.short = fail, short

    async def send(self, req: S.RecordRequest) -> S.RecordResponse:
        self.batches.append(([s.kv.transfer_id for s in req.starts], [c.transfer_id for c in req.completes]))
        await self.gate.wait()
        if self.fail:
            raise self.fail
        out = S.RecordResponse(starts=[S.TransferStatus(transfer_id=s.kv.transfer_id, state=S.READY)
                                       for s in req.starts],
                               completes=[S.TransferStatus(transfer_id=c.transfer_id, state=S.COMPLETED)
                                          for c in req.completes])
        if self.short:
            del out.completes[:]
        return out


def test_first_item_goes_at_once_and_the_rest_pile_into_the_next_call():
    async def scenario():
        broker = Broker()
        rec = KvRecorder(broker.send)
        first = rec.start(start("a"))
        for _ in range(3):  # a few loop turns, no timer: the flush task, then its send task
            await asyncio.sleep(0)
        assert broker.batches == [(["a"], [])]  # sent alone, without waiting for company
        later = [rec.start(start("b")), rec.complete(S.CompleteTransferRequest(transfer_id="z", ok=True)),
                 rec.start(start("c"))]
        broker.gate.set()
        got = await asyncio.gather(first, *later)
        assert broker.batches == [(["a"], []), (["b", "c"], ["z"])] and rec.calls == 2
        assert [g.transfer_id for g in got] == ["a", "b", "z", "c"]
        assert [g.state for g in got] == [S.READY, S.READY, S.COMPLETED, S.READY]
        alone = await asyncio.wait_for(rec.start(start("d")), 5)  # idle again: goes at once
        assert alone.transfer_id == "d" and rec.calls == 3

    asyncio.run(scenario())


def test_a_failed_call_fails_every_item_of_it_and_a_short_answer_never_hangs():
    async def scenario():
        err = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        broker = Broker(fail=err)
        broker.gate.set()
        rec = KvRecorder(broker.send)
        futs = [rec.start(start("a")), rec.complete(S.CompleteTransferRequest(transfer_id="b"))]
        for f in futs:
            with pytest.raises(grpc.aio.AioRpcError):
                await f
        short = Broker(short=True)
        short.gate.set()
        rec = KvRecorder(short.send)
        st = await asyncio.wait_for(rec.complete(S.CompleteTransferRequest(transfer_id="x")), 5)
        assert st.error.startswith("INTERNAL")

    asyncio.run(scenario())
