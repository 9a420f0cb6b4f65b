"""The worker service: one engine instance behind gRPC (Prefill, Decode, Abort, Stats).

It registers itself in Redis and heartbeats (``duopool.common.registry``), announces exported KV to the
kvtransfer broker after a prefill, and on decode asks the broker where the KV is, loads it through the
engine, and tells the broker when it is done so the segment is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import socket
import time

import grpc
from opentelemetry import trace

from duopool.common import metrics, registry
from duopool.common.clusterauth import aio_channel
from duopool.common.config import WorkerConfig, available_cpus, format_cpus, resolve_cpus
from duopool.common.ids import check_id, safe_key
from duopool.common.metrics import start_metrics_server
from duopool.common.rpc import CHANNEL_OPTIONS, Channels, Server
from duopool.common.tasks import TaskSet
from duopool.common.telemetry import init_telemetry
from duopool.common.wire import PB_POOL, PB_ROLE, worker_info_pb
from duopool.kv.segment import KvSegment, SegmentError, segment_path, unlink_segment
from duopool.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from duopool.worker.engines.base import Engine, EngineError, EngineRequest, KvLoad, Sampling, create_engine

log = logging.getLogger("duopool.worker")

KV_MAX_RECONNECT_MS = 1000
OFFLINE_FLUSH_S = 0.5  # offline decode tokens are sent in batches at most this often (and at the end)
KV_RECONNECT_WAIT_S = 1.5  # an UNAVAILABLE call is retried once, waiting this long for the connection
KV_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 100),
                      ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", KV_MAX_RECONNECT_MS)]


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p or 1.0,
                    seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
                    ignore_eos=s.ignore_eos)


NATURAL_ENDS = ("stop", "length")  # finish reasons of a request that ended by itself, not by an abort


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, engine: Engine, address: str) -> None:
        self.config = config
        self.engine = engine
        self.address = address
        self.worker_id = config.id_or_default
        self.host = config.host_id or socket.gethostname()  # where this worker's KV lives (DUOPOOL_HOST_ID)
        self.pull_dir = pathlib.Path(config.kv_dir) / f"pull-{self.worker_id}"  # KV pulled from other hosts
        self._pulled: dict[str, pathlib.Path] = {}  # transfer id -> local copy, unlinked once loaded
        self._kv_channel: grpc.aio.Channel | None = None
        self._kv_down = False  # a call's reconnect wait failed; cleared by the next call that gets through
        self._background = TaskSet()  # broker bookkeeping sent off the token path
        self._kv_dir = str(pathlib.Path(config.kv_dir))  # the directory part of this host's segment paths
        self._kv_stub: kvtransfer_pb2_grpc.KvTransferStub | None = None
        self.channels = Channels()
        self.tracer = init_telemetry("worker")
        self.served = 0
        self.tokens = 0
        self.role = config.role  # observed role and pool; the scheduler changes them with SetRole
        self.pool = config.pool_or_default
        self.offline_only = False  # the scheduler's layout: this worker is the policy's isolated offline share
        self.active: dict[str, tuple[bool, asyncio.Event]] = {}  # engine request id -> (offline, ended)
        self.preempted: set[str] = set()
        self.server: Server | None = None  # set by serve(): health turns NOT_SERVING when the engine breaks
        engine.park_evicted = self.parking  # its step plans' evictions keep their KV too

    @property
    def kv(self) -> kvtransfer_pb2_grpc.KvTransferStub:
        """kvtransfer, on a channel of its own that retries the connection quickly (at most every
        ``KV_MAX_RECONNECT_MS``), so a restarted kvtransfer is found again within seconds; until then calls
        fail fast with UNAVAILABLE and the decode recomputes."""
        if self._kv_stub is None:
            self._kv_channel = aio_channel(self.config.kvtransfer, options=KV_CHANNEL_OPTIONS)
            self._kv_stub = kvtransfer_pb2_grpc.KvTransferStub(self._kv_channel)
        return self._kv_stub

    def record(self) -> registry.WorkerRecord:
        load = self.engine.load()
        offline = sum(1 for off, _ in self.active.values() if off)
        metrics.WORKER_RUNNING.labels(self.worker_id, "online").set(len(self.active) - offline)
        metrics.WORKER_RUNNING.labels(self.worker_id, "offline").set(offline)
        metrics.WORKER_WAITING.labels(self.worker_id).set(load.waiting)
        metrics.WORKER_KV_USAGE.labels(self.worker_id).set(load.kv_usage)
        return registry.WorkerRecord(
            worker_id=self.worker_id, address=self.address, role=self.role,
            pool=self.pool, engine=self.engine.name, model=self.engine.model_name,
            max_model_len=self.engine.max_model_len, block_size=self.engine.block_size, host=self.host,
            running=load.running, waiting=load.waiting, kv_usage=load.kv_usage, last_heartbeat=time.time(),
            steps=load.steps, step_ms=load.step_ms, kv_capacity=load.kv_capacity,
            step_plans=self.engine.step_plans,
            preempted=getattr(self.engine, "preempted_in_engine", 0), offline_only=self.offline_only,
        )

    async def not_serving(self) -> None:
        if self.server is not None:
            await self.server.not_serving()

    def info_pb(self) -> common_pb2.WorkerInfo:
        return worker_info_pb(self.record())

    # -- RPCs ---------------------------------------------------------------------------------------
    def _engine_failure(self, exc: Exception) -> tuple[grpc.StatusCode, str]:
        if self.engine.broken:
            return grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: engine failed ({self.engine.broken})"
        log.warning("engine failed a request: %r", exc)
        return grpc.StatusCode.INTERNAL, f"engine: the request failed on worker {self.worker_id} ({exc})"

    async def _check_request(self, request_id: str, context) -> None:
        problem = check_id("request_id", request_id) if request_id else "request_id: required"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.engine.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: engine failed "
                                                             f"({self.engine.broken})")

    async def _prompt(self, request: worker_pb2.PrefillRequest, context) -> list[int]:
        """The prompt's token ids (tokenized / chat-rendered here), checked against the vocabulary and the
        context; ``fit_max_tokens`` lowers ``request.max_tokens`` to what the context leaves."""
        await self._check_request(request.request_id, context)
        which = request.WhichOneof("prompt")
        if which == "text":
            ids = self.engine.tokenize(request.text, chat=request.chat)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        elif which == "messages":
            ids = self.engine.tokenize_chat([{"role": m.role, "content": m.content}
                                             for m in request.messages.messages])
        else:
            ids = []
        if not ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty after tokenization")
        vocab = self.engine.vocab_size
        if vocab and (max(ids) >= vocab or min(ids) < 0):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt.token_ids: must be in [0, {vocab}) (the model's vocabulary)")
        if request.fit_max_tokens:  # an upper bound: what the context leaves after the prompt
            room = self.engine.max_model_len - len(ids)
            if room < 1:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"prompt: {len(ids)} tokens leave no room in the model's context of "
                                    f"{self.engine.max_model_len}")
            request.max_tokens = min(request.max_tokens, room) if request.max_tokens > 0 else room
        if len(ids) + max(request.max_tokens, 1) > self.engine.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self.engine.max_model_len}",
            )
        return ids

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        ids = await self._prompt(request, context)
        transfer_id = safe_key(f"{request.request_id}-{self.worker_id}") if request.export_kv else None
        ereq = EngineRequest(
            request_id=f"{request.request_id}:prefill", prompt_token_ids=tuple(ids), max_tokens=1,
            sampling=sampling_from_pb(request.sampling), kv_save=transfer_id,
            offline=request.request_class == common_pb2.OFFLINE,
        )
        t0 = time.perf_counter()
        out = None
        span = self.tracer.start_span("duopool.engine.prefill", attributes={
            "duopool.worker": self.worker_id, "duopool.class": "offline" if ereq.offline else "online",
            "duopool.prompt_tokens": len(ids), "duopool.export_kv": bool(transfer_id)})
        try:
            with trace.use_span(span, end_on_exit=True):
                async with contextlib.aclosing(self._run(ereq)) as outputs:
                    async for o in outputs:
                        if out is None:
                            span.add_event("duopool.first_token")
                        out = o
                if out is not None:
                    span.set_attributes({"duopool.output_tokens": len(out.token_ids),
                                         "duopool.finish_reason": out.finish_reason or ""})
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - the engine failed this request: it fails alone, clearly
            await context.abort(*self._engine_failure(exc))
        if out is not None and out.finish_reason == "preempted":
            if out.kv:
                await self._release_transfer(out.kv.transfer_id)
            await context.abort(grpc.StatusCode.ABORTED, "preempted: offline prefill stopped for online work")
        if out is None or not out.token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "engine produced no token")
        engine_ms = (time.perf_counter() - t0) * 1e3
        self.served += 1
        self.tokens += 1
        klass = "offline" if ereq.offline else "online"
        metrics.WORKER_TOKENS.labels(self.worker_id, klass).inc()
        metrics.WORKER_PHASE.labels(self.worker_id, "prefill").observe(engine_ms / 1e3)
        finished = out.finish_reason == "stop" or request.max_tokens <= 1
        resp = worker_pb2.PrefillResponse(
            prompt_token_ids=ids, first_token_id=out.token_ids[0], first_token_text=out.text, finished=finished,
            finish_reason=out.finish_reason if finished else "", engine_ms=engine_ms, max_tokens=request.max_tokens,
        )
        if out.kv and out.kv.num_tokens > 0:
            handle = common_pb2.KvHandle(
                transfer_id=out.kv.transfer_id, num_tokens=out.kv.num_tokens, num_blocks=out.kv.num_blocks,
                num_bytes=out.kv.num_bytes, transport="shm", location=out.kv.path, source_worker=self.worker_id,
                source_host=self.host,
            )
            if finished:
                await self._release_transfer(handle.transfer_id)
            elif self.config.kv_load_failure_policy == "fail" or self._kv_down:
                # fail: the prefill fails if its KV cannot be announced; kvtransfer known down: the segment is
                # freed at once (fail fast) and the decode recomputes
                if await self._traced_start(handle, request, context):
                    self._exported(resp, handle)
            else:
                # The first token does not wait for the broker: the KV is written and sealed, the decode on
                # this host loads it straight from shared memory, and the announcement goes in the background
                # (if it fails the segment is freed and the decode recomputes).
                self._exported(resp, handle)
                self._spawn(self._traced_start(handle, request, None))
        return resp

    def _exported(self, resp: worker_pb2.PrefillResponse, handle: common_pb2.KvHandle) -> None:
        resp.kv.CopyFrom(handle)
        metrics.KV_EXPORTS.labels(self.worker_id).inc()
        metrics.KV_EXPORT_BYTES.labels(self.worker_id).inc(handle.num_bytes)

    def _spawn(self, coro) -> asyncio.Task:
        """A broker call the request does not wait for (its failures are handled inside)."""
        return self._background.spawn(coro)

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        await self._check_request(request.request_id, context)
        prompt = list(request.prompt_token_ids) + list(request.generated_token_ids)
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        vocab = self.engine.vocab_size
        if vocab and (max(prompt) >= vocab or min(prompt) < 0):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt_token_ids: must be in [0, {vocab})")
        if request.max_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be > 0")
        kv_load = None
        transfer_id = request.kv.transfer_id if request.HasField("kv") else ""
        if check_id("kv.transfer_id", transfer_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, check_id("kv.transfer_id", transfer_id))
        take_failure = ""
        if request.park_key:
            if check_id("park_key", request.park_key):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, check_id("park_key", request.park_key))
            if transfer_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "park_key: give either park_key or kv")
            handle, take_failure = await self._take_parked(request)
            if handle is not None:
                request.kv.CopyFrom(handle)
                transfer_id = handle.transfer_id
        if transfer_id:
            with self.tracer.start_as_current_span("duopool.kv.load", attributes={
                    "duopool.worker": self.worker_id, "duopool.kv.transfer_id": transfer_id,
                    "duopool.kv.bytes": request.kv.num_bytes, "duopool.kv.tokens": request.kv.num_tokens,
                    "duopool.kv.source_worker": request.kv.source_worker}) as span:
                kv_load = await self._fetch_kv(request.kv, context)
                if kv_load is not None and request.park_key and not self._intact(kv_load.path):
                    log.warning("parked KV %s fails its checksum: recomputing", request.park_key)
                    kv_load, take_failure = None, "checksum mismatch"
                span.set_attributes({"duopool.kv.transport": ("grpc" if self._is_remote(request.kv) else "shm")
                                     if kv_load else "none", "duopool.kv.loadable": kv_load is not None})
        ereq = EngineRequest(
            request_id=f"{request.request_id}:decode", prompt_token_ids=tuple(prompt),
            max_tokens=request.max_tokens, sampling=sampling_from_pb(request.sampling), kv_load=kv_load,
            offline=request.request_class == common_pb2.OFFLINE,
        )
        completed = False
        tokens = metrics.WORKER_TOKENS.labels(self.worker_id, "offline" if ereq.offline else "online")
        t0 = time.perf_counter()
        span = self.tracer.start_span("duopool.engine.decode", attributes={
            "duopool.worker": self.worker_id, "duopool.class": "offline" if ereq.offline else "online",
            "duopool.context_tokens": len(prompt), "duopool.max_tokens": request.max_tokens,
            "duopool.kv.offered": bool(transfer_id)})
        produced, cached, reason, first = 0, 0, "", True
        completing: asyncio.Task | None = None
        outputs = self._run(ereq)
        try:
            async for o in self._batched(outputs, ereq.offline, tokens):
                produced += len(o.token_ids)
                cached = cached or o.num_cached_tokens
                reason = o.finish_reason or reason
                resp = worker_pb2.DecodeResponse(
                    text=o.text, token_ids=o.token_ids, finished=o.finished, finish_reason=o.finish_reason,
                    cached_tokens=o.num_cached_tokens,
                )
                if transfer_id and not completed:
                    # The engine has taken the KV (or recomputed): the source segment can go. The broker
                    # learns of it in the background (the token goes out first); the stream's end waits for it.
                    completed = True
                    completing = self._spawn(self._complete_transfer(transfer_id, ok=o.num_cached_tokens > 0,
                                                                     local=kv_load.path if kv_load else ""))
                    metrics.KV_LOADS.labels(self.worker_id, "loaded" if o.num_cached_tokens > 0 else "recomputed").inc()
                if request.park_key and first:  # the resume's first message
                    take_failure = take_failure or ("" if o.num_cached_tokens > 0 else "parked KV not loadable")
                    resp.park_failure = take_failure
                    metrics.KV_RESUMES.labels(self.worker_id, take_failure or "loaded").inc()
                first = False
                if o.finish_reason == "preempted":
                    resp.parked_key, resp.parked_tokens, resp.park_failure = await self._park(request.request_id, o.kv)
                yield resp
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001
            await context.abort(*self._engine_failure(exc))
        finally:
            await outputs.aclose()  # a cancelled stream stops its engine request now
            span.set_attributes({"duopool.output_tokens": produced, "duopool.cached_tokens": cached,
                                 "duopool.finish_reason": reason})
            span.end()
            if transfer_id and not completed:
                await self._complete_transfer(transfer_id, ok=False, error="decode ended before loading",
                                              local=kv_load.path if kv_load else "")
            self.served += 1
            metrics.WORKER_PHASE.labels(self.worker_id, "decode").observe(time.perf_counter() - t0)
            if completing is not None:  # bounded by kv_rpc_timeout_s: the stream ends with its transfer ended
                await asyncio.shield(completing)

    async def _batched(self, outputs, offline: bool, counter, first_now: bool = False):
        """The engine's outputs, counted; offline tokens go out in batches (at most every OFFLINE_FLUSH_S, and
        at the end): a backlog of offline decodes would otherwise cost one message per token across the
        cluster's shared cores. An output reporting cached tokens goes at once, and so does the first one
        when ``first_now``."""
        held_ids: list[int] = []
        held_text: list[str] = []
        flushed = time.perf_counter()
        first = first_now
        async for o in outputs:
            n = len(o.token_ids)
            self.tokens += n
            counter.inc(n)
            if offline and not first and not o.finished and not o.num_cached_tokens \
                    and time.perf_counter() - flushed < OFFLINE_FLUSH_S:
                held_ids.extend(o.token_ids)
                held_text.append(o.text)
                continue
            first = False
            if held_ids:
                o = dataclasses.replace(o, token_ids=held_ids + list(o.token_ids),
                                        text="".join(held_text) + o.text)
                held_ids, held_text = [], []
            flushed = time.perf_counter()
            yield o

    async def PrefillDecode(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        """Prefill and decode on this worker in one engine request: no KV is exported or moved (the request
        decodes where its KV already is)."""
        ids = await self._prompt(request, context)
        ereq = EngineRequest(
            request_id=f"{request.request_id}:local", prompt_token_ids=tuple(ids),
            max_tokens=max(1, request.max_tokens), sampling=sampling_from_pb(request.sampling),
            offline=request.request_class == common_pb2.OFFLINE,
        )
        klass = "offline" if ereq.offline else "online"
        t0 = time.perf_counter()
        span = self.tracer.start_span("duopool.engine.prefill_decode", attributes={
            "duopool.worker": self.worker_id, "duopool.class": klass, "duopool.prompt_tokens": len(ids),
            "duopool.max_tokens": ereq.max_tokens})
        produced, reason = 0, ""
        outputs = self._run(ereq)
        try:
            async for o in self._batched(outputs, ereq.offline, metrics.WORKER_TOKENS.labels(self.worker_id, klass),
                                         first_now=True):
                reason = o.finish_reason or reason
                if not produced:
                    if o.finish_reason == "preempted" or not o.token_ids:
                        if o.kv is not None:  # stopped in its prefill: the resume prefills again
                            unlink_segment(pathlib.Path(o.kv.path), recycle_file=True)
                        if o.finish_reason == "preempted":
                            await context.abort(grpc.StatusCode.ABORTED,
                                                "preempted: offline prefill stopped for online work")
                        await context.abort(grpc.StatusCode.INTERNAL, "engine produced no token")
                    engine_ms = (time.perf_counter() - t0) * 1e3
                    span.add_event("duopool.first_token")
                    metrics.WORKER_PHASE.labels(self.worker_id, "prefill").observe(engine_ms / 1e3)
                    produced += len(o.token_ids)
                    yield worker_pb2.LocalResponse(
                        prompt_token_ids=ids, text=o.text, token_ids=o.token_ids, finished=o.finished,
                        finish_reason=o.finish_reason, max_tokens=ereq.max_tokens, engine_ms=engine_ms)
                    continue
                produced += len(o.token_ids)
                resp = worker_pb2.LocalResponse(text=o.text, token_ids=o.token_ids, finished=o.finished,
                                                finish_reason=o.finish_reason)
                if o.finish_reason == "preempted":
                    resp.parked_key, resp.parked_tokens, resp.park_failure = await self._park(request.request_id, o.kv)
                yield resp
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort(*self._engine_failure(exc))
        finally:
            await outputs.aclose()  # a cancelled stream stops its engine request now
            span.set_attributes({"duopool.output_tokens": produced, "duopool.finish_reason": reason})
            span.end()
            self.served += 1
            metrics.WORKER_PHASE.labels(self.worker_id, "decode").observe(time.perf_counter() - t0)

    # -- parked KV (kvtransfer's pool) ---------------------------------------------------------------
    @property
    def parking(self) -> bool:
        """Preempted offline decodes keep their KV (``park_kv`` on and an engine that can save it)."""
        return self.config.park_kv == "on" and self.engine.parks

    async def _park(self, request_id: str, kv) -> tuple[str, int, str]:
        """Moves the KV the engine saved for a preempted request into kvtransfer's pool under the request id:
        (key, tokens, "") or ("", 0, why not) — the resume then recomputes. Counted by outcome."""
        t0 = time.perf_counter()
        why = ""
        if kv is None or kv.num_tokens <= 0:
            why = ("parking off" if self.config.park_kv != "on" else "engine cannot park" if not self.engine.parks
                   else "no full KV block")
        else:
            try:
                await self._kv_call("Park", kvtransfer_pb2.ParkRequest(key=request_id, location=kv.path))
            except grpc.aio.AioRpcError as exc:
                unlink_segment(pathlib.Path(kv.path), recycle_file=True)
                why = {grpc.StatusCode.RESOURCE_EXHAUSTED: "pool full",
                       grpc.StatusCode.UNAVAILABLE: "kvtransfer unreachable",
                       grpc.StatusCode.DEADLINE_EXCEEDED: "kvtransfer unreachable"}.get(exc.code(), "")
                if not why:
                    why = "pool disabled" if "disabled" in (exc.details() or "") else f"not parked: {exc.code().name}"
                log.info("KV of preempted %s not parked (%s): its resume recomputes", request_id, why)
        metrics.KV_PARKS.labels(self.worker_id, why or "parked").inc()
        if why:
            return "", 0, why
        metrics.KV_PARK_SECONDS.labels(self.worker_id, "park").observe(time.perf_counter() - t0)
        return request_id, kv.num_tokens, ""

    @staticmethod
    def _intact(path: str) -> bool:
        """Whether a segment's data matches the checksum it was sealed with (parked KV)."""
        try:
            with KvSegment.open(pathlib.Path(path)) as seg:
                return seg.verify()
        except (SegmentError, OSError):
            return False

    async def _take_parked(self, request: worker_pb2.DecodeRequest) -> tuple[common_pb2.KvHandle | None, str]:
        """Checks a parked request's KV out of the pool as a transfer to this worker: (handle, "") or
        (None, why) — then the decode recomputes the context."""
        t0 = time.perf_counter()
        try:
            st = await self._kv_call("Take", kvtransfer_pb2.TakeRequest(
                key=request.park_key, new_transfer_id=safe_key(f"{request.request_id}-resume"),
                destination_worker=self.worker_id, destination_host=self.host))
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            why = {grpc.StatusCode.NOT_FOUND: "parked KV evicted" if "evicted" in details else "parked KV not found",
                   grpc.StatusCode.UNAVAILABLE: "kvtransfer unreachable",
                   grpc.StatusCode.DEADLINE_EXCEEDED: "kvtransfer unreachable",
                   grpc.StatusCode.DATA_LOSS: "parked KV unusable"}.get(exc.code(), f"take failed: {exc.code().name}")
            log.info("parked KV %s not taken (%s): recomputing", request.park_key, why)
            return None, why
        metrics.KV_PARK_SECONDS.labels(self.worker_id, "take").observe(time.perf_counter() - t0)
        return st.kv, ""

    # -- KV transfer (kvtransfer service) ---------------------------------------------------------------
    async def _kv_failed(self, context, transfer_id: str, error: str) -> None:
        """A transfer this decode cannot load: ``fail`` aborts with UNAVAILABLE naming kv (after telling the
        broker, so the segment goes now rather than at lease expiry); ``recompute`` logs and goes on."""
        if self.config.kv_load_failure_policy == "fail":
            await self._complete_transfer(transfer_id, ok=False, error=error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"kv: transfer {transfer_id} not loadable: {error}")
        log.warning("transfer %s not loadable (%s); recomputing the prompt", transfer_id, error)

    async def _traced_start(self, handle: common_pb2.KvHandle, request: worker_pb2.PrefillRequest,
                            context) -> bool:
        with self.tracer.start_as_current_span("duopool.kv.export", attributes={
                "duopool.worker": self.worker_id, "duopool.kv.transfer_id": handle.transfer_id,
                "duopool.kv.bytes": handle.num_bytes, "duopool.kv.tokens": handle.num_tokens,
                "duopool.kv.blocks": handle.num_blocks, "duopool.kv.transport": handle.transport,
                "duopool.decode_worker": request.decode_worker}) as span:
            ok = await self._start_transfer(handle, request, context)
            span.set_attribute("duopool.kv.announced", ok)
            return ok

    async def _start_transfer(self, handle: common_pb2.KvHandle, request: worker_pb2.PrefillRequest,
                              context) -> bool:
        """Announces exported KV to the broker. If the broker is unreachable the segment is freed at once
        (nobody could find it) and the decode recomputes — or, under ``fail``, the prefill fails."""
        try:
            await self._kv_call("StartTransfer", kvtransfer_pb2.StartTransferRequest(
                kv=handle, destination_worker=request.decode_worker, destination_host=request.decode_host,
            ))
            return True
        except grpc.aio.AioRpcError as exc:
            unlink_segment(pathlib.Path(handle.location), recycle_file=True)
            error = f"kvtransfer unreachable: {exc.code().name}"
            if self.config.kv_load_failure_policy == "fail":
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"kv: transfer {handle.transfer_id} not started: {error}")
            log.warning("transfer %s not started (%s); the decode will recompute", handle.transfer_id, error)
            return False

    async def _kv_call(self, method: str, request, extra_s: float = 0.0):
        """One kvtransfer call, bounded by ``kv_rpc_timeout_s``. Fails fast when kvtransfer is down, but an
        UNAVAILABLE is retried once waiting up to ``KV_RECONNECT_WAIT_S`` for the connection: just after a
        kvtransfer restart this channel may still be in its reconnect backoff. Once that wait has failed,
        kvtransfer counts as down and later calls skip it (fail at once: prefills free their KV, decodes
        recompute) until the channel is connected again — one request pays the wait, not every request."""
        call = getattr(self.kv, method)
        timeout = self.config.kv_rpc_timeout_s
        try:
            out = await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                if self._kv_down and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # it answered: reachable
                    log.info("kvtransfer at %s is reachable again", self.config.kvtransfer)
                    self._kv_down = False
                raise
            if self._kv_down and self._kv_channel is not None and \
                    self._kv_channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
                raise
            try:
                out = await call(request, timeout=min(timeout, KV_RECONNECT_WAIT_S + extra_s), wait_for_ready=True)
            except grpc.aio.AioRpcError as again:
                if again.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    if not self._kv_down:
                        log.warning("kvtransfer at %s is down (%s): KV calls fail fast until it is back",
                                    self.config.kvtransfer, again.code().name)
                    self._kv_down = True
                raise
        if self._kv_down:
            log.info("kvtransfer at %s is reachable again", self.config.kvtransfer)
            self._kv_down = False
        return out

    def _is_remote(self, kv: common_pb2.KvHandle) -> bool:
        return bool(kv.source_host and kv.source_host != self.host) or not os.path.exists(kv.location)

    def _is_local_segment(self, location: str) -> bool:
        """A segment directly in this host's KV directory, spelled as the prefills on this host spell theirs
        (``segment_path``; a path spelled otherwise goes through the broker; no resolve() per request)."""
        return os.path.dirname(location) == self._kv_dir

    async def _fetch_kv(self, handle: common_pb2.KvHandle, context) -> KvLoad | None:
        """Where the engine loads the KV from. A segment on this host, still there, loads straight from
        shared memory: no broker round trip on the first decode token's path (the segment is sealed before
        its prefill returns; one the broker expired or freed is gone, and then the broker says why). Else
        the broker is asked (PollTransfer) and a segment on another host is pulled."""
        if handle.transport in ("", "shm") and self._is_local_segment(handle.location) and not self._is_remote(handle):
            return KvLoad(path=handle.location, num_tokens=handle.num_tokens)
        try:
            st = await self._kv_call("PollTransfer", kvtransfer_pb2.PollTransferRequest(
                transfer_id=handle.transfer_id, wait_ms=2000, destination_host=self.host), extra_s=2.0)
        except grpc.aio.AioRpcError as exc:
            await self._kv_failed(context, handle.transfer_id,
                                  f"kvtransfer: {exc.code().name} {exc.details() or ''}".strip())
            return None
        if st.state != kvtransfer_pb2.READY:
            await self._kv_failed(context, handle.transfer_id,
                                  f"{kvtransfer_pb2.TransferState.Name(st.state)} {st.error}".strip())
            return None
        if not self._is_remote(st.kv):
            return KvLoad(path=st.kv.location, num_tokens=st.kv.num_tokens)
        path, error = await self._pull_kv(st.kv)
        if path is None:
            await self._kv_failed(context, handle.transfer_id, error)
            return None
        return KvLoad(path=str(path), num_tokens=st.kv.num_tokens)

    async def _pull_kv(self, kv: common_pb2.KvHandle) -> tuple[pathlib.Path | None, str]:
        """Cross-host fallback: pulls the segment through kvtransfer's ``Read`` stream into this worker's pull
        directory (bounded by ``kv_pull_timeout_s``). Returns (local path, "") or (None, error); a partial
        copy is removed, never loaded (it is unsealed anyway)."""
        from duopool.kv.transport import TransferError
        from duopool.kv.transport.grpc_stream import GrpcStreamTransport

        self.pull_dir.mkdir(parents=True, exist_ok=True)
        local = segment_path(kv.transfer_id, self.pull_dir)
        self._pulled[kv.transfer_id] = local
        t0 = time.perf_counter()

        def pull():
            with GrpcStreamTransport(self.config.kvtransfer, self.pull_dir) as transport:
                return transport.receive(kv.transfer_id, timeout_s=self.config.kv_pull_timeout_s)

        try:
            result = await asyncio.to_thread(pull)
        except (TransferError, SegmentError, OSError) as exc:
            self._drop_pulled(kv.transfer_id)
            return None, f"pull from {kv.source_host} failed: {exc}"
        log.info("pulled KV %s from %s: %d bytes in %.1f ms", kv.transfer_id, kv.source_host, result.bytes_moved,
                 (time.perf_counter() - t0) * 1e3)
        return local, ""

    def _drop_pulled(self, transfer_id: str) -> None:
        path = self._pulled.pop(transfer_id, None)
        if path is not None:
            unlink_segment(path, recycle_file=True)

    async def _complete_transfer(self, transfer_id: str, ok: bool, error: str = "", local: str = "") -> None:
        """The engine has taken (or given up on) the KV: its local copy goes now (a pulled copy, or the
        source segment itself when it was loaded straight from this host's shared memory: whoever loads it
        frees it, so nothing lingers when the broker is unreachable), then the broker ends the transfer."""
        self._drop_pulled(transfer_id)
        if local and self._is_local_segment(local):
            unlink_segment(pathlib.Path(local), recycle_file=True)
        try:
            await self.kv.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(
                transfer_id=transfer_id, ok=ok, error=error), timeout=self.config.kv_rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:  # the lease frees it anyway
            log.warning("CompleteTransfer %s failed: %s", transfer_id, exc.code().name)

    async def _release_transfer(self, transfer_id: str) -> None:
        """Frees KV nobody will load (the request ended at its first token)."""
        unlink_segment(segment_path(transfer_id, pathlib.Path(self.config.kv_dir)), recycle_file=True)

    async def register_kv_endpoint(self) -> None:
        """Announces this worker to kvtransfer and clears KV pulled by a previous run of this worker."""
        shutil.rmtree(self.pull_dir, ignore_errors=True)
        try:
            await self.kv.RegisterEndpoint(kvtransfer_pb2.RegisterEndpointRequest(
                worker_id=self.worker_id, host=self.host, transports=["shm", "grpc"]),
                timeout=self.config.kv_rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("kvtransfer at %s not reachable yet (%s); transfers will retry", self.config.kvtransfer,
                        exc.code().name)

    async def Abort(self, request: worker_pb2.AbortRequest, context):
        found = False
        for suffix in (":prefill", ":decode", ":local"):
            found |= await self.engine.abort(request.request_id + suffix)
        if check_id("kv.transfer_id", request.kv.transfer_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, check_id("kv.transfer_id", request.kv.transfer_id))
        if request.HasField("kv") and request.kv.transfer_id:
            if request.kv.source_worker and request.kv.source_worker != self.worker_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"kv.source_worker: {request.kv.source_worker!r} is not this worker")
            await self._abandon_transfer(request.kv.transfer_id)
            found = True
        return worker_pb2.AbortResponse(found=found)

    async def _abandon_transfer(self, transfer_id: str) -> None:
        """Exported KV that will never be decoded: ended at the broker (RELEASED) and its segment freed here
        even if the broker is unreachable."""
        try:
            await self._kv_call("Release", kvtransfer_pb2.ReleaseTransferRequest(transfer_id=transfer_id))
        except grpc.aio.AioRpcError as exc:  # NOT_FOUND: already ended; otherwise the lease ends it
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("Release %s failed: %s", transfer_id, exc.code().name)
        await self._release_transfer(transfer_id)

    async def _run(self, ereq: EngineRequest):
        """The engine's outputs, tracked for preemption: an abort caused by Preempt ends as "preempted"."""
        ended = asyncio.Event()
        self.active[ereq.request_id] = (ereq.offline, ended)
        finished = False
        stream = self.engine.generate(ereq)
        try:
            async for o in stream:
                if o.finished and ereq.request_id in self.preempted and o.finish_reason not in NATURAL_ENDS:
                    # aborted by Preempt; a request that reached its end in the same step keeps its end (it
                    # has all its tokens: re-queued as preempted it would resume for one token too many)
                    o.finish_reason = "preempted"
                finished = finished or o.finished
                if o.finished:
                    ended.set()  # the engine stopped it (a Preempt's wait ends here, not after the caller's work)
                yield o
        finally:
            # Closed early (the caller went away while this was suspended at a yield): the engine request
            # must stop now, not whenever the garbage collector finalizes the abandoned generators.
            try:
                if not finished:
                    await self.engine.abort(ereq.request_id)
                await stream.aclose()
            finally:
                ended.set()
                self.active.pop(ereq.request_id, None)
                self.preempted.discard(ereq.request_id)

    async def Preempt(self, request: worker_pb2.PreemptRequest, context):
        if request.request_class != common_pb2.OFFLINE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_class: only OFFLINE work is preemptible")
        t0 = time.perf_counter()
        victims = [rid for rid, (offline, _) in self.active.items() if offline and rid not in self.preempted]
        victims.reverse()  # newest first: they have produced the least
        if request.request_ids:  # the scheduler named them (its decision core's eviction order)
            wanted = set(request.request_ids)
            victims = [v for v in victims if v.rsplit(":", 1)[0] in wanted]
        if request.max_requests > 0:
            victims = victims[: request.max_requests]
        waits = []
        for rid in victims:
            self.preempted.add(rid)
            waits.append(self.active[rid][1].wait())
            # a decode keeps its KV; a prefill's is the prompt alone and is recomputed with it
            await self.engine.abort(rid, park=self.parking and not rid.endswith(":prefill"))
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=30)
        stop_ms = (time.perf_counter() - t0) * 1e3
        trace.get_current_span().add_event("duopool.preempted", {
            "duopool.requests": len(victims), "duopool.stop_ms": stop_ms, "duopool.reason": request.reason})
        if victims:
            log.info("preempted %d offline request(s) in %.1f ms (%s)", len(victims), stop_ms, request.reason)
            metrics.WORKER_PREEMPTED.labels(self.worker_id).inc(len(victims))
        return worker_pb2.PreemptResponse(request_ids=[v.rsplit(":", 1)[0] for v in victims], stop_ms=stop_ms)

    async def SetRole(self, request: worker_pb2.SetRoleRequest, context):
        if request.role and request.role not in PB_ROLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role: unknown value {request.role}")
        if request.pool and request.pool not in PB_POOL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pool: unknown value {request.pool}")
        if request.role:
            self.role = PB_ROLE[request.role]
        if request.pool:
            self.pool = PB_POOL[request.pool]
        self.offline_only = request.offline_only
        set_role = getattr(self.engine, "set_role", None)
        if set_role is not None:  # an engine whose step plans follow the role (sim --step-policy)
            set_role(self.role, self.pool, self.offline_only)
        log.info("role set to %s, pool %s", self.role, self.pool)
        return self.info_pb()

    async def Stats(self, request, context):
        offline = sum(1 for off, _ in self.active.values() if off)
        plans = None
        ps = self.engine.plan_stats()
        if ps is not None:
            plans = worker_pb2.StepPlanStats(
                policy=self.engine.step_plans, steps=ps.steps, planned_steps=ps.planned_steps,
                preempted=ps.preempted, predictor_fitted=ps.fitted, predictor_samples=ps.samples,
                predictor_mape=ps.mape, preempt_latency_p50_ms=ps.latency_p50_ms,
                preempt_latency_p99_ms=ps.latency_p99_ms)
        return worker_pb2.StatsResponse(info=self.info_pb(), requests_served=self.served,
                                        tokens_generated=self.tokens, simulated=self.engine.simulated,
                                        running_online=len(self.active) - offline, running_offline=offline,
                                        step_plans=plans)


async def _heartbeat_loop(service: WorkerService, stop: asyncio.Event) -> None:
    r = registry.connect(service.config.redis_url)
    ttl = max(3.0, 3 * service.config.heartbeat_s)
    broken_logged = False
    try:
        while not stop.is_set():
            try:
                if service.engine.broken:  # no more work for it: it leaves the registry and says why
                    if not broken_logged:
                        log.error("engine broken (%s): deregistering and reporting NOT_SERVING", service.engine.broken)
                        broken_logged = True
                        await service.not_serving()
                    await registry.deregister(r, service.worker_id)
                else:
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
    cpus = resolve_cpus(config.cpus) if config.cpus else None
    if cpus:  # before the engine starts: its processes (vLLM's engine core) inherit the mask
        for tid in os.listdir("/proc/self/task"):  # every thread that exists already; later ones inherit
            os.sched_setaffinity(int(tid), cpus)
        log.info("pinned to CPU core(s) %s%s (the engine's processes inherit it)", format_cpus(cpus),
                 f" ({config.cpus})" if config.cpus.startswith("share:") else "")
    elif config.cpus:
        log.warning("not pinned (--cpus %s): fewer cores than shares (%d usable)", config.cpus,
                    len(available_cpus()))
    if config.threads == 0:  # one torch thread per core it runs on
        config = dataclasses.replace(config, threads=len(cpus) if cpus else 1)
    os.environ["DUOPOOL_KV_RECYCLE_MIB"] = str(config.kv_recycle_mib)  # read by duopool.kv.recycle (and the engine's processes)
    init_telemetry("worker")
    start_metrics_server(config.host, config.metrics_port)
    engine = create_engine(config)
    log.info("starting %s engine (model %s)%s", engine.name, config.model,
             " — SIMULATED" if engine.simulated else "")
    await engine.start()
    service = WorkerService(config, engine, "")
    engine.step_observer = metrics.ENGINE_STEP.labels(service.worker_id).observe
    server = Server(config.bind, [(worker_pb2_grpc.add_WorkerServicer_to_server, service, "duopool.v1.Worker")])
    service.server = server
    service.address = config.advertise or f"{config.host}:{server.port}"
    if config.advertise == "" and config.host in ("0.0.0.0", "::"):
        service.address = f"{socket.gethostname()}:{server.port}"
    await server.start()
    await service.register_kv_endpoint()
    hb = asyncio.create_task(_heartbeat_loop(service, stop))
    log.info("worker %s (%s, %s pool) serving on %s", service.worker_id, config.role, config.pool_or_default,
             service.address)
    if ready is not None:
        ready.set()
    await stop.wait()
    await hb
    await server.stop()
    ps = engine.plan_stats()
    if ps is not None:
        log.info("step plans (%s): %d of %d steps planned, %d offline requests preempted in the engine (online "
                 "arrival -> stopped p50 %.1f / p99 %.1f ms), latency predictor %s on %d steps (MAPE %.1f%%)",
                 engine.step_plans, ps.planned_steps, ps.steps, ps.preempted, ps.latency_p50_ms,
                 ps.latency_p99_ms, "fitted" if ps.fitted else "not fitted", ps.samples, 100 * ps.mape)
    await engine.stop()
    await service.channels.close()
    if service._kv_channel is not None:
        await service._kv_channel.close()
    shutil.rmtree(service.pull_dir, ignore_errors=True)
