"""The worker service: one engine instance behind gRPC (Prefill, Decode, Abort, Stats).

It registers itself in Redis and heartbeats (``duopool.common.registry``), announces exported KV to the
kvtransfer broker after a prefill, and on decode asks the broker where the KV is, loads it through the
engine, and tells the broker when it is done so the segment is freed.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket
import time

import grpc

from duopool.common import registry
from duopool.common.config import WorkerConfig
from duopool.common.rpc import Channels, Server
from duopool.common.telemetry import init_telemetry
from duopool.kv.segment import segment_path, unlink_segment
from duopool.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.base import Engine, EngineError, EngineRequest, KvLoad, Sampling, create_engine

log = logging.getLogger("duopool.worker")

ROLE_TO_PB = {"prefill": common_pb2.PREFILL, "decode": common_pb2.DECODE, "mixed": common_pb2.MIXED}
POOL_TO_PB = {"strict": common_pb2.STRICT, "relaxed": common_pb2.RELAXED}


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p or 1.0,
                    seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop))


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, engine: Engine, address: str) -> None:
        self.config = config
        self.engine = engine
        self.address = address
        self.worker_id = config.id_or_default
        self.host = socket.gethostname()
        self.channels = Channels()
        self.tracer = init_telemetry("worker")
        self.served = 0
        self.tokens = 0

    @property
    def kv(self) -> kvtransfer_pb2_grpc.KvTransferStub:
        return kvtransfer_pb2_grpc.KvTransferStub(self.channels.get(self.config.kvtransfer))

    def record(self) -> registry.WorkerRecord:
        load = self.engine.load()
        return registry.WorkerRecord(
            worker_id=self.worker_id, address=self.address, role=self.config.role,
            pool=self.config.pool_or_default, engine=self.engine.name, model=self.engine.model_name,
            max_model_len=self.engine.max_model_len, block_size=self.engine.block_size, host=self.host,
            running=load.running, waiting=load.waiting, kv_usage=load.kv_usage, last_heartbeat=time.time(),
        )

    def info_pb(self) -> common_pb2.WorkerInfo:
        r = self.record()
        return common_pb2.WorkerInfo(
            worker_id=r.worker_id, address=r.address, role=ROLE_TO_PB[r.role], pool=POOL_TO_PB[r.pool],
            engine=r.engine, model=r.model, max_model_len=r.max_model_len, block_size=r.block_size, host=r.host,
            running=r.running, waiting=r.waiting, kv_usage=r.kv_usage, last_heartbeat=r.last_heartbeat,
        )

    # -- RPCs ---------------------------------------------------------------------------------------
    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        which = request.WhichOneof("prompt")
        if which == "text":
            ids = self.engine.tokenize(request.text, chat=request.chat)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            ids = []
        if not ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty after tokenization")
        transfer_id = f"{request.request_id}-{self.worker_id}" if request.export_kv else None
        ereq = EngineRequest(
            request_id=f"{request.request_id}:prefill", prompt_token_ids=tuple(ids), max_tokens=1,
            sampling=sampling_from_pb(request.sampling), kv_save=transfer_id,
            offline=request.request_class == common_pb2.OFFLINE,
        )
        if len(ids) + max(request.max_tokens, 1) > self.engine.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self.engine.max_model_len}",
            )
        t0 = time.perf_counter()
        out = None
        try:
            async for o in self.engine.generate(ereq):
                out = o
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if out is None or not out.token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "engine produced no token")
        engine_ms = (time.perf_counter() - t0) * 1e3
        self.served += 1
        self.tokens += 1
        finished = out.finish_reason == "stop" or request.max_tokens <= 1
        resp = worker_pb2.PrefillResponse(
            prompt_token_ids=ids, first_token_id=out.token_ids[0], first_token_text=out.text, finished=finished,
            finish_reason=out.finish_reason if finished else "", engine_ms=engine_ms,
        )
        if out.kv and out.kv.num_tokens > 0:
            handle = common_pb2.KvHandle(
                transfer_id=out.kv.transfer_id, num_tokens=out.kv.num_tokens, num_blocks=out.kv.num_blocks,
                num_bytes=out.kv.num_bytes, transport="shm", location=out.kv.path, source_worker=self.worker_id,
                source_host=self.host,
            )
            if finished:
                await self._release_transfer(handle.transfer_id)
            else:
                await self.kv.StartTransfer(kvtransfer_pb2.StartTransferRequest(
                    kv=handle, destination_worker=request.decode_worker, destination_host=request.decode_host,
                ), timeout=5)
                resp.kv.CopyFrom(handle)
        return resp

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        prompt = list(request.prompt_token_ids) + list(request.generated_token_ids)
        kv_load = None
        transfer_id = request.kv.transfer_id if request.HasField("kv") else ""
        if transfer_id:
            kv_load = await self._fetch_kv(request.kv, context)
        ereq = EngineRequest(
            request_id=f"{request.request_id}:decode", prompt_token_ids=tuple(prompt),
            max_tokens=request.max_tokens, sampling=sampling_from_pb(request.sampling), kv_load=kv_load,
            offline=request.request_class == common_pb2.OFFLINE,
        )
        completed = False
        try:
            async for o in self.engine.generate(ereq):
                if transfer_id and not completed:
                    # The engine has taken the KV (or recomputed): the source segment can go.
                    completed = True
                    await self._complete_transfer(transfer_id, ok=o.num_cached_tokens > 0)
                self.tokens += len(o.token_ids)
                yield worker_pb2.DecodeResponse(
                    text=o.text, token_ids=o.token_ids, finished=o.finished, finish_reason=o.finish_reason,
                    cached_tokens=o.num_cached_tokens,
                )
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            if transfer_id and not completed:
                await self._complete_transfer(transfer_id, ok=False, error="decode ended before loading")
            self.served += 1

    async def _fetch_kv(self, handle: common_pb2.KvHandle, context) -> KvLoad | None:
        try:
            st = await self.kv.PollTransfer(kvtransfer_pb2.PollTransferRequest(
                transfer_id=handle.transfer_id, wait_ms=2000, destination_host=self.host), timeout=5)
        except grpc.aio.AioRpcError as exc:
            st = None
            error = f"kvtransfer unreachable: {exc.code().name}"
        else:
            error = st.error or kvtransfer_pb2.TransferState.Name(st.state)
        if st is not None and st.state == kvtransfer_pb2.READY:
            return KvLoad(path=st.kv.location, num_tokens=st.kv.num_tokens)
        if self.config.kv_load_failure_policy == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"kv: transfer {handle.transfer_id} not loadable: {error}")
        log.warning("transfer %s not loadable (%s); recomputing the prompt", handle.transfer_id, error)
        return None

    async def _complete_transfer(self, transfer_id: str, ok: bool, error: str = "") -> None:
        try:
            await self.kv.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(
                transfer_id=transfer_id, ok=ok, error=error), timeout=5)
        except grpc.aio.AioRpcError as exc:  # the lease frees it anyway
            log.warning("CompleteTransfer %s failed: %s", transfer_id, exc.code().name)

    async def _release_transfer(self, transfer_id: str) -> None:
        """Frees KV nobody will load (the request ended at its first token)."""
        unlink_segment(segment_path(transfer_id, pathlib.Path(self.config.kv_dir)))

    async def Abort(self, request: worker_pb2.AbortRequest, context):
        found = False
        for suffix in (":prefill", ":decode"):
            found |= await self.engine.abort(request.request_id + suffix)
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        return worker_pb2.StatsResponse(info=self.info_pb(), requests_served=self.served,
                                        tokens_generated=self.tokens, simulated=self.engine.simulated)


async def _heartbeat_loop(service: WorkerService, stop: asyncio.Event) -> None:
    r = registry.connect(service.config.redis_url)
    ttl = max(3.0, 3 * service.config.heartbeat_s)
    try:
        while not stop.is_set():
            try:
                await registry.heartbeat(r, service.record(), ttl)
            except Exception as exc:  # noqa: BLE001 - Redis down: keep serving, keep trying
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), service.config.heartbeat_s)
            except TimeoutError:
                pass
        await registry.deregister(r, service.worker_id)
    finally:
        await r.aclose()


async def serve(config: WorkerConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    init_telemetry("worker")
    engine = create_engine(config)
    log.info("starting %s engine (model %s)%s", engine.name, config.model,
             " — SIMULATED" if engine.simulated else "")
    await engine.start()
    service = WorkerService(config, engine, "")
    server = Server(config.bind, [(worker_pb2_grpc.add_WorkerServicer_to_server, service, "duopool.v1.Worker")])
    service.address = config.advertise or f"{config.host}:{server.port}"
    if config.advertise == "" and config.host in ("0.0.0.0", "::"):
        service.address = f"{socket.gethostname()}:{server.port}"
    await server.start()
    try:
        await service.kv.RegisterEndpoint(kvtransfer_pb2.RegisterEndpointRequest(
            worker_id=service.worker_id, host=service.host, transports=["shm", "grpc"]), timeout=5)
    except grpc.aio.AioRpcError as exc:
        log.warning("kvtransfer at %s not reachable yet (%s); transfers will retry", config.kvtransfer,
                    exc.code().name)
    hb = asyncio.create_task(_heartbeat_loop(service, stop))
    log.info("worker %s (%s, %s pool) serving on %s", service.worker_id, config.role, config.pool_or_default,
             service.address)
    if ready is not None:
        ready.set()
    await stop.wait()
    await hb
    await server.stop()
    await engine.stop()
    await service.channels.close()
