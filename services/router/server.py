"""The router: the only public service. Validates, places, drives prefill → KV handoff → decode, streams.

Per request: ``Scheduler.Place`` picks a prefill and a decode worker; ``Worker.Prefill`` on the first
returns the first token (streamed to the client at once: that is the TTFT) and a handle to the prompt's
KV, which the prefill worker has announced to kvtransfer; ``Worker.Decode`` on the second loads that KV
and streams the rest. A prefill worker that is unreachable is excluded and the request placed again
(``place_retries`` times); nothing has been streamed yet at that point, so the client sees one answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from duopool.common.config import RouterConfig
from duopool.common.rpc import Channels, Server
from duopool.common.telemetry import current_trace_id, init_telemetry
from duopool.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

log = logging.getLogger("duopool.router")

MAX_REQUEST_ID = 128
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def validate(req: router_pb2.GenerateRequest) -> str | None:
    """Returns ``"field: problem"`` for the first invalid field, or None."""
    which = req.WhichOneof("prompt")
    if which is None:
        return "prompt: required (text or token_ids)"
    if which == "text" and not req.text.strip():
        return "prompt.text: must not be empty"
    if which == "token_ids":
        if not req.token_ids.ids:
            return "prompt.token_ids: must not be empty"
        if min(req.token_ids.ids) < 0:
            return "prompt.token_ids: must be >= 0"
    if req.max_tokens <= 0:
        return f"max_tokens: must be > 0 (got {req.max_tokens})"
    if req.request_class not in (common_pb2.ONLINE, common_pb2.OFFLINE):
        return f"request_class: must be ONLINE or OFFLINE (got {req.request_class})"
    if req.slo.ttft_ms < 0:
        return "slo.ttft_ms: must be >= 0"
    if req.slo.tpot_ms < 0:
        return "slo.tpot_ms: must be >= 0"
    s = req.sampling
    if s.temperature < 0:
        return "sampling.temperature: must be >= 0"
    if not 0 <= s.top_p <= 1:
        return "sampling.top_p: must be in [0, 1]"
    if len(req.request_id) > MAX_REQUEST_ID:
        return f"request_id: at most {MAX_REQUEST_ID} characters"
    return None


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.channels = Channels()
        self.tracer = init_telemetry("router")

    @property
    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channels.get(self.config.scheduler))

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.channels.get(address))

    async def ListWorkers(self, request, context):
        try:
            return await self.scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"scheduler: {exc.details()}")

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        problem = validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        rid = request.request_id or uuid.uuid4().hex
        try:
            async for msg in self._generate(rid, request, arrived, context):
                yield msg
        finally:
            try:
                await self.scheduler.Release(scheduler_pb2.ReleaseRequest(request_id=rid), timeout=2)
            except grpc.aio.AioRpcError:
                pass

    async def _place(self, rid, request, exclude: list[str], context) -> scheduler_pb2.Placement:
        prompt_tokens = len(request.token_ids.ids) if request.WhichOneof("prompt") == "token_ids" else 0
        try:
            return await self.scheduler.Place(scheduler_pb2.PlaceRequest(
                request_id=rid, request_class=request.request_class, prompt_tokens=prompt_tokens,
                max_tokens=request.max_tokens, slo=request.slo, exclude_workers=exclude), timeout=5)
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT) \
                else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"placement: {exc.details()}")

    async def _generate(self, rid, request, arrived, context):
        exclude: list[str] = []
        for attempt in range(self.config.place_retries + 1):
            placement = await self._place(rid, request, exclude, context)
            limit = placement.prefill.max_model_len
            if limit and request.max_tokens >= limit:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"max_tokens: {request.max_tokens} exceeds the model's context of {limit}")
            preq = worker_pb2.PrefillRequest(
                request_id=rid, max_tokens=request.max_tokens, sampling=request.sampling,
                request_class=request.request_class, export_kv=request.max_tokens > 1,
                decode_worker=placement.decode.worker_id, decode_host=placement.decode.host, chat=request.chat,
            )
            if request.WhichOneof("prompt") == "text":
                preq.text = request.text
            else:
                preq.token_ids.CopyFrom(request.token_ids)
            try:
                pre = await self.worker(placement.prefill.address).Prefill(preq)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE and attempt < self.config.place_retries:
                    log.warning("request %s: prefill worker %s failed (%s); placing again", rid,
                                placement.prefill.worker_id, exc.code().name)
                    exclude.append(placement.prefill.worker_id)
                    await self.channels.drop(placement.prefill.address)
                    continue
                await context.abort(exc.code(), exc.details() or exc.code().name)
        first_at = time.perf_counter()
        token_times = [(first_at - arrived) * 1e3]
        yield router_pb2.GenerateResponse(chunk=router_pb2.TokenChunk(text=pre.first_token_text,
                                                                      token_ids=[pre.first_token_id]))
        output_tokens = 1
        finish_reason = pre.finish_reason
        cached = 0
        decode_worker = ""
        if not pre.finished:
            decode_worker = placement.decode.worker_id
            dreq = worker_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=pre.prompt_token_ids, generated_token_ids=[pre.first_token_id],
                max_tokens=request.max_tokens - 1, sampling=request.sampling, request_class=request.request_class,
            )
            if pre.HasField("kv"):
                dreq.kv.CopyFrom(pre.kv)
            try:
                async for d in self.worker(placement.decode.address).Decode(dreq):
                    if d.cached_tokens:
                        cached = d.cached_tokens
                    if d.token_ids:
                        now = (time.perf_counter() - arrived) * 1e3
                        token_times.extend([now] * len(d.token_ids))
                        output_tokens += len(d.token_ids)
                        yield router_pb2.GenerateResponse(chunk=router_pb2.TokenChunk(text=d.text,
                                                                                      token_ids=d.token_ids))
                    if d.finished:
                        finish_reason = d.finish_reason
            except grpc.aio.AioRpcError as exc:
                code = exc.code() if exc.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"decode worker {decode_worker}: {exc.details()}")
        yield router_pb2.GenerateResponse(summary=router_pb2.GenerateSummary(
            request_id=rid, prompt_tokens=len(pre.prompt_token_ids), output_tokens=output_tokens,
            ttft_ms=token_times[0], token_times_ms=token_times, prefill_worker=placement.prefill.worker_id,
            decode_worker=decode_worker, finish_reason=finish_reason or "length", engine=placement.prefill.engine,
            kv_transferred_tokens=pre.kv.num_tokens if pre.HasField("kv") else 0, decode_cached_tokens=cached,
            kv_bytes=pre.kv.num_bytes if pre.HasField("kv") else 0, trace_id=current_trace_id(),
        ))


async def serve(config: RouterConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("router")
    service = RouterService(config)
    server = Server(config.bind, [(router_pb2_grpc.add_RouterServicer_to_server, service, "duopool.v1.Router")])
    await server.start()
    log.info("router serving on %s:%d (scheduler %s)", config.host, server.port, config.scheduler)
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop()
    await service.channels.close()
