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


def _rpc_error(code, details=""):
    import grpc

    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_park_kvtransfer_refuses_is_freed_and_counted_by_reason(tmp_path):
    """Parking fails → the segment is freed here and the reason goes back (the resume recomputes)."""
    import grpc

    from duopool.worker.engines.base import KvExport

    async def main():
        service = WorkerService(WorkerConfig(worker_id="w0", kv_dir=str(tmp_path)), RacingEngine("abort"),
                                "127.0.0.1:0")
        for code, details, want in ((grpc.StatusCode.RESOURCE_EXHAUSTED, "pool: cannot park", "pool full"),
                                    (grpc.StatusCode.UNAVAILABLE, "", "kvtransfer unreachable"),
                                    (grpc.StatusCode.FAILED_PRECONDITION, "pool: disabled (--kv-pool-gib 0)",
                                     "pool disabled")):
            seg = tmp_path / "r1-parked.kv"
            seg.write_bytes(b"x" * 64)

            async def refuse(method, request, extra_s=0.0, code=code, details=details):
                raise _rpc_error(code, details)

            service._kv_call = refuse
            got = await service._park("r1", KvExport("r1-parked", str(seg), 32, 2, 64))
            assert got == ("", 0, want)
            assert not seg.exists(), "a segment nobody will load was left behind"
        # the engine gave no KV (it cannot park): nothing to do, the reason says so
        assert (await service._park("r2", None))[2] in ("engine cannot park", "no full KV block")

    asyncio.run(main())


def test_a_resume_whose_parked_kv_is_gone_recomputes_with_the_reason(tmp_path):
    import grpc

    async def main():
        service = WorkerService(WorkerConfig(worker_id="w0", kv_dir=str(tmp_path)), RacingEngine("abort"),
                                "127.0.0.1:0")
        for code, details, want in ((grpc.StatusCode.NOT_FOUND, "key: 'k' is not in the pool (was evicted)",
                                     "parked KV evicted"),
                                    (grpc.StatusCode.NOT_FOUND, "never parked or already taken", "parked KV not found"),
                                    (grpc.StatusCode.UNAVAILABLE, "", "kvtransfer unreachable")):
            async def refuse(method, request, extra_s=0.0, code=code, details=details):
                raise _rpc_error(code, details)

            service._kv_call = refuse
            handle, why = await service._take_parked(worker_pb2.DecodeRequest(request_id="r", park_key="k"))
            assert handle is None and why == want

    asyncio.run(main())


def test_parked_segment_checksum_catches_changed_bytes(tmp_path):
    from duopool.kv.segment import HEADER_BYTES, KvSegment, SegmentMeta

    path = tmp_path / "p.kv"
    meta = SegmentMeta(transfer_id="p", num_layers=1, num_blocks=2, block_bytes=64, dtype="uint8",
                       block_shape=(64,), block_size=16, num_tokens=32, layer_names=("l",))
    with KvSegment.create(path, meta) as seg:
        seg.layer_view(0)[:] = bytes(range(128))
        seg.seal_with_checksum()
    assert WorkerService._intact(str(path))
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 5)
        f.write(b"\x00")
    assert not WorkerService._intact(str(path))
