"""The OpenAI-compatible HTTP API of the router: models, completions and chat completions (streaming or
not), files and batches (``openai_batch_api``), behind the same API keys as the gRPC API.

Requests run in-process through ``RouterService.generate`` — the same validation, placement, prefill → KV
→ decode path and the same SLO bookkeeping as a gRPC ``Generate`` — so the HTTP API adds no hop.

Class and SLO per request: ``service_tier: "flex"`` is offline work, ``auto`` / ``default`` /
``priority`` (or none) online; the headers ``x-duopool-ttft-ms`` and ``x-duopool-tpot-ms`` set an online
request's SLO targets (else the scheduler's defaults). Errors are OpenAI's error JSON with the HTTP status
OpenAI uses: 400 naming the parameter, 401, 404, 413, 429, 503 when no worker can take the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from duopool.common.config import RouterConfig
from duopool.common.tasks import TaskSet
from duopool.router.auth import ApiKeys, AuthError
from duopool.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_body,
    completion_body,
    error_body,
    finish_reason,
    unsupported,
    usage,
)
from duopool.router.server import RequestFailed, RouterService, validate
from duopool.v1 import common_pb2, router_pb2

log = logging.getLogger("duopool.router.http")

TTFT_HEADER = "x-duopool-ttft-ms"
TPOT_HEADER = "x-duopool-tpot-ms"
ONLINE_TIERS = (None, "auto", "default", "priority")
OFFLINE_TIERS = ("flex",)
MAX_JSON_BODY = 32 * 1024 * 1024  # a request body larger than this is a 413
MODELS_TTL_S = 2.0
MULTIPART_SLACK = 1 << 20  # multipart framing and form fields around an uploaded file

STATUS_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
TYPE_OF = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
           503: "service_unavailable", 504: "timeout"}
# Documented error statuses of every route (the OpenAPI spec lists them; the fuzz test holds us to it).
ERRORS = {s: {"description": TYPE_OF.get(s, "error")} for s in (400, 401, 404, 413, 429, 503)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, TYPE_OF.get(self.status, "api_error"), self.param, self.code),
                            status_code=self.status)


def from_failure(exc: RequestFailed) -> ApiError:
    """A router failure as an HTTP error; the param is the field the message starts with."""
    status = STATUS_OF.get(exc.code, 500 if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
                           else 502)
    param = None
    head, sep, _ = exc.message.partition(":")
    if sep and status == 400 and " " not in head:
        param = head.removeprefix("prompt.").removeprefix("sampling.")
    return ApiError(status, exc.message, param, exc.code.name.lower())


@dataclass
class HttpContext:
    """What the routes share: the router (generation, workers), its config and the API keys."""

    service: RouterService
    config: RouterConfig
    keys: ApiKeys
    _models: tuple[float, list[tuple[str, int]]] = field(default=(0.0, []))
    on_start: list = field(default_factory=list)  # coroutine functions run once the server is up
    tasks: TaskSet = field(default_factory=TaskSet)  # background tasks, cancelled at stop
    files: object = None  # FileStore (files.py) when the router has Redis
    batches: object = None  # BatchStore (batches.py) when the router has Redis

    def spawn(self, coro) -> asyncio.Task:
        return self.tasks.spawn(coro)

    async def models(self) -> list[tuple[str, int]]:
        at, cached = self._models
        if cached and time.monotonic() - at < MODELS_TTL_S:
            return cached
        try:
            models = await self.service.models()
        except RequestFailed as exc:
            raise from_failure(exc) from None
        self._models = (time.monotonic(), models)
        return models

    async def check_model(self, name: str) -> int:
        """The context length of model ``name``; 404 if not served, 503 if nothing is."""
        models = await self.models()
        if not models:
            raise ApiError(503, "no worker is serving: try again shortly", None, "no_workers")
        for m, ctx in models:
            if m == name:
                return ctx
        raise ApiError(404, f"The model '{name}' does not exist (served: {', '.join(m for m, _ in models)})",
                       "model", "model_not_found")


def owner_dependency(ctx: HttpContext):
    """A FastAPI dependency: the caller's owner tag (see ``auth``), or 401."""

    async def owner(request: Request) -> str:
        try:
            return ctx.keys.check_header(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, str(exc), None, "invalid_api_key") from None

    return owner


def _slo(request: Request) -> common_pb2.Slo:
    slo = common_pb2.Slo()
    for header, name in ((TTFT_HEADER, "ttft_ms"), (TPOT_HEADER, "tpot_ms")):
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and 0 < value <= 3_600_000):
            raise ApiError(400, f"header {header}: must be a number of milliseconds in (0, 3600000]", header)
        setattr(slo, name, value)
    return slo


def _request_class(tier: str | None) -> int:
    if tier in OFFLINE_TIERS:
        return common_pb2.OFFLINE
    if tier in ONLINE_TIERS:
        return common_pb2.ONLINE
    raise ApiError(400, f"service_tier: must be one of auto, default, flex, priority (got {tier!r})", "service_tier")


def _sampling(req) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
        top_p=1.0 if req.top_p is None else req.top_p, ignore_eos=bool(req.ignore_eos))
    if req.seed is not None:
        s.seed = req.seed
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not x for x in stops):
        raise ApiError(400, "stop: stop sequences must not be empty", "stop")
    s.stop.extend(stops)
    return s


def _chat_messages(req: ChatCompletionRequest) -> common_pb2.ChatMessages:
    out = common_pb2.ChatMessages()
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported "
                                        f"(got type {part.type!r})", f"messages[{i}].content")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        out.messages.append(common_pb2.ChatMessage(role=m.role, content=content))
    if not any(m.content for m in out.messages):
        raise ApiError(400, "messages: no message has any content", "messages")
    return out


def _generate_request(req, request: Request, max_tokens: int | None) -> router_pb2.GenerateRequest:
    problem = unsupported(req)
    if problem:
        raise ApiError(400, problem[1], problem[0], "unsupported_parameter")
    cls = _request_class(req.service_tier)
    g = router_pb2.GenerateRequest(
        sampling=_sampling(req), request_class=cls,
        slo=_slo(request) if cls == common_pb2.ONLINE else common_pb2.Slo(),
        request_id=uuid.uuid4().hex)
    if max_tokens is None:
        g.fit_max_tokens = True  # no limit asked: as many as the context leaves (what OpenAI does)
    else:
        g.max_tokens = max_tokens
    return g


def batch_request(req, chat: bool, context: int) -> router_pb2.GenerateRequest:
    """One batch line's body as an offline request: the same conversion and checks as a live request
    (``service_tier`` and ``stream`` have no meaning in a batch and are ignored). Raises ApiError."""
    problem = unsupported(req)
    if problem:
        raise ApiError(400, problem[1], problem[0], "unsupported_parameter")
    g = router_pb2.GenerateRequest(sampling=_sampling(req), request_class=common_pb2.OFFLINE)
    limit = (req.max_completion_tokens or req.max_tokens) if chat else (16 if req.max_tokens is None else req.max_tokens)
    if limit is None:
        g.fit_max_tokens = True  # as many as the context leaves; the bound keeps a resumed request's count right
        g.max_tokens = context or 1 << 20
    else:
        if context and limit >= context:
            raise ApiError(400, f"max_tokens: {limit} exceeds the model's context of {context}", "max_tokens")
        g.max_tokens = limit
    if chat:
        g.messages.CopyFrom(_chat_messages(req))
    else:
        _completion_prompt(req, g)
    problem = validate(g)
    if problem:
        raise ApiError(400, problem, problem.partition(":")[0])
    return g


def _completion_prompt(req: CompletionRequest, g: router_pb2.GenerateRequest) -> None:
    p = req.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt given as a batch of one
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        g.text = p
    elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
        if min(p) < 0 or max(p) >= 2**31:
            raise ApiError(400, "prompt: token ids must be in [0, 2^31)", "prompt")
        g.token_ids.ids.extend(p)
    elif isinstance(p, list) and not p:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    else:
        raise ApiError(400, "prompt: one prompt per request (n > 1 prompts are not supported; use /v1/batches)",
                       "prompt")


class _Run:
    """One generation's outcome, filled while it streams."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reason = ""


async def _drive(ctx: HttpContext, g: router_pb2.GenerateRequest, run: _Run) -> AsyncIterator[str]:
    """Text pieces as they come; fills ``run``. Raises ApiError."""
    try:
        async with contextlib.aclosing(ctx.service.generate(g)) as msgs:  # closed now if this one is
            async for msg in msgs:
                if msg.HasField("chunk"):
                    run.completion_tokens += len(msg.chunk.token_ids)
                    if msg.chunk.text:
                        run.text.append(msg.chunk.text)
                        yield msg.chunk.text
                else:
                    run.prompt_tokens = msg.summary.prompt_tokens
                    run.completion_tokens = msg.summary.output_tokens
                    run.reason = msg.summary.finish_reason
    except RequestFailed as exc:
        raise from_failure(exc) from None
    if run.reason == "preempted":  # offline (flex) work stopped for online work: never a cut answer as OK
        raise ApiError(429, "flex request preempted by online traffic before it finished; retry later",
                       None, "resource_unavailable")


async def _collect(ctx: HttpContext, g: router_pb2.GenerateRequest, request: Request) -> _Run:
    """A whole (non-streamed) generation, abandoned as soon as the client goes away: the generation is
    cancelled, which cancels the worker calls, which abort the engine requests (a client timeout must not
    leave the cluster generating thousands of tokens for nobody). Raises ApiError."""
    run = _Run()

    async def consume() -> None:
        async for _piece in _drive(ctx, g, run):
            pass

    async def disconnected() -> None:  # the body is read: the next ASGI message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if not work.done() or work.cancelled():
        raise ApiError(499, "client closed the request", None, "client_closed_request")
    work.result()  # its ApiError, if any
    return run


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _stream(ctx: HttpContext, g, chat: bool, model: str, include_usage: bool, tier: str) -> StreamingResponse:
    cid = ("chatcmpl-" if chat else "cmpl-") + g.request_id
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        out = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice],
               "system_fingerprint": None}
        if chat:
            out["service_tier"] = tier
        if include_usage:
            out["usage"] = None
        return out

    async def body() -> AsyncIterator[bytes]:
        run = _Run()
        if chat:
            yield _sse(chunk(None, None, first=True))
        try:
            async with contextlib.aclosing(_drive(ctx, g, run)) as pieces:
                async for piece in pieces:
                    yield _sse(chunk(piece, None))
        except ApiError as exc:  # the status line is sent: the error travels as an event (vLLM does the same)
            yield _sse(error_body(exc.message, TYPE_OF.get(exc.status, "api_error"), exc.param, exc.code))
            yield _sse("[DONE]")
            return
        yield _sse(chunk(None if chat else "", finish_reason(run.reason)))
        if include_usage:
            final = chunk(None, None)
            final["choices"] = []
            final["usage"] = usage(run.prompt_tokens, run.completion_tokens)
            yield _sse(final)
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-request-id": g.request_id})


def create_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="duopool", version="1", summary="OpenAI-compatible API of the duopool router",
                  docs_url=None, redoc_url=None)
    owner = owner_dependency(ctx)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        else:
            msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return ApiError(400, msg, param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        return ApiError(status, str(exc.detail), None, None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", None, "internal_error").response()

    from duopool.common.metrics import asgi_app

    app.mount("/metrics", asgi_app())  # Prometheus, unauthenticated like vLLM's (counts only, no content)

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", responses=ERRORS)
    async def list_models(_: str = Depends(owner)):
        models = await ctx.models()
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "duopool", "max_model_len": c}
            for m, c in models]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def get_model(model_id: str, _: str = Depends(owner)):
        ctx_len = await ctx.check_model(model_id)
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "duopool", "max_model_len": ctx_len}

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: str = Depends(owner)):
        await ctx.check_model(body.model)
        g = _generate_request(body, request, body.max_completion_tokens or body.max_tokens)
        g.messages.CopyFrom(_chat_messages(body))
        tier = body.service_tier if body.service_tier in ("flex", "priority") else "default"
        if body.stream:
            return _stream(ctx, g, True, body.model, bool(body.stream_options and body.stream_options.include_usage),
                           tier)
        run = await _collect(ctx, g, request)
        return JSONResponse(chat_completion_body("chatcmpl-" + g.request_id, int(time.time()), body.model,
                                                 "".join(run.text), run.reason, run.prompt_tokens,
                                                 run.completion_tokens, tier),
                            headers={"x-request-id": g.request_id})

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request, _: str = Depends(owner)):
        await ctx.check_model(body.model)
        g = _generate_request(body, request, body.max_tokens if body.max_tokens is not None else 16)
        _completion_prompt(body, g)
        if body.stream:
            return _stream(ctx, g, False, body.model,
                           bool(body.stream_options and body.stream_options.include_usage), "default")
        run = await _collect(ctx, g, request)
        return JSONResponse(completion_body("cmpl-" + g.request_id, int(time.time()), body.model, "".join(run.text),
                                            run.reason, run.prompt_tokens, run.completion_tokens),
                            headers={"x-request-id": g.request_id})

    from duopool.router.openai_batch_api import add_routes

    add_routes(app, ctx, owner)
    file_limit = int(ctx.config.max_file_mb * 1e6) + MULTIPART_SLACK
    return BodyLimit(app, MAX_JSON_BODY, {"/v1/files": file_limit})


class BodyLimit:
    """ASGI middleware: a request body over the limit is a 413 before it is read whole (``Content-Length``
    checked first; a chunked body is counted as it arrives)."""

    def __init__(self, app: FastAPI, limit: int, per_path: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.per_path = app, limit, per_path or {}

    def __getattr__(self, name):  # the wrapped app's attributes (openapi(), routes, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope.get("path", ""), self.limit)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_413(receive, send, limit)
        seen = 0
        too_big = False
        more = True  # whether the client is still sending

        async def counting_receive():
            nonlocal seen, too_big, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if seen > limit:
                    too_big = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if not too_big:  # once over the limit, whatever the app answers (FastAPI: a 400) gives way to 413
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception as exc:
            if not (too_big or isinstance(exc, _TooLarge)):
                raise
        if too_big:
            await _send_413(receive if more else None, send, limit)


class _TooLarge(Exception):
    pass


DRAIN_MAX = 64 * 1024 * 1024


async def _send_413(receive, send, limit: float) -> None:
    """Reads and drops what the client is still sending (up to ``DRAIN_MAX``: a client that has not read
    the 413 while uploading would otherwise see a reset), then answers 413 and closes the connection."""
    drained = 0
    while receive is not None and drained < DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            break
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = json.dumps(error_body(f"request body larger than {limit / 1e6:.0f} MB (the largest file /v1/files "
                                 "takes is --max-file-mb)" if limit > MAX_JSON_BODY else
                                 f"request body larger than {limit / 1e6:.0f} MB", "invalid_request_error",
                                 None, "request_too_large")).encode()
    try:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: BLE001 - the response had already started
        pass
