"""A request whose stream is closed while it sits at a yield (the client went away while a message was being
sent to it) cancels its worker call at once. Closing a generator there raises GeneratorExit at the yield,
which never reaches the worker call it iterates; without an explicit cancel the call lives on (it and its
reader form a reference cycle) and the worker generates for nobody until the garbage collector runs."""

from __future__ import annotations

import asyncio
import gc

import pytest

from duopool.common.config import RouterConfig
from duopool.router.server import RouterService
from duopool.v1 import common_pb2, router_pb2, scheduler_pb2, worker_pb2

pytestmark = pytest.mark.unit


class _Stream:
    """A server-streaming call: endless tokens until cancelled."""

    def __init__(self, make):
        self.make = make
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        while not self.cancelled:
            await asyncio.sleep(0)
            yield self.make()


class _Scheduler:
    def __init__(self, local: bool):
        self.local, self.released = local, []

    async def Place(self, request, timeout=None):
        decode = "w0" if self.local else "w1"
        return scheduler_pb2.Placement(
            request_id=request.request_id, policy="test",
            prefill=common_pb2.WorkerInfo(worker_id="w0", address="127.0.0.1:1"),
            decode=common_pb2.WorkerInfo(worker_id=decode, address="127.0.0.1:1" if self.local else "127.0.0.1:2"))

    async def Release(self, request, timeout=None):
        self.released.append(request.request_id)
        return scheduler_pb2.ReleaseResponse()


class _Worker:
    def __init__(self):
        self.streams: list[_Stream] = []

    async def Prefill(self, request, timeout=None):
        return worker_pb2.PrefillResponse(prompt_token_ids=[1, 2, 3], first_token_id=7, first_token_text="a",
                                          max_tokens=request.max_tokens)

    def Decode(self, request, timeout=None):
        self.streams.append(_Stream(lambda: worker_pb2.DecodeResponse(text="b", token_ids=[8])))
        return self.streams[-1]

    def PrefillDecode(self, request, timeout=None):
        self.streams.append(_Stream(lambda: worker_pb2.LocalResponse(
            text="b", token_ids=[8], prompt_token_ids=[1, 2, 3], max_tokens=request.max_tokens)))
        return self.streams[-1]


class _Session:
    """SchedulerSession's interface, answered by the fake scheduler."""

    def __init__(self, scheduler: _Scheduler) -> None:
        self.scheduler = scheduler

    async def place(self, req, timeout):
        return await self.scheduler.Place(req, timeout=timeout)

    async def release(self, req):
        await self.scheduler.Release(req)

    async def close(self) -> None:
        return None


class _Router(RouterService):
    def __init__(self, local: bool):
        super().__init__(RouterConfig())
        self._scheduler, self._worker = _Scheduler(local), _Worker()
        self.session = _Session(self._scheduler)  # the real session is tested against a real scheduler

    @property
    def scheduler(self):
        return self._scheduler

    def worker(self, address):
        return self._worker


@pytest.mark.parametrize("local", [False, True], ids=["prefill-decode", "one-worker"])
@pytest.mark.parametrize("klass", [common_pb2.ONLINE, common_pb2.OFFLINE])
def test_closing_the_request_stream_at_a_yield_cancels_the_worker_call(local, klass):
    async def scenario():
        router = _Router(local)
        gc.disable()  # the bug hid behind the garbage collector: it must not be what cancels the call
        try:
            stream = router.generate(router_pb2.GenerateRequest(text="hi", max_tokens=1000, request_class=klass,
                                                                request_id="r1"))
            for _ in range(5):
                await anext(stream)
            assert router._worker.streams and not router._worker.streams[-1].cancelled
            await stream.aclose()  # what the gRPC server or the HTTP layer does when the client is gone
            assert router._worker.streams[-1].cancelled, "the worker call outlived its request"
            await asyncio.sleep(0.05)
            assert router._scheduler.released == ["r1"] and not router.inflight
        finally:
            gc.enable()

    asyncio.run(scenario())
