"""OpenAI batches (``/v1/batches``) on duopool's durable offline queue (``duopool.common.jobs``).

A batch is a job of the queue (same id) plus a record of what OpenAI's batch object says. Its life:

``validating``
    A builder (in some router) reads the input file twice, streaming: first every line is checked (JSON,
    ``custom_id`` unique, ``url`` the batch's endpoint, a body the endpoint accepts, one model); any bad
    line fails the batch (``failed``, ``errors`` naming the lines) and nothing runs. Then the requests are
    enqueued in chunks (``JobStore.append``: cursor-guarded, so a builder that dies — its router killed —
    is resumed by any router from where it stopped, never enqueuing a request twice). The builder holds a
    lease (``:builder`` key) that a router's pump takes over when it lapses.
``in_progress``
    The scheduler's dispatcher runs the requests as offline work (preempted by online load, resumed where
    they stopped; every result recorded once). ``finalizing`` once every request has a result.
``completed`` / ``cancelled`` / ``expired``
    Set once (one Lua script) by the first router's pump to see the job done, the batch cancelled
    (``cancelling``) or past its ``completion_window``. The output and error files are records whose
    content is rendered from the job's results on download, so nothing is stored twice; the record keeps
    the snapshot time, so a result that lands after a cancel does not change a file already counted.

Keys: ``duopool:batch:{id}`` (HASH, the record), ``duopool:batches:{owner}`` (ZSET, listing),
``duopool:batches:active`` (ZSET, what the pumps look after), ``duopool:batch:{id}:builder`` (lease).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from duopool.common.ids import MAX_CUSTOM_ID
from duopool.common.jobs import JobStore, job_item
from duopool.router.files import FILE, OWNER_FILES, FileStore
from duopool.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_body,
    completion_body,
    error_body,
)

log = logging.getLogger("duopool.router.batches")

BATCH = "duopool:batch:{}"
OWNER_BATCHES = "duopool:batches:{}"
ACTIVE = "duopool:batches:active"
LEASE = "duopool:batch:{}:builder"
ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}  # endpoint -> chat
WINDOWS = {"24h": 86_400}
FINAL = ("completed", "cancelled", "expired", "failed")
APPEND_CHUNK = 500  # requests per enqueue script
RENDER_CHUNK = 1000  # results read per round trip when rendering output files
MAX_ERRORS = 100  # line errors reported for a failed batch
LEASE_S = 10.0  # a builder renews its lease as it goes; a dead one's batch is taken over after this
PUMP_S = 1.0
YIELD_EVERY = 200  # lines parsed between yields to the event loop (online requests keep flowing)

# Sets a batch's final state once: KEYS batch, active set, owner's file index, then the file records to make;
# ARGV fields (JSON object of strings), batch id, then one JSON record per file key.
_FINALIZE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'completed' or st == 'cancelled' or st == 'expired' or st == 'failed' then return 0 end
for k, v in pairs(cjson.decode(ARGV[1])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZREM', KEYS[2], ARGV[2])
for i = 4, #KEYS do
  local rec = cjson.decode(ARGV[i - 1])
  for k, v in pairs(rec) do redis.call('HSET', KEYS[i], k, v) end
  redis.call('ZADD', KEYS[3], rec['created_at'], rec['id'])
end
return 1
"""

# Cancel: validating / in_progress -> cancelling (the pump finishes it). Returns the status after.
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'validating' or st == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  return 'cancelling'
end
return st
"""


class NotReady(Exception):
    """Validation cannot go on yet (no worker serving the model): the builder stops, the pump retries."""


class LineError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _ts(v: str | None) -> int | None:
    return int(float(v)) if v not in (None, "", "0") else None


def batch_object(h: dict, job: dict | None) -> dict:
    """OpenAI's ``batch`` object from the record and its job's progress."""
    status = h["status"]
    if status == "in_progress" and job and job.get("state") == "done":
        status = "finalizing"
    if status in FINAL:
        counts = {"total": int(h.get("total", 0) or 0), "completed": int(h.get("completed", 0) or 0),
                  "failed": int(h.get("failed", 0) or 0)}
    else:
        counts = {"total": int((job or h).get("total", 0) or 0), "completed": int((job or {}).get("done", 0)),
                  "failed": int((job or {}).get("failed", 0))}
    errors = json.loads(h["errors"]) if h.get("errors") else None
    return {
        "id": h["id"], "object": "batch", "endpoint": h["endpoint"], "model": h.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": h["input_file_id"], "completion_window": h["completion_window"], "status": status,
        "output_file_id": h.get("output_file_id") or None, "error_file_id": h.get("error_file_id") or None,
        "created_at": int(float(h["created_at"])), "in_progress_at": _ts(h.get("in_progress_at")),
        "expires_at": _ts(h.get("expires_at")), "finalizing_at": _ts(h.get("finalizing_at")),
        "completed_at": _ts(h.get("completed_at")), "failed_at": _ts(h.get("failed_at")),
        "expired_at": _ts(h.get("expired_at")), "cancelling_at": _ts(h.get("cancelling_at")),
        "cancelled_at": _ts(h.get("cancelled_at")), "request_counts": counts,
        "metadata": json.loads(h["metadata"]) if h.get("metadata") else None,
        "usage": json.loads(h["usage"]) if h.get("usage") else None,
    }


class BatchStore:
    """Batch records, their builders and the pump that finalizes them.

    ``to_request(body, chat, model_context)`` turns one line's body into a ``GenerateRequest`` (the HTTP API's
    own conversion: the same checks a live request gets) or raises ``LineError``; ``model_context(name)``
    returns a served model's context length or raises ``LineError``.
    """

    def __init__(self, r: aioredis.Redis, files: FileStore, jobs: JobStore, max_requests: int,
                 to_request: Callable, model_context: Callable[[str], Awaitable[int]]) -> None:
        self.r = r
        self.files = files
        self.jobs = jobs
        self.max_requests = max_requests
        self.to_request = to_request
        self.model_context = model_context
        self.token = uuid.uuid4().hex  # this router's lease token
        self.building: dict[str, asyncio.Task] = {}
        self._finalize = r.register_script(_FINALIZE)
        self._cancel = r.register_script(_CANCEL)

    # -- records -------------------------------------------------------------------------------------
    async def create(self, owner: str, input_file_id: str, endpoint: str, window: str,
                     metadata: dict | None) -> dict:
        bid = "batch_" + uuid.uuid4().hex[:24]
        now = time.time()
        record = {"id": bid, "owner": owner, "status": "validating", "endpoint": endpoint,
                  "input_file_id": input_file_id, "completion_window": window, "created_at": now,
                  "expires_at": now + WINDOWS[window], "metadata": json.dumps(metadata) if metadata else ""}
        async with self.r.pipeline(transaction=True) as p:
            p.hset(BATCH.format(bid), mapping=record)
            p.zadd(OWNER_BATCHES.format(owner), {bid: now})
            p.zadd(ACTIVE, {bid: now})
            await p.execute()
        self.start_builder(bid)
        return {k: str(v) for k, v in record.items()}

    async def get(self, owner: str, bid: str) -> dict | None:
        if not bid.startswith("batch_") or len(bid) > 128:
            return None
        h = await self.r.hgetall(BATCH.format(bid))
        return h if h and h.get("owner") == owner else None

    async def object(self, h: dict) -> dict:
        job = await self.jobs.status(h["id"]) if h["status"] not in FINAL else None
        return batch_object(h, job)

    async def list(self, owner: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        key = OWNER_BATCHES.format(owner)
        start = 0
        if after:
            rank = await self.r.zrevrank(key, after)
            if rank is None:
                raise KeyError(after)
            start = rank + 1
        ids = await self.r.zrevrange(key, start, start + limit)
        async with self.r.pipeline(transaction=False) as p:
            for bid in ids[:limit]:
                p.hgetall(BATCH.format(bid))
            records = [h for h in await p.execute() if h]
        return [await self.object(h) for h in records], len(ids) > limit

    async def cancel(self, h: dict) -> dict:
        await self._cancel(keys=[BATCH.format(h["id"])], args=[time.time()])
        await self.jobs.cancel(h["id"])  # the dispatcher drops what is still queued at once
        fresh = await self.r.hgetall(BATCH.format(h["id"]))
        return await self.object(fresh)

    # -- building: validate, then enqueue in chunks ---------------------------------------------------
    def start_builder(self, bid: str) -> None:
        if bid in self.building and not self.building[bid].done():
            return
        self.building[bid] = asyncio.create_task(self._build(bid))

    async def _lease(self, bid: str, first: bool) -> bool:
        kw = {"nx": True} if first else {"xx": True}
        if not first and await self.r.get(LEASE.format(bid)) != self.token:
            return False
        return bool(await self.r.set(LEASE.format(bid), self.token, px=int(LEASE_S * 1000), **kw))

    async def _build(self, bid: str) -> None:
        try:
            if not await self._lease(bid, first=True):
                return  # another router is building it
            h = await self.r.hgetall(BATCH.format(bid))
            if not h or h["status"] != "validating":
                return
            t0 = time.perf_counter()
            total, errors, model = await self._validate(h)
            if errors:
                await self.r.hset(BATCH.format(bid), mapping={"errors": json.dumps(errors)})
                await self._final(bid, h, "failed", extra={"total": str(total)})
                log.info("batch %s failed validation: %d bad line(s)", bid, len(errors))
                return
            await self.r.hset(BATCH.format(bid), mapping={"total": total, "model": model})
            validated = time.perf_counter() - t0
            if await self._enqueue(bid, h, total):
                await self.r.eval(
                    "if redis.call('HGET', KEYS[1], 'status') == 'validating' then "
                    "redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[1]) end",
                    1, BATCH.format(bid), time.time())
                log.info("batch %s: %d requests accepted (validated in %.1f s, enqueued in %.1f s)", bid, total,
                         validated, time.perf_counter() - t0 - validated)
        except (RedisError, OSError, NotReady) as exc:
            log.warning("batch %s: building paused (%s); resumed by the next pump", bid, exc)
            await asyncio.sleep(PUMP_S)
        except Exception:
            log.exception("batch %s: building failed", bid)
        finally:
            try:
                if await self.r.get(LEASE.format(bid)) == self.token:
                    await self.r.delete(LEASE.format(bid))
            except (RedisError, OSError):
                pass

    async def _parse(self, raw: bytes, lineno: int, endpoint: str, seen: set[str] | None):
        """One input line -> (custom_id, model, GenerateRequest); raises LineError."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise LineError("invalid_json", f"line {lineno}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise LineError("invalid_request", f"line {lineno}: must be a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
            raise LineError("invalid_custom_id", f"line {lineno}: custom_id must be a string of 1 to "
                                                 f"{MAX_CUSTOM_ID} characters", "custom_id")
        if seen is not None:
            if cid in seen:
                raise LineError("duplicate_custom_id", f"line {lineno}: custom_id {cid[:64]!r} repeats an "
                                                       "earlier line's", "custom_id")
            seen.add(cid)
        if obj.get("method", "POST") != "POST":
            raise LineError("invalid_method", f"line {lineno}: method must be POST", "method")
        if obj.get("url") != endpoint:
            raise LineError("invalid_url", f"line {lineno}: url must be the batch's endpoint {endpoint}", "url")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", f"line {lineno}: body must be a JSON object", "body")
        chat = ENDPOINTS[endpoint]
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            raise LineError("invalid_request", f"line {lineno}: body.{param}: {first.get('msg')}",
                            f"body.{param}") from None
        context = await self.model_context(req.model)
        return cid, req.model, self.to_request(req, chat, context, lineno)

    async def _validate(self, h: dict) -> tuple[int, list[dict], str]:
        errors: list[dict] = []
        seen: set[str] = set()
        count, lineno, model = 0, 0, ""
        fid = h["input_file_id"]
        if not await self.r.exists(FILE.format(fid)):
            return 0, [{"code": "file_not_found", "message": f"input file {fid} was deleted", "param":
                        "input_file_id", "line": None}], ""
        async for raw in self.files.lines(fid):
            lineno += 1
            if lineno % YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if lineno % (10 * YIELD_EVERY) == 0 and not await self._lease(h["id"], first=False):
                    raise NotReady("builder lease lost")
            if not raw.strip():
                continue
            try:
                _, m, _ = await self._parse(raw, lineno, h["endpoint"], seen)
                if model and m != model:
                    raise LineError("mixed_models", f"line {lineno}: model {m!r} differs from line 1's "
                                                    f"{model!r} (one model per batch)", "body.model")
                model = model or m
                count += 1
            except LineError as exc:
                errors.append({"code": exc.code, "message": exc.message, "param": exc.param, "line": lineno})
                if len(errors) >= MAX_ERRORS:
                    break
        if not errors and count == 0:
            errors.append({"code": "empty_file", "message": "the input file has no requests", "param":
                           "input_file_id", "line": None})
        if count > self.max_requests:
            errors.append({"code": "too_many_requests", "message": f"{count} requests; at most "
                           f"{self.max_requests} per batch", "param": "input_file_id", "line": None})
        return count, errors, model

    async def _enqueue(self, bid: str, h: dict, total: int) -> bool:
        """Enqueues the requests from the job's cursor on. True when all are in."""
        job = await self.jobs.status(bid)
        cursor = int(job.get("enqueued", 0)) if job else 0
        index, lineno = 0, 0
        chunk: list[dict] = []
        async for raw in self.files.lines(h["input_file_id"]):
            lineno += 1
            if not raw.strip():
                continue
            if index < cursor:
                index += 1
                continue
            if lineno % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            cid, _, g = await self._parse(raw, lineno, h["endpoint"], None)
            chunk.append(job_item(cid, g))
            index += 1
            if len(chunk) >= APPEND_CHUNK or index == total:
                if not await self._append(bid, cursor, total, chunk, h["owner"]):
                    return False
                cursor += len(chunk)
                chunk = []
        return cursor >= total

    async def _append(self, bid: str, cursor: int, total: int, chunk: list[dict], owner: str) -> bool:
        if not await self._lease(bid, first=False):
            log.info("batch %s: lease lost; another router continues", bid)
            return False
        status = await self.r.hget(BATCH.format(bid), "status")
        if status != "validating":
            return False  # cancelled (or expired) while being enqueued
        got = await self.jobs.append(bid, cursor, total, chunk, owner=owner)
        if got != cursor + len(chunk):
            log.info("batch %s: enqueue cursor at %d, not %d; resuming later", bid, got, cursor)
            return False
        return True

    # -- the pump: resume builders, finalize -------------------------------------------------------------
    async def pump(self, stop: asyncio.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            try:
                await self.pump_once()
            except (RedisError, OSError) as exc:
                log.debug("batch pump: %s", exc)
            except Exception:
                log.exception("batch pump failed")
            await asyncio.sleep(PUMP_S)

    async def pump_once(self) -> None:
        now = time.time()
        for bid in await self.r.zrange(ACTIVE, 0, 999):
            h = await self.r.hgetall(BATCH.format(bid))
            if not h:
                await self.r.zrem(ACTIVE, bid)
                continue
            status = h["status"]
            if status in FINAL:
                await self.r.zrem(ACTIVE, bid)
            elif status == "cancelling":
                await self._final(bid, h, "cancelled")
            elif status in ("validating", "in_progress") and now > float(h.get("expires_at") or "inf"):
                job = await self.jobs.status(bid)
                await self._final(bid, h, "completed" if job and job.get("state") == "done" else "expired")
            elif status == "validating":
                if not await self.r.exists(LEASE.format(bid)):
                    self.start_builder(bid)  # its builder died with its router
            elif status == "in_progress":
                job = await self.jobs.status(bid)
                if job and job.get("state") == "done":
                    await self._final(bid, h, "completed")

    async def _final(self, bid: str, h: dict, final: str, extra: dict | None = None) -> None:
        now = time.time()
        fields = {"status": final, f"{final}_at": str(now), "snapshot_at": str(now)}
        files: list[tuple[str, dict]] = []
        if final != "failed":
            if final != "completed":
                await self.jobs.cancel(bid)
            else:
                fields["finalizing_at"] = str(now)
            snap = {**h, **fields}
            stats = {"output": 0, "error": 0, "completed": 0, "failed": 0, "in": 0, "out": 0}
            async for kind, data in self.render(snap, ("output", "error"), stats):
                stats[kind] += len(data)
            fields.update(completed=str(stats["completed"]), failed=str(stats["failed"]),
                          usage=json.dumps({"input_tokens": stats["in"], "output_tokens": stats["out"],
                                            "total_tokens": stats["in"] + stats["out"],
                                            "input_tokens_details": {"cached_tokens": 0},
                                            "output_tokens_details": {"reasoning_tokens": 0}}))
            for kind in ("output", "error"):
                if stats[kind]:
                    fid = f"file-{bid.removeprefix('batch_')}-{kind}"
                    fields[f"{kind}_file_id"] = fid
                    files.append((fid, {"id": fid, "bytes": str(stats[kind]), "created_at": str(now),
                                        "filename": f"{bid}_{kind}.jsonl", "purpose": "batch_output",
                                        "owner": h["owner"], "kind": f"batch_{kind}", "batch_id": bid}))
        fields.update(extra or {})
        done = await self._finalize(
            keys=[BATCH.format(bid), ACTIVE, OWNER_FILES.format(h["owner"]), *[FILE.format(f) for f, _ in files]],
            args=[json.dumps(fields), bid, *[json.dumps(rec) for _, rec in files]])
        if done:
            log.info("batch %s %s: %s completed, %s failed", bid, final, fields.get("completed", 0),
                     fields.get("failed", 0))

    # -- output files ------------------------------------------------------------------------------------
    async def render(self, h: dict, kinds: tuple[str, ...], stats: dict | None = None
                     ) -> AsyncIterator[tuple[str, bytes]]:
        """The batch's output (``output``) and error (``error``) file lines, in input order, a chunk at a time.
        A finished batch renders the same bytes every time: results after the snapshot of a cancelled or
        expired batch count as not run."""
        bid, total = h["id"], int(h.get("total", 0) or 0)
        final = h["status"]
        snapshot = float(h.get("snapshot_at") or "inf")
        chat = ENDPOINTS[h["endpoint"]]
        model = h.get("model", "")
        for start in range(0, total, RENDER_CHUNK):
            idx = list(range(start, min(total, start + RENDER_CHUNK)))
            results = await self.jobs.results_of(bid, idx)
            if final != "completed":
                results = [r if r is not None and float(r.get("at", 0)) <= snapshot else None for r in results]
            missing = [i for i, r in zip(idx, results, strict=True) if r is None]
            items = dict(zip(missing, await self.jobs.items_of(bid, missing), strict=True)) \
                if missing and "error" in kinds and final in ("cancelled", "expired") else {}
            out: dict[str, list[bytes]] = {"output": [], "error": []}
            for i, r in zip(idx, results, strict=True):
                rid = f"batch_req_{bid.removeprefix('batch_')}_{i}"
                if r is None:
                    item = items.get(i)
                    if item is None:
                        continue
                    line = {"id": rid, "custom_id": item.get("custom_id", ""), "response": None,
                            "error": {"code": f"batch_{final}", "message": f"the batch was {final} before this "
                                                                           "request ran"}}
                    kind = "error"
                elif "error" in r:
                    line = {"id": rid, "custom_id": r.get("custom_id", ""),
                            "response": {"status_code": 400, "request_id": rid,
                                         "body": error_body(r["error"], "invalid_request_error")},
                            "error": None}
                    kind = "error"
                    if stats is not None:
                        stats["failed"] += 1
                else:
                    n_out = len(r.get("token_ids", []))
                    created = int(float(r.get("at") or h["created_at"]))
                    args = (created, model, r.get("text", ""), r.get("finish_reason", ""),
                            int(r.get("prompt_tokens", 0)), n_out)
                    body = chat_completion_body(f"chatcmpl-{rid}", *args) if chat \
                        else completion_body(f"cmpl-{rid}", *args)
                    line = {"id": rid, "custom_id": r.get("custom_id", ""),
                            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}
                    kind = "output"
                    if stats is not None:
                        stats["completed"] += 1
                        stats["in"] += int(r.get("prompt_tokens", 0))
                        stats["out"] += n_out
                if kind in kinds:
                    out[kind].append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            for kind in kinds:
                if out[kind]:
                    yield kind, b"".join(out[kind])
            await asyncio.sleep(0)
