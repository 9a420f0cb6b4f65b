"""``/v1/files`` and ``/v1/batches`` of the OpenAI-compatible API (the stores: ``files`` and ``batches``).

Files are JSONL batch inputs (multipart upload, ``purpose=batch``, at most ``--max-file-mb``) kept in Redis;
a batch runs every line as offline work through the scheduler's durable queue and offers its results as
OpenAI batch output and error files. Every object belongs to the API key that made it (another key gets
404). Without Redis (``--redis-url``) these routes answer 503.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from starlette.datastructures import UploadFile

from duopool.router.batches import ENDPOINTS, WINDOWS, BatchStore, LineError, NotReady
from duopool.router.files import FileStore, FileTooLarge, file_object
from duopool.router.openai_api import ERRORS, ApiError, HttpContext, batch_request

log = logging.getLogger("duopool.router.http")

UPLOAD_READ = 1 << 20
MAX_METADATA = 16


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def make_stores(ctx: HttpContext, r, raw, jobs) -> None:
    """Attaches the file and batch stores (and the batch pump, started with the server) to ``ctx``."""
    files = FileStore(r, raw)

    async def model_context(name: str) -> int:
        try:
            return await ctx.check_model(name)
        except ApiError as exc:
            if exc.status == 404:
                raise LineError("model_not_found", exc.message, "body.model") from None
            raise NotReady(exc.message) from None

    def to_request(req, chat: bool, context: int, lineno: int):
        try:
            return batch_request(req, chat, context)
        except ApiError as exc:
            raise LineError(exc.code or "invalid_request", f"line {lineno}: {exc.message}",
                            f"body.{exc.param}" if exc.param else None) from None

    ctx.files = files
    ctx.batches = BatchStore(r, files, jobs, ctx.config.max_batch_requests, to_request, model_context)

    async def start_pump() -> None:
        ctx.spawn(ctx.batches.pump())

    ctx.on_start.append(start_pump)


def _stores(ctx: HttpContext) -> tuple[FileStore, BatchStore]:
    if ctx.files is None:
        raise ApiError(503, "files and batches need the cluster's Redis: start the router with --redis-url",
                       None, "not_configured")
    return ctx.files, ctx.batches


def _page(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def add_routes(app: FastAPI, ctx: HttpContext, owner) -> None:
    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError):
        log.warning("HTTP %s %s: Redis unavailable (%s)", request.method, request.url.path, exc)
        return ApiError(503, "the cluster's state store is unavailable; try again shortly", None,
                        "store_unavailable").response()

    # -- files -----------------------------------------------------------------------------------------
    @app.post("/v1/files", responses=ERRORS)
    async def upload_file(request: Request, who: str = Depends(owner)):
        files, _ = _stores(ctx)
        limit = int(ctx.config.max_file_mb * 1e6)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "file: send multipart/form-data with fields 'file' and 'purpose'", "file")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            raise ApiError(400, f"file: malformed multipart body ({exc})", "file") from None
        try:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise ApiError(400, "purpose: required", "purpose")
            if purpose != "batch":
                raise ApiError(400, f"purpose: only 'batch' is supported (got {purpose[:32]!r})", "purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "file: required (a file part)", "file")

            async def chunks():
                while piece := await upload.read(UPLOAD_READ):
                    yield piece

            try:
                record = await files.upload(who, (upload.filename or "upload.jsonl")[:256], purpose, chunks(), limit)
            except FileTooLarge as exc:
                raise ApiError(413, f"file: {exc} (--max-file-mb)", "file", "file_too_large") from None
            if int(record["bytes"]) == 0:
                await files.delete(who, record["id"])
                raise ApiError(400, "file: is empty", "file")
            return file_object(record)
        finally:
            await form.close()

    @app.get("/v1/files", responses=ERRORS)
    async def list_files(who: str = Depends(owner), purpose: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         order: Literal["asc", "desc"] = "desc", after: str | None = None):
        files, _ = _stores(ctx)
        try:
            records, more = await files.list(who, limit, after, order == "asc", purpose)
        except KeyError:
            raise ApiError(400, f"after: no file {after!r}", "after") from None
        return _page([file_object(h) for h in records], more)

    async def _file(who: str, file_id: str) -> dict:
        files, _ = _stores(ctx)
        h = await files.get(who, file_id)
        if h is None:
            raise ApiError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
        return h

    @app.get("/v1/files/{file_id}", responses=ERRORS)
    async def get_file(file_id: str, who: str = Depends(owner)):
        return file_object(await _file(who, file_id))

    @app.delete("/v1/files/{file_id}", responses=ERRORS)
    async def delete_file(file_id: str, who: str = Depends(owner)):
        files, _ = _stores(ctx)
        await _file(who, file_id)
        await files.delete(who, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content", responses=ERRORS)
    async def file_content(file_id: str, who: str = Depends(owner)):
        files, batches = _stores(ctx)
        h = await _file(who, file_id)
        headers = {"content-length": h.get("bytes", "0")}
        if h.get("kind") == "upload":
            return StreamingResponse(files.chunks(file_id), media_type="application/octet-stream", headers=headers)
        batch = await batches.r.hgetall(f"duopool:batch:{h['batch_id']}")
        if not batch:
            raise ApiError(404, f"No such File object: {file_id} (its batch is gone)", "file_id", "file_not_found")
        kind = h["kind"].removeprefix("batch_")

        async def body():
            async for _, data in batches.render(batch, (kind,)):
                yield data

        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    # -- batches ---------------------------------------------------------------------------------------
    @app.post("/v1/batches", responses=ERRORS)
    async def create_batch(body: BatchCreate, who: str = Depends(owner)):
        files, batches = _stores(ctx)
        if body.endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint: must be one of {', '.join(ENDPOINTS)} (got {body.endpoint[:64]!r})",
                           "endpoint")
        if body.completion_window not in WINDOWS:
            raise ApiError(400, f"completion_window: must be one of {', '.join(WINDOWS)}", "completion_window")
        if body.metadata is not None:
            if len(body.metadata) > MAX_METADATA:
                raise ApiError(400, f"metadata: at most {MAX_METADATA} pairs", "metadata")
            if any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items()):
                raise ApiError(400, "metadata: keys at most 64 and values at most 512 characters", "metadata")
        f = await files.get(who, body.input_file_id)
        if f is None:
            raise ApiError(404, f"No such File object: {body.input_file_id}", "input_file_id", "file_not_found")
        if f.get("purpose") != "batch" or f.get("kind") != "upload":
            raise ApiError(400, f"input_file_id: {body.input_file_id} is not a file of purpose 'batch'",
                           "input_file_id")
        record = await batches.create(who, body.input_file_id, body.endpoint, body.completion_window, body.metadata)
        return await batches.object(record)

    async def _batch(who: str, batch_id: str) -> dict:
        _, batches = _stores(ctx)
        h = await batches.get(who, batch_id)
        if h is None:
            raise ApiError(404, f"No such batch: {batch_id}", "batch_id", "batch_not_found")
        return h

    @app.get("/v1/batches/{batch_id}", responses=ERRORS)
    async def get_batch(batch_id: str, who: str = Depends(owner)):
        _, batches = _stores(ctx)
        return await batches.object(await _batch(who, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", responses=ERRORS)
    async def cancel_batch(batch_id: str, who: str = Depends(owner)):
        _, batches = _stores(ctx)
        return await batches.cancel(await _batch(who, batch_id))

    @app.get("/v1/batches", responses=ERRORS)
    async def list_batches(who: str = Depends(owner), limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: str | None = None):
        _, batches = _stores(ctx)
        try:
            data, more = await batches.list(who, limit, after)
        except KeyError:
            raise ApiError(400, f"after: no batch {after!r}", "after") from None
        return _page(data, more)
