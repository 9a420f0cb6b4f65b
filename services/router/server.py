"""The router: the only public service. Validates, places, drives prefill → KV handoff → decode, streams.

Per request: ``Scheduler.Place`` picks a prefill and a decode worker; ``Worker.Prefill`` on the first
returns the first token (streamed to the client at once: that is the TTFT) and a handle to the prompt's
KV, which the prefill worker has announced to kvtransfer; ``Worker.Decode`` on the second loads that KV
and streams the rest. A prefill worker that is unreachable is excluded and the request placed again
(``place_retries`` times); nothing has been streamed yet at that point, so the client sees one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid

import grpc
from opentelemetry import trace

from duopool.common import metrics
from duopool.common.config import RouterConfig
from duopool.common.ids import MAX_CUSTOM_ID, check_id
from duopool.common.metrics import start_metrics_server
from duopool.common.rpc import Channels, Server
from duopool.common.tasks import TaskSet
from duopool.common.telemetry import current_trace_id, init_telemetry
from duopool.router.session import SchedulerSession
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

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


MAX_BATCH = 100_000
# Quotas on what one request may carry (documented in docs/configuration.md's "Limits"): larger prompts
# cannot fit any context these models have, and would only cost memory and Redis space.
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKENS = 262_144
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestFailed(Exception):
    """A request ends with this status (the gRPC API aborts with it; the HTTP API maps it to an HTTP status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _check_prompt_and_sampling(prefix: str, msg) -> str | None:
    """Checks the fields a Generate request and a batch item share; ``prefix`` names the item."""
    which = msg.WhichOneof("prompt")
    if which is None:
        return f"{prefix}prompt: required (text, token_ids or messages)"
    if which == "text" and not msg.text.strip():
        return f"{prefix}prompt.text: must not be empty"
    if which == "text" and len(msg.text) > MAX_PROMPT_CHARS:
        return f"{prefix}prompt.text: at most {MAX_PROMPT_CHARS:,} characters"
    if which == "token_ids":
        if not msg.token_ids.ids:
            return f"{prefix}prompt.token_ids: must not be empty"
        if len(msg.token_ids.ids) > MAX_PROMPT_TOKENS:
            return f"{prefix}prompt.token_ids: at most {MAX_PROMPT_TOKENS:,} tokens"
        if min(msg.token_ids.ids) < 0:
            return f"{prefix}prompt.token_ids: must be >= 0"
    if which == "messages":
        if not msg.messages.messages:
            return f"{prefix}prompt.messages: must not be empty"
        if sum(len(m.content) for m in msg.messages.messages) > MAX_PROMPT_CHARS:
            return f"{prefix}prompt.messages: at most {MAX_PROMPT_CHARS:,} characters of content in all"
        for i, m in enumerate(msg.messages.messages):
            if m.role not in CHAT_ROLES:
                return f"{prefix}prompt.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}"
    if msg.max_tokens <= 0 and not getattr(msg, "fit_max_tokens", False):
        return f"{prefix}max_tokens: must be > 0 (got {msg.max_tokens})"
    s = msg.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        return f"{prefix}sampling.temperature: must be a number >= 0"
    if not (math.isfinite(s.top_p) and 0 <= s.top_p <= 1):
        return f"{prefix}sampling.top_p: must be in [0, 1]"
    return None


def validate(req: router_pb2.GenerateRequest) -> str | None:
    """Returns ``"field: problem"`` for the first invalid field, or None."""
    problem = _check_prompt_and_sampling("", req)
    if problem:
        return problem
    if req.request_class not in (common_pb2.REQUEST_CLASS_UNSPECIFIED, common_pb2.ONLINE, common_pb2.OFFLINE):
        return f"request_class: must be ONLINE or OFFLINE (got {req.request_class})"
    if not (math.isfinite(req.slo.ttft_ms) and req.slo.ttft_ms >= 0):
        return "slo.ttft_ms: must be a number >= 0"
    if not (math.isfinite(req.slo.tpot_ms) and req.slo.tpot_ms >= 0):
        return "slo.tpot_ms: must be a number >= 0"
    return check_id("request_id", req.request_id)


def validate_batch(req: router_pb2.SubmitBatchRequest, max_model_len: int = 0) -> str | None:
    """The whole job is checked before anything is enqueued: one bad item rejects the job."""
    if not req.requests:
        return "requests: must not be empty"
    if len(req.requests) > MAX_BATCH:
        return f"requests: at most {MAX_BATCH} per job (got {len(req.requests)})"
    problem = check_id("job_id", req.job_id, job=True)
    if problem:
        return problem
    seen: set[str] = set()
    for i, item in enumerate(req.requests):
        problem = _check_prompt_and_sampling(f"requests[{i}].", item)
        if problem:
            return problem
        if max_model_len and item.max_tokens >= max_model_len:
            return f"requests[{i}].max_tokens: {item.max_tokens} exceeds the model's context of {max_model_len}"
        cid = item.custom_id or str(i)
        if len(cid) > MAX_CUSTOM_ID:
            return f"requests[{i}].custom_id: at most {MAX_CUSTOM_ID} characters"
        if cid in seen:
            return f"requests[{i}].custom_id: {cid!r} repeats an earlier request's id"
        seen.add(cid)
    return None


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.channels = Channels()
        self.tracer = init_telemetry("router")
        self.inflight: set[str] = set()  # request ids being served (duplicates are refused)
        self.keys = None  # ApiKeys, set by serve()
        self.client_id = ""  # this router's liveness key id, once it keeps one (serve(), with Redis)
        self._cleanups = TaskSet()
        self.session = SchedulerSession(lambda: self.scheduler)  # Place and Release as messages on one stream

    def _notify(self, coro, what: str) -> asyncio.Task:
        """Sends a call the request does not wait for, in a task of its own (failures only logged)."""
        async def run():
            try:
                await coro
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                log.debug("%s failed: %s", what, exc)

        return self._cleanups.spawn(run())

    async def _cleanup(self, coro, what: str) -> None:
        """Runs a clean-up call (release a placement, free KV) to its end even when the request that needs it
        was cancelled: in a task of its own, awaited shielded — an HTTP client that goes away cancels its
        request's scope at every later await (anyio), so an awaited call would never be sent."""
        try:
            await asyncio.shield(self._notify(coro, what))
        except asyncio.CancelledError:
            pass

    @property
    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        return self.channels.stub(self.config.scheduler, scheduler_pb2_grpc.SchedulerStub)

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        return self.channels.stub(address, worker_pb2_grpc.WorkerStub)

    async def ListWorkers(self, request, context):
        """The workers as clients may see them: role, pool, model, load — not their internal addresses."""
        try:
            resp = await self.scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"scheduler: {exc.details()}")
        for w in resp.workers:
            w.ClearField("address")
            w.ClearField("host")
        return resp

    # -- offline batch jobs: validated here, owned by the scheduler ---------------------------------------
    async def _scheduler_call(self, method: str, request, context):
        try:
            return await getattr(self.scheduler, method)(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                                grpc.StatusCode.ALREADY_EXISTS) else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, exc.details() or exc.code().name)

    def _owner(self, context) -> str:
        """The caller's owner tag (from the API key the interceptor already checked): jobs are per key."""
        from duopool.router.auth import OPEN_OWNER

        if self.keys is None:
            return OPEN_OWNER
        md = dict(context.invocation_metadata() or ())
        return self.keys.check_header(md.get("authorization"))

    async def SubmitBatch(self, request: router_pb2.SubmitBatchRequest, context):
        request.owner = self._owner(context)
        workers = await self._scheduler_call("ListWorkers", common_pb2.ListWorkersRequest(), context)
        limit = min((w.max_model_len for w in workers.workers if w.max_model_len), default=0)
        problem = validate_batch(request, limit)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return await self._scheduler_call("SubmitBatch", request, context)

    async def GetBatch(self, request, context):
        request.owner = self._owner(context)
        return await self._scheduler_call("GetBatch", request, context)

    async def CancelBatch(self, request, context):
        request.owner = self._owner(context)
        return await self._scheduler_call("CancelBatch", request, context)

    async def GetBatchResults(self, request, context):
        request.owner = self._owner(context)
        try:
            call = self.scheduler.GetBatchResults(request, timeout=120)
            async with _cancelling(call):
                async for r in call:
                    yield r
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, exc.details() or exc.code().name)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async with contextlib.aclosing(self.generate(request, context.time_remaining())) as msgs:
                async for msg in msgs:
                    yield msg
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def generate(self, request: router_pb2.GenerateRequest, timeout_s: float | None = None):
        """One request, streamed: token chunks, then the summary. Raises RequestFailed (the gRPC and HTTP
        front ends both call this). A request with no class is online. Every worker call is bounded by the
        request's deadline: the client's (``timeout_s``) or ``request_timeout_s``, whichever is sooner."""
        arrived = time.perf_counter()
        klass = "offline" if request.request_class == common_pb2.OFFLINE else "online"
        problem = validate(request)
        if problem:
            metrics.REQUESTS.labels(klass, "invalid_argument").inc()
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.request_class == common_pb2.REQUEST_CLASS_UNSPECIFIED:
            request.request_class = common_pb2.ONLINE
        rid = request.request_id or uuid.uuid4().hex
        if rid in self.inflight:  # two requests with one id would share engine and KV state: refuse before work
            metrics.REQUESTS.labels(klass, "already_exists").inc()
            raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        limit = self.config.request_timeout_s if timeout_s is None else min(timeout_s, self.config.request_timeout_s)
        deadline = time.monotonic() + limit
        self.inflight.add(rid)
        metrics.ROUTER_INFLIGHT.labels(klass).inc()
        release = scheduler_pb2.ReleaseRequest(request_id=rid, slo=request.slo)
        status = "cancelled"  # unless it ends otherwise: the client went away
        try:
            async with contextlib.aclosing(self._resuming(rid, request, arrived, deadline)) as msgs:
                async for msg in msgs:
                    if msg.HasField("summary"):  # what the request saw, for the SLO-aware preemption trigger
                        times = msg.summary.token_times_ms
                        release.ttft_ms = times[0]
                        if len(times) > 1:
                            release.tpot_ms = (times[-1] - times[0]) / (len(times) - 1)
                        _observe(klass, msg.summary, (time.perf_counter() - arrived))
                        status = "ok"
                    yield msg
        except RequestFailed as exc:
            status = exc.code.name.lower()
            raise
        except Exception:
            status = "internal"
            raise
        finally:
            self.inflight.discard(rid)
            metrics.ROUTER_INFLIGHT.labels(klass).dec()
            metrics.REQUESTS.labels(klass, status).inc()
            await self._cleanup(self.session.release(release), f"release of {rid}")

    async def _resuming(self, rid: str, request: router_pb2.GenerateRequest, arrived: float, deadline: float):
        """``_generate``, and for OFFLINE work preempted by online work (in prefill or decode) the rest of it
        resumed where it stopped: the prompt plus the tokens already streamed become the next prompt, so the
        client sees one uninterrupted stream (greedy: exactly the uninterrupted output). After
        ``offline_resumes`` preemptions it ends with RESOURCE_EXHAUSTED, never OK with a cut answer."""
        offline = request.request_class == common_pb2.OFFLINE
        resumes = self.config.offline_resumes if offline else 0
        current = request
        ids: list[int] = []
        times: list[float] = []
        prompt_len = 0
        for attempt in range(resumes + 1):
            seen: dict = {}
            try:
                attempt_msgs = self._generate(rid, current, arrived, deadline, seen)
                async with contextlib.aclosing(attempt_msgs):
                    async for msg in attempt_msgs:
                        if msg.HasField("chunk"):
                            ids.extend(msg.chunk.token_ids)
                            yield msg
                            continue
                        s = msg.summary
                        times.extend(s.token_times_ms)
                        prompt_len = prompt_len or s.prompt_tokens
                        if s.finish_reason != "preempted" or not offline:
                            s.prompt_tokens, s.output_tokens = prompt_len, len(ids)
                            del s.token_times_ms[:]
                            s.token_times_ms.extend(times)
                            s.ttft_ms = times[0] if times else s.ttft_ms
                            s.resumes = attempt
                            yield msg
                            return
            except RequestFailed as exc:
                if not (offline and exc.code == grpc.StatusCode.ABORTED):  # ABORTED: preempted in prefill
                    raise
            left = seen["max_tokens"] - seen["output_tokens"] if seen else 1
            if left <= 0 or attempt == resumes or time.monotonic() >= deadline:
                break
            log.info("offline request %s preempted after %d token(s); resuming (%d)", rid, len(ids), attempt + 1)
            metrics.RESUMES.labels("preempted").inc()
            trace.get_current_span().add_event("duopool.resume", {"duopool.reason": "preempted",
                                                                  "duopool.tokens_so_far": len(ids),
                                                                  "duopool.attempt": attempt + 1})
            await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))  # the online burst that preempted it passes
            if seen:  # preempted in decode: what it produced becomes part of the prompt (else: run it again)
                prompt_len = prompt_len or seen["prompt_len"]
                current = router_pb2.GenerateRequest()
                current.CopyFrom(request)
                current.token_ids.ids[:] = seen["prompt_ids"] + seen["generated"]
                current.max_tokens, current.fit_max_tokens = left, False
        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"offline request preempted by online work {resumes + 1} time(s) after {len(ids)} "
                            "token(s); retry later")

    async def models(self) -> list[tuple[str, int]]:
        """(model id, context length) of what the workers serve (the configured name overrides theirs)."""
        try:
            resp = await self.scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"scheduler: {exc.details()}") from None
        out: dict[str, int] = {}
        for w in resp.workers:
            name = self.config.served_model_name or w.model
            ctx = w.max_model_len
            if out.get(name) and ctx:
                ctx = min(out[name], ctx)
            out[name] = ctx or out.get(name, 0)
        return sorted(out.items())

    async def _place(self, rid, request, exclude: list[str]) -> scheduler_pb2.Placement:
        prompt_tokens = len(request.token_ids.ids) if request.WhichOneof("prompt") == "token_ids" else 0
        try:
            preq = scheduler_pb2.PlaceRequest(
                request_id=rid, request_class=request.request_class, prompt_tokens=prompt_tokens,
                max_tokens=request.max_tokens, slo=request.slo, exclude_workers=exclude, client_id=self.client_id)
            return await self.session.place(preq, timeout=5)
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
                                                grpc.StatusCode.RESOURCE_EXHAUSTED) \
                else grpc.StatusCode.UNAVAILABLE
            raise RequestFailed(code, f"placement: {exc.details()}") from None

    async def _generate(self, rid, request, arrived, deadline: float, seen: dict):
        """One attempt: place, prefill, decode. Fills ``seen`` (prompt ids, tokens generated) as it goes."""
        exclude: list[str] = []
        fit = request.fit_max_tokens
        for attempt in range(self.config.place_retries + 1):
            placement = await self._place(rid, request, exclude)
            limit = placement.prefill.max_model_len
            if limit and request.max_tokens >= limit and not fit:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"max_tokens: {request.max_tokens} exceeds the model's context of {limit}")
            preq = worker_pb2.PrefillRequest(
                request_id=rid, max_tokens=request.max_tokens, sampling=request.sampling,
                request_class=request.request_class, export_kv=request.max_tokens > 1 or fit,
                decode_worker=placement.decode.worker_id, decode_host=placement.decode.host, chat=request.chat,
                fit_max_tokens=fit,
            )
            which = request.WhichOneof("prompt")
            if which == "text":
                preq.text = request.text
            elif which == "messages":
                preq.messages.CopyFrom(request.messages)
            else:
                preq.token_ids.CopyFrom(request.token_ids)
            if placement.prefill.worker_id == placement.decode.worker_id and placement.prefill.address:
                # Both phases on one (mixed) worker: one streamed call, no KV exported, moved or tracked.
                preq.export_kv = False
                try:
                    local_msgs = self._generate_local(rid, request, preq, placement, arrived, deadline, seen)
                    async with contextlib.aclosing(local_msgs):
                        async for msg in local_msgs:
                            yield msg
                    return
                except _LocalFailed as exc:
                    if attempt < self.config.place_retries:
                        log.warning("request %s: worker %s failed before its first token (%s); placing again",
                                    rid, placement.prefill.worker_id, exc.code.name)
                        exclude.append(placement.prefill.worker_id)
                        await self.channels.drop(placement.prefill.address)
                        continue
                    raise RequestFailed(exc.code, exc.message) from None
            try:
                pre = await self.worker(placement.prefill.address).Prefill(preq, timeout=_left(deadline))
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE and attempt < self.config.place_retries:
                    log.warning("request %s: prefill worker %s failed (%s); placing again", rid,
                                placement.prefill.worker_id, exc.code().name)
                    exclude.append(placement.prefill.worker_id)
                    await self.channels.drop(placement.prefill.address)
                    continue
                raise RequestFailed(exc.code(), exc.details() or exc.code().name) from None
        if placement.report_first_token:  # the decision core follows the request into its decode batch
            self._notify(self.scheduler.FirstToken(scheduler_pb2.FirstTokenRequest(request_id=rid), timeout=2),
                         f"first-token notice of {rid}")
        max_tokens = pre.max_tokens if fit and pre.max_tokens else request.max_tokens
        generated = [pre.first_token_id]
        seen.update(prompt_ids=list(pre.prompt_token_ids), prompt_len=len(pre.prompt_token_ids),
                    max_tokens=max_tokens, generated=generated, output_tokens=1)
        first_at = time.perf_counter()
        token_times = [(first_at - arrived) * 1e3]
        yield router_pb2.GenerateResponse(chunk=router_pb2.TokenChunk(text=pre.first_token_text,
                                                                      token_ids=[pre.first_token_id]))
        finish_reason = pre.finish_reason
        cached = 0
        decode_worker = ""
        if not pre.finished:
            decode_worker = placement.decode.worker_id
            dreq = worker_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=pre.prompt_token_ids, generated_token_ids=[pre.first_token_id],
                max_tokens=max_tokens - 1, sampling=request.sampling, request_class=request.request_class,
            )
            if pre.HasField("kv"):
                dreq.kv.CopyFrom(pre.kv)
            decode_addr, moves = placement.decode.address, 0
            kv_unclaimed = pre.HasField("kv")  # until the decode worker answers, the KV is the router's to free
            while True:
                call = self.worker(decode_addr).Decode(dreq, timeout=_left(deadline))
                try:
                    async with _cancelling(call):
                        async for d in call:
                            kv_unclaimed = False
                            if d.cached_tokens:
                                cached = d.cached_tokens
                            if d.token_ids:
                                yield _chunk(d, generated, token_times, seen, arrived)
                            if d.finished:
                                finish_reason = d.finish_reason
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:  # a restarted worker gets a fresh channel at once
                        await self.channels.drop(decode_addr)
                    moved = await self._move_decode(rid, request, exc, decode_worker, pre.prompt_token_ids,
                                                    generated, max_tokens, finish_reason, moves, deadline)
                    if moved is not None:
                        moves += 1
                        (decode_worker, decode_addr), dreq = moved
                        continue
                    code = exc.code() if exc.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
                    raise RequestFailed(code, f"decode worker {decode_worker}: {exc.details()}") from None
                except BaseException:  # cancelled (client gone) before the decode worker took the KV
                    if kv_unclaimed:
                        kv_unclaimed = False
                        await self._cleanup(self.worker(placement.prefill.address).Abort(
                            worker_pb2.AbortRequest(request_id=rid, kv=pre.kv), timeout=5), f"KV of {rid}")
                    raise
        yield router_pb2.GenerateResponse(summary=router_pb2.GenerateSummary(
            request_id=rid, prompt_tokens=len(pre.prompt_token_ids), output_tokens=len(generated),
            ttft_ms=token_times[0], token_times_ms=token_times, prefill_worker=placement.prefill.worker_id,
            decode_worker=decode_worker, finish_reason=finish_reason or "length", engine=placement.prefill.engine,
            kv_transferred_tokens=pre.kv.num_tokens if pre.HasField("kv") else 0, decode_cached_tokens=cached,
            kv_bytes=pre.kv.num_bytes if pre.HasField("kv") else 0, trace_id=current_trace_id(),
        ))

    async def _move_decode(self, rid: str, request, exc: grpc.aio.AioRpcError, lost: str, prompt_ids,
                           generated: list[int], max_tokens: int, finish_reason: str, moves: int,
                           deadline: float) -> tuple[tuple[str, str], worker_pb2.DecodeRequest] | None:
        """A decode worker lost mid-stream (UNAVAILABLE): the rest continues on another one from the tokens
        already streamed (its KV recomputed there), so the client sees one stream. Returns (the new worker's
        id and address, the DecodeRequest that continues there), logged, counted and traced as a resume; None
        when it cannot continue elsewhere (another error, out of moves, nothing left, no time, no other
        worker)."""
        left = max_tokens - len(generated)
        if not (exc.code() == grpc.StatusCode.UNAVAILABLE and moves < self.config.place_retries and left > 0
                and not finish_reason and deadline - time.monotonic() > 0.5):
            return None
        moved = await self._place(rid, request, [lost])
        if moved.decode.worker_id == lost:
            return None
        log.warning("request %s: decode worker %s lost after %d token(s); continuing on %s", rid, lost,
                    len(generated), moved.decode.worker_id)
        metrics.RESUMES.labels("decode_lost").inc()
        trace.get_current_span().add_event("duopool.resume", {
            "duopool.reason": "decode_lost", "duopool.lost_worker": lost, "duopool.worker": moved.decode.worker_id,
            "duopool.tokens_so_far": len(generated)})
        return (moved.decode.worker_id, moved.decode.address), worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt_ids, generated_token_ids=generated, max_tokens=left,
            sampling=request.sampling, request_class=request.request_class)

    async def _generate_local(self, rid, request, preq, placement, arrived, deadline: float, seen: dict):
        """Prefill and decode on one worker (``Worker.PrefillDecode``): the first message carries the first
        token, the rest stream as the engine makes them. A worker lost before the first token raises
        ``_LocalFailed`` (the caller places again); lost after it, the rest continues on another decode
        worker from the tokens already streamed (recomputed there), as in the disaggregated path."""
        w = placement.prefill
        generated: list[int] = []
        token_times: list[float] = []
        prompt_ids: list[int] = []
        finish_reason = ""
        max_tokens = request.max_tokens
        decode_worker, addr, moves = w.worker_id, w.address, 0
        stream = self.worker(addr).PrefillDecode(preq, timeout=_left(deadline))
        while True:
            try:
                async with _cancelling(stream):
                    async for m in stream:
                        if not prompt_ids:
                            prompt_ids = list(m.prompt_token_ids)
                            max_tokens = m.max_tokens or max_tokens
                            seen.update(prompt_ids=prompt_ids, prompt_len=len(prompt_ids), max_tokens=max_tokens,
                                        generated=generated, output_tokens=0)
                            if placement.report_first_token:
                                self._notify(self.scheduler.FirstToken(
                                    scheduler_pb2.FirstTokenRequest(request_id=rid), timeout=2),
                                    f"first-token notice of {rid}")
                        if m.token_ids:
                            yield _chunk(m, generated, token_times, seen, arrived)
                        if m.finished:
                            finish_reason = m.finish_reason
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await self.channels.drop(addr)
                code = exc.code() if exc.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
                if not generated:
                    if exc.code() in RETRYABLE:
                        raise _LocalFailed(code, exc.details() or code.name) from None
                    raise RequestFailed(code, exc.details() or code.name) from None
                moved = await self._move_decode(rid, request, exc, decode_worker, prompt_ids, generated, max_tokens,
                                                finish_reason, moves, deadline)
                if moved is not None:
                    moves += 1
                    (decode_worker, addr), dreq = moved
                    stream = self.worker(addr).Decode(dreq, timeout=_left(deadline))
                    continue
                raise RequestFailed(code, f"worker {decode_worker}: {exc.details()}") from None
        if not generated:
            raise RequestFailed(grpc.StatusCode.INTERNAL, f"worker {w.worker_id}: no token produced")
        yield router_pb2.GenerateResponse(summary=router_pb2.GenerateSummary(
            request_id=rid, prompt_tokens=len(prompt_ids), output_tokens=len(generated), ttft_ms=token_times[0],
            token_times_ms=token_times, prefill_worker=w.worker_id, decode_worker=decode_worker,
            finish_reason=finish_reason or "length", engine=w.engine, trace_id=current_trace_id()))


@contextlib.asynccontextmanager
async def _cancelling(call):
    """A worker's (or the scheduler's) stream, cancelled however the block holding it ends. A generator closed
    while suspended at a yield (its client went away while a message was being sent) gets GeneratorExit
    there, which does not cancel the call it iterates; the call and its reader form a reference cycle, so
    without this the worker would go on generating for nobody until the garbage collector ran."""
    try:
        yield call
    finally:
        call.cancel()


def _chunk(m, generated: list[int], token_times: list[float], seen: dict, arrived: float):
    """The client's chunk for a worker's message carrying tokens; the request's bookkeeping (tokens so far,
    their arrival times, what a resume starts from) follows it."""
    generated.extend(m.token_ids)
    seen["output_tokens"] = len(generated)
    token_times.extend([(time.perf_counter() - arrived) * 1e3] * len(m.token_ids))
    return router_pb2.GenerateResponse(chunk=router_pb2.TokenChunk(text=m.text, token_ids=m.token_ids))


class _LocalFailed(Exception):
    """The one-worker path failed before its first token with a retryable status: place it again."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _observe(klass: str, summary: router_pb2.GenerateSummary, e2e_s: float) -> None:
    """A finished request's latencies and tokens into the metrics."""
    times = summary.token_times_ms
    if times:
        metrics.TTFT.labels(klass).observe(times[0] / 1e3)
        if len(times) > 1:
            metrics.TPOT.labels(klass).observe((times[-1] - times[0]) / (len(times) - 1) / 1e3)
        chunk_times = sorted(set(times))  # the tokens of one chunk share its time
        itl = metrics.ITL.labels(klass)
        for a, b in zip(chunk_times, chunk_times[1:], strict=False):
            itl.observe((b - a) / 1e3)
    metrics.E2E.labels(klass).observe(e2e_s)
    metrics.OUTPUT_TOKENS.labels(klass).inc(summary.output_tokens)
    if klass == "offline":
        metrics.OFFLINE_TOKENS.inc(summary.output_tokens)


LIVENESS_S = 2.0  # the router refreshes its liveness key this often; it lapses after 3 missed refreshes


async def _liveness(redis_url: str, client_id: str, stop: asyncio.Event) -> None:
    from duopool.common import registry

    r = registry.connect(redis_url)
    key = f"duopool:router:{client_id}"
    try:
        while not stop.is_set():
            try:
                await r.set(key, "1", px=int(LIVENESS_S * 3000))
            except Exception as exc:  # noqa: BLE001 - Redis down: keep serving, keep trying
                log.warning("router liveness not recorded: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), LIVENESS_S)
            except TimeoutError:
                pass
        try:
            await r.delete(key)
        except Exception:  # noqa: BLE001
            pass
    finally:
        await r.aclose()


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _tls(config: RouterConfig) -> tuple[bytes, bytes] | None:
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as c, open(config.tls_key, "rb") as k:
        return c.read(), k.read()


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from elsewhere


async def serve(config: RouterConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    from duopool.router.auth import ApiKeys, GrpcAuthInterceptor

    init_telemetry("router")
    start_metrics_server(config.host, config.metrics_port)
    keys = ApiKeys.from_settings(os.environ.get("DUOPOOL_API_KEYS", ""), config.api_keys_file)
    if not keys.enabled and config.publish_addr and not _is_loopback(config.publish_addr):
        raise SystemExit(f"router: DUOPOOL_PUBLISH_ADDR={config.publish_addr} publishes the API beyond this host "
                         "with no API key configured; set DUOPOOL_API_KEYS (or --api-keys-file), or publish on "
                         "127.0.0.1")
    service = RouterService(config)
    service.keys = keys
    server = Server(config.bind, [(router_pb2_grpc.add_RouterServicer_to_server, service, "duopool.v1.Router")],
                    interceptors=(GrpcAuthInterceptor(keys),), tls=_tls(config), internal=False)
    http = None
    if config.http_port >= 0:
        from duopool.router.http import HttpServer

        http = HttpServer(service, config, keys)
        await http.start()
    alive = None
    if config.redis_url:  # placements are leases held by this router's liveness
        service.client_id = f"router-{uuid.uuid4().hex[:12]}"
        alive = asyncio.create_task(_liveness(config.redis_url, service.client_id, stop))
    await server.start()
    scheme = "https" if config.tls_cert else "http"
    log.info("router serving gRPC on %s:%d%s (scheduler %s)", config.host, server.port,
             " with TLS" if config.tls_cert else "", config.scheduler)
    if http is not None:
        log.info("OpenAI-compatible API at %s://%s:%d/v1", scheme, config.host, http.port)
    if keys.enabled:
        log.info("API keys: %d configured; calls without one are refused", len(keys))
    else:
        log.warning("NO API KEY CONFIGURED: the public API on %s is open to anyone who can reach it "
                    "(set DUOPOOL_API_KEYS or --api-keys-file)", config.host)
    if ready is not None:
        ready.set()
    await stop.wait()
    if alive is not None:
        await alive
    if http is not None:
        await http.stop()
    await server.stop()
    await service.session.close()
    await service.channels.close()
