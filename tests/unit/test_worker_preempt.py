"""Worker-side preemption against a fake engine (behind the Engine interface): a Preempt that races a
request's natural end must not turn a complete output into a "preempted" one (re-queued, it would resume for
tokens it does not need), while a request the abort really stopped ends "preempted"."""

from __future__ import annotations

import asyncio

from duopool.common.config import WorkerConfig
from duopool.v1 import common_pb2, worker_pb2
from duopool.worker.engines.base import Engine, EngineLoad, EngineOutput, EngineRequest
from services.worker.server import WorkerService


class RacingEngine(Engine):
    """Streams ``n`` tokens, the last one held until an abort arrives; the request then ends with
    ``end_reason`` (``"length"``: it reached max_tokens in the step the abort landed; ``"abort"``: it did
    not)."""

    name, simulated = "racing", True

    def __init__(self, end_reason: str, n: int = 3) -> None:
        self.end_reason, self.n = end_reason, n
        self.aborted = asyncio.Event()
        self.started = asyncio.Event()

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    model_name = "fake"
    max_model_len = 4096
    block_size = 16
    vocab_size = 0

    def tokenize(self, text, chat=False):
        return [1]

    def tokenize_chat(self, messages):
        return [1]

    def load(self):
        return EngineLoad(running=0, waiting=0, kv_usage=0.0)

    async def generate(self, request: EngineRequest):
        for i in range(self.n - 1):
            yield EngineOutput([10 + i], "x")
        self.started.set()
        await self.aborted.wait()
        last = [10 + self.n - 1] if self.end_reason == "length" else []
        yield EngineOutput(last, "x" if last else "", finished=True, finish_reason=self.end_reason)

    async def abort(self, request_id: str, park: bool = False) -> bool:
        self.aborted.set()
        return True


async def _race(end_reason: str) -> list[EngineOutput]:
    engine = RacingEngine(end_reason)
    service = WorkerService(WorkerConfig(worker_id="w0", kv_dir="/tmp/duopool-test-kv"), engine, "127.0.0.1:0")
    outs: list[EngineOutput] = []

    async def consume():
        req = EngineRequest(request_id="r1:decode", prompt_token_ids=(1, 2), max_tokens=engine.n, offline=True)
        async for o in service._run(req):
            outs.append(o)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(engine.started.wait(), 5)
    resp = await service.Preempt(worker_pb2.PreemptRequest(request_class=common_pb2.OFFLINE), None)
    await asyncio.wait_for(task, 5)
    assert list(resp.request_ids) == ["r1"]
    return outs


def test_a_request_that_ended_in_the_preempting_step_keeps_its_end():
    outs = asyncio.run(_race("length"))
    assert outs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outs) == 3


def test_a_request_the_abort_stopped_ends_preempted():
    outs = asyncio.run(_race("abort"))
    assert outs[-1].finish_reason == "preempted"
    assert sum(len(o.token_ids) for o in outs) == 2
