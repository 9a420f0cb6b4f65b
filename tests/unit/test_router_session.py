"""The router's scheduler session over real gRPC (an in-process server): replies matched to their Place
out of order, a refusal raised as the unary call would raise it, Releases carried in order, and a stream
that breaks falls back to unary calls and is reopened on next use."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from duopool.router.session import SchedulerSession
from duopool.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.unit


class Scheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.sessions = 0
        self.unary = 0

    async def _place(self, req) -> scheduler_pb2.Placement | tuple[grpc.StatusCode, str]:
        if req.request_id == "refuse":
            return grpc.StatusCode.UNAVAILABLE, "no workers registered"
        await asyncio.sleep(0.2 if req.request_id == "slow" else 0)
        self.events.append(f"place {req.request_id}")
        return scheduler_pb2.Placement(request_id=req.request_id,
                                       prefill=common_pb2.WorkerInfo(worker_id=f"w-{req.request_id}"))

    async def Place(self, request, context):
        self.unary += 1
        out = await self._place(request)
        if isinstance(out, tuple):
            await context.abort(*out)
        return out

    async def Release(self, request, context):
        self.unary += 1
        self.events.append(f"release {request.request_id}")
        return scheduler_pb2.ReleaseResponse()

    async def Session(self, request_iterator, context):
        self.sessions += 1
        replies: asyncio.Queue = asyncio.Queue()

        async def place(seq, req):
            out = await self._place(req)
            replies.put_nowait(scheduler_pb2.SessionReply(seq=seq, code=out[0].value[0], details=out[1])
                               if isinstance(out, tuple) else scheduler_pb2.SessionReply(seq=seq, placement=out))

        async def read():
            tasks = []
            async for m in request_iterator:
                if m.WhichOneof("call") == "place":
                    tasks.append(asyncio.ensure_future(place(m.seq, m.place)))
                else:
                    self.events.append(f"release {m.release.request_id}")
                    if m.release.request_id == "break":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            await asyncio.gather(*tasks)
            replies.put_nowait(None)

        asyncio.ensure_future(read())
        while (r := await replies.get()) is not None:
            yield r


@contextlib.asynccontextmanager
async def _serving(impl: Scheduler):
    """``impl`` served on a real loopback port; a SchedulerSession to it."""
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(impl, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    session = SchedulerSession(lambda: stub)
    try:
        yield session
    finally:
        await session.close()
        await channel.close()
        await server.stop(0)


def test_session_places_releases_and_survives_a_broken_stream():
    async def scenario():
        impl = Scheduler()
        async with _serving(impl) as session:
            slow = asyncio.ensure_future(session.place(scheduler_pb2.PlaceRequest(request_id="slow"), 5))
            fast = await session.place(scheduler_pb2.PlaceRequest(request_id="fast"), 5)
            assert fast.prefill.worker_id == "w-fast" and not slow.done()  # answered out of order
            assert (await slow).prefill.worker_id == "w-slow"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await session.place(scheduler_pb2.PlaceRequest(request_id="refuse"), 5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no workers" in err.value.details()
            await session.release(scheduler_pb2.ReleaseRequest(request_id="fast"))
            await session.release(scheduler_pb2.ReleaseRequest(request_id="break"))  # the server ends the stream
            for _ in range(50):
                if session._call is None:
                    break
                await asyncio.sleep(0.02)
            again = await session.place(scheduler_pb2.PlaceRequest(request_id="after"), 5)
            assert again.prefill.worker_id == "w-after"
            assert impl.sessions == session.opened == 2 and impl.unary == 0
            assert impl.events == ["place fast", "place slow", "release fast", "release break", "place after"]

    asyncio.run(scenario())


def test_a_session_the_server_cannot_open_falls_back_to_unary_calls():
    async def scenario():
        class Old(Scheduler):
            async def Session(self, request_iterator, context):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no sessions here")
                yield  # pragma: no cover

        impl = Old()
        async with _serving(impl) as session:
            got = await session.place(scheduler_pb2.PlaceRequest(request_id="a"), 5)
            assert got.prefill.worker_id == "w-a" and impl.unary == 1
            assert session.unsupported  # no stream tried again
            await session.place(scheduler_pb2.PlaceRequest(request_id="b"), 5)
            await session.release(scheduler_pb2.ReleaseRequest(request_id="b"))
            assert impl.unary == 3 and session.opened == 1

    asyncio.run(scenario())
