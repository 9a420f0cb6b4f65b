"""Offline batch jobs in Redis: a durable queue (Redis Streams + consumer group) and exactly-once results.

This module owns these keys:

``duopool:job:{job_id}`` (HASH)
    ``job_id``, ``state`` (enqueuing | queued | running | done | cancelled), ``total``, ``done``, ``failed``,
    ``output_tokens``, ``preemptions``, ``created_at``, ``finished_at``, ``last_result_at`` (unix s),
    ``owner`` (the owner tag of the API key that made it; "" when the API is open), and
    for a job enqueued in chunks (``append``) ``enqueued``: how many of its ``total`` requests are in.
``duopool:job:{job_id}:items`` (HASH)  index -> JSON of the request (custom_id, prompt, max_tokens, ...).
``duopool:job:{job_id}:results`` (HASH)  index -> JSON of its result. Written with HSETNX: the first
    result of a request is its only one, however often it ran (a dispatcher that died after computing
    but before acknowledging makes a request run twice; it is answered once).
``duopool:jobs`` (ZSET)  job_id scored by creation time.
``duopool:job:{job_id}:queue`` (STREAM, consumer group ``dispatchers``)
    One entry per request of the job still to run: ``job_id``, ``index``, ``prompt`` (JSON prompt token ids
    once known, for a resumed request), ``generated`` (JSON token ids already produced), ``text`` (their
    text), ``preemptions``. An entry leaves the stream only together with its result (``complete``) or its
    replacement entry (``requeue``), each in one Lua script, so accepted work is never dropped or
    duplicated. Entries of a dispatcher that died stay pending and are claimed by the next one (own pending
    entries on restart; XAUTOCLAIM across dispatchers). One stream per job: cancelling a job deletes its
    stream (O(1) for everyone else: no later job waits behind a cancelled one's entries), and the dispatcher
    can share the workers fairly between the jobs' owners instead of serving one FIFO.
``duopool:offline:active`` (ZSET)  job_id scored by creation time: the jobs whose streams may hold work.
    A job leaves it when it is done or cancelled.

Every multi-key change is one Lua script (atomic); nothing is read-modified-written from two services.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

JOB = "duopool:job:{}"
ITEMS = "duopool:job:{}:items"
RESULTS = "duopool:job:{}:results"
JOBS = "duopool:jobs"
QUEUE = "duopool:job:{}:queue"
ACTIVE = "duopool:offline:active"
LEGACY_QUEUE = "duopool:offline:queue"  # the one shared stream of releases before per-job streams
GROUP = "dispatchers"

log = logging.getLogger("duopool.jobs")

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'total', n, 'done', 0, 'failed', 0,
           'output_tokens', 0, 'preemptions', 0, 'created_at', ARGV[2], 'finished_at', 0, 'last_result_at', 0,
           'owner', ARGV[4])
redis.call('DEL', KEYS[4])
redis.call('XGROUP', 'CREATE', KEYS[4], 'dispatchers', '0', 'MKSTREAM')
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
for i = 1, n do
  redis.call('HSET', KEYS[2], i - 1, ARGV[4 + i])
  redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1], 'index', i - 1, 'prompt', '', 'generated', '[]',
             'text', '', 'preemptions', 0)
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# One chunk of a job too large for one script (a 50,000-line batch file): requests [start, start + n). The
# first chunk creates the job (state enqueuing, its final total known up front); a chunk is taken only at
# the job's cursor (enqueued == start), so a builder that died and one that resumes, or two at once, never
# enqueue a request twice or skip one. The last chunk makes the job queued (running if results came in).
# Returns the new cursor, the current one when start is not it (the caller resumes from there), -2 when the
# job was cancelled meanwhile, -1 when the job exists but was not made by append.
_APPEND = """
local st = redis.call('HGET', KEYS[1], 'state')
local start = tonumber(ARGV[4])
if not st then
  if start ~= 0 then return 0 end
  redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'enqueuing', 'total', ARGV[3], 'enqueued', 0, 'done', 0,
             'failed', 0, 'output_tokens', 0, 'preemptions', 0, 'created_at', ARGV[2], 'finished_at', 0,
             'last_result_at', 0, 'owner', ARGV[6 + tonumber(ARGV[5])])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('DEL', KEYS[4])
  redis.call('XGROUP', 'CREATE', KEYS[4], 'dispatchers', '0', 'MKSTREAM')
  redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
  st = 'enqueuing'
end
if st == 'cancelled' then return -2 end
local have = redis.call('HGET', KEYS[1], 'enqueued')
if not have then return -1 end
have = tonumber(have)
if st ~= 'enqueuing' or have ~= start then return have end
local n = tonumber(ARGV[5])
for i = 1, n do
  redis.call('HSET', KEYS[2], start + i - 1, ARGV[5 + i])
  redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1], 'index', start + i - 1, 'prompt', '', 'generated', '[]',
             'text', '', 'preemptions', 0)
end
have = start + n
redis.call('HSET', KEYS[1], 'enqueued', have)
if have >= tonumber(redis.call('HGET', KEYS[1], 'total')) then
  local h = redis.call('HMGET', KEYS[1], 'done', 'failed')
  if tonumber(h[1]) + tonumber(h[2]) > 0 then redis.call('HSET', KEYS[1], 'state', 'running')
  else redis.call('HSET', KEYS[1], 'state', 'queued') end
end
return have
"""

_COMPLETE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'failed', 1) else redis.call('HINCRBY', KEYS[1], 'done', 1) end
  redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5])
  redis.call('HSET', KEYS[1], 'last_result_at', ARGV[7])
  local h = redis.call('HMGET', KEYS[1], 'done', 'failed', 'total', 'state')
  if tonumber(h[1]) + tonumber(h[2]) >= tonumber(h[3]) and h[4] ~= 'cancelled' then
    redis.call('HSET', KEYS[1], 'state', 'done', 'finished_at', ARGV[7])
    redis.call('DEL', KEYS[3])  -- what is left is a second run of a request already answered
    redis.call('ZREM', KEYS[4], ARGV[8])
    return 1
  elseif h[4] == 'queued' then
    redis.call('HSET', KEYS[1], 'state', 'running')
  end
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
return 1
"""

_REQUEUE = """
if #redis.call('XRANGE', KEYS[3], ARGV[4], ARGV[4]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1], 'index', ARGV[2], 'prompt', ARGV[9],
             'generated', ARGV[5], 'text', ARGV[6], 'preemptions', ARGV[7], 'park', ARGV[10])
  redis.call('HINCRBY', KEYS[1], 'preemptions', ARGV[8])
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
return 1
"""

_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 0 end
if s ~= 'done' and s ~= 'cancelled' then redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1]) end
redis.call('DEL', KEYS[2])  -- its queued entries; a running one's complete / requeue then finds none
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# One entry of the legacy shared stream into its job's stream (the group made if missing).
_MIGRATE = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[2], 'dispatchers', '0', 'MKSTREAM')
  end
  local st = redis.call('HGET', KEYS[4], 'state')
  if st ~= 'done' and st ~= 'cancelled' then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
    redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[4], 'created_at'), redis.call('HGET', KEYS[4], 'job_id'))
  end
end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class QueueEntry:
    entry_id: str
    job_id: str
    index: int
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    preemptions: int = 0
    # How its last preemption left its KV: {"key": pool key, "tokens": n} when parked in kvtransfer's pool
    # (the resume loads it), else {"failure": why it was not} (the resume recomputes); {} if never preempted.
    park: dict = field(default_factory=dict)

    @classmethod
    def from_fields(cls, entry_id: str, f: dict[str, str]) -> QueueEntry:
        try:
            park = json.loads(f.get("park") or "{}")
        except ValueError:
            park = {}
        return cls(entry_id, f["job_id"], int(f["index"]), json.loads(f.get("prompt") or "[]"),
                   json.loads(f.get("generated") or "[]"), f.get("text", ""), int(f.get("preemptions", 0)),
                   park if isinstance(park, dict) else {})


class JobStore:
    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self._submit = r.register_script(_SUBMIT)
        self._complete = r.register_script(_COMPLETE)
        self._requeue = r.register_script(_REQUEUE)
        self._cancel = r.register_script(_CANCEL)
        self._append = r.register_script(_APPEND)
        self._migrate = r.register_script(_MIGRATE)

    async def ensure_group(self) -> None:
        """Moves the entries of the shared stream older releases used into their jobs' own streams (once;
        each entry moves in one script, so a crash midway loses or doubles nothing)."""
        if not await self.r.exists(LEGACY_QUEUE):
            return
        moved, last = 0, "-"
        while batch := await self.r.xrange(LEGACY_QUEUE, min=last, count=500):
            for eid, f in batch:
                if f.get("job_id"):
                    await self._migrate(keys=[LEGACY_QUEUE, QUEUE.format(f["job_id"]), ACTIVE, JOB.format(f["job_id"])],
                                        args=[eid, *[x for kv in f.items() for x in kv]])
                    moved += 1
            last = "(" + batch[-1][0]
        await self.r.delete(LEGACY_QUEUE)
        if moved:
            log.info("moved %d queued request(s) to per-job queues", moved)

    async def submit(self, items: list[dict], job_id: str = "", now: float | None = None,
                     owner: str = "") -> tuple[str, bool]:
        """Enqueues a whole job atomically. Returns (job_id, created); an existing id is returned as is."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time() if now is None else now
        created = await self._submit(
            keys=[JOB.format(job_id), ITEMS.format(job_id), JOBS, QUEUE.format(job_id), ACTIVE],
            args=[job_id, now, len(items), owner, *[json.dumps(i, separators=(",", ":")) for i in items]],
        )
        if created:
            from duopool.common.metrics import JOBS as JOBS_MADE

            JOBS_MADE.inc()
        return job_id, bool(created)

    async def append(self, job_id: str, start: int, total: int, items: list[dict], now: float | None = None,
                     owner: str = "") -> int:
        """Enqueues ``items`` as requests ``start..`` of a job of ``total`` (made by the first chunk). Returns
        the job's new cursor; a cursor other than ``start + len(items)`` means the chunk was not taken
        (another builder is ahead: resume from the returned cursor); -2: the job was cancelled."""
        cursor = int(await self._append(
            keys=[JOB.format(job_id), ITEMS.format(job_id), JOBS, QUEUE.format(job_id), ACTIVE],
            args=[job_id, time.time() if now is None else now, total, start, len(items),
                  *[json.dumps(i, separators=(",", ":")) for i in items], owner]))
        if start == 0 and cursor == len(items):  # this chunk made the job
            from duopool.common.metrics import JOBS as JOBS_MADE

            JOBS_MADE.inc()
        return cursor

    async def results_of(self, job_id: str, indices: list[int]) -> list[dict | None]:
        """The results of these requests (None where none is recorded yet), in order."""
        if not indices:
            return []
        raw = await self.r.hmget(RESULTS.format(job_id), [str(i) for i in indices])
        return [json.loads(v) if v else None for v in raw]

    async def items_of(self, job_id: str, indices: list[int]) -> list[dict | None]:
        if not indices:
            return []
        raw = await self.r.hmget(ITEMS.format(job_id), [str(i) for i in indices])
        return [json.loads(v) if v else None for v in raw]

    async def status(self, job_id: str) -> dict | None:
        h = await self.r.hgetall(JOB.format(job_id))
        return h or None

    async def item(self, job_id: str, index: int) -> dict | None:
        raw = await self.r.hget(ITEMS.format(job_id), str(index))
        return json.loads(raw) if raw else None

    async def results(self, job_id: str) -> list[tuple[int, dict]]:
        h = await self.r.hgetall(RESULTS.format(job_id))
        return sorted((int(k), json.loads(v)) for k, v in h.items())

    async def cancel(self, job_id: str, now: float | None = None) -> bool:
        return bool(await self._cancel(keys=[JOB.format(job_id), QUEUE.format(job_id), ACTIVE],
                                       args=[time.time() if now is None else now, job_id]))

    async def complete(self, entry: QueueEntry, result: dict, output_tokens: int, failed: bool,
                       now: float | None = None) -> None:
        await self._complete(
            keys=[JOB.format(entry.job_id), RESULTS.format(entry.job_id), QUEUE.format(entry.job_id), ACTIVE],
            args=[entry.index, json.dumps(result, separators=(",", ":")), GROUP, entry.entry_id, output_tokens,
                  "1" if failed else "0", time.time() if now is None else now, entry.job_id],
        )

    async def requeue(self, entry: QueueEntry, prompt: list[int], generated: list[int], text: str,
                      preempted: bool, park: dict | None = None) -> None:
        """Replaces an entry with one that resumes from ``generated`` (after a preemption or a failure), with
        ``park`` (see ``QueueEntry.park``)."""
        await self._requeue(
            keys=[JOB.format(entry.job_id), RESULTS.format(entry.job_id), QUEUE.format(entry.job_id)],
            args=[entry.job_id, entry.index, GROUP, entry.entry_id, json.dumps(generated), text,
                  entry.preemptions + int(preempted), int(preempted), json.dumps(prompt) if prompt else "",
                  json.dumps(park) if park else ""],
        )

    async def drop(self, entry: QueueEntry) -> None:
        """Removes an entry of a cancelled or vanished job."""
        q = QUEUE.format(entry.job_id)
        async with self.r.pipeline(transaction=True) as p:
            p.xack(q, GROUP, entry.entry_id)
            p.xdel(q, entry.entry_id)
            await p.execute()

    async def active_jobs(self, limit: int = 10_000) -> list[tuple[str, str, str]]:
        """(job_id, owner, state) of the jobs that may have queued work, oldest first."""
        ids = await self.r.zrange(ACTIVE, 0, limit - 1)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as p:
            for j in ids:
                p.hmget(JOB.format(j), "owner", "state")
            rows = await p.execute()
        return [(j, owner or "", state or "") for j, (owner, state) in zip(ids, rows, strict=True)]

    async def retire(self, job_id: str) -> None:
        """Takes a finished, cancelled or vanished job out of the active set (its stream with it)."""
        async with self.r.pipeline(transaction=True) as p:
            p.zrem(ACTIVE, job_id)
            p.delete(QUEUE.format(job_id))
            await p.execute()

    async def read(self, consumer: str, job_ids: list[str], count: int,
                   pending: bool = False) -> dict[str, list[QueueEntry]]:
        """Up to ``count`` new entries of each of these jobs for this consumer (with ``pending``: those it already
        holds from before a restart). Never blocks. A job whose stream is gone is left out."""
        if not job_ids:
            return {}
        since = "0" if pending else ">"
        try:
            resp = await self.r.xreadgroup(GROUP, consumer, {QUEUE.format(j): since for j in job_ids}, count=count)
        except ResponseError as exc:  # one stream deleted (job cancelled / done) meanwhile: read one by one
            if "NOGROUP" not in str(exc):
                raise
            resp = []
            for j in job_ids:
                try:
                    resp += await self.r.xreadgroup(GROUP, consumer, {QUEUE.format(j): since}, count=count) or []
                except ResponseError as one:
                    if "NOGROUP" not in str(one):
                        raise
        out: dict[str, list[QueueEntry]] = {}
        for _, entries in resp or []:
            for eid, f in entries:
                if f:
                    e = QueueEntry.from_fields(eid, f)
                    out.setdefault(e.job_id, []).append(e)
        return out

    async def claim_stale(self, consumer: str, job_ids: list[str], min_idle_ms: int,
                          count: int) -> dict[str, list[QueueEntry]]:
        """Entries of these jobs pending at other (dead) consumers for longer than ``min_idle_ms``."""
        out: dict[str, list[QueueEntry]] = {}
        for j in job_ids:
            try:
                resp = await self.r.xautoclaim(QUEUE.format(j), GROUP, consumer, min_idle_time=min_idle_ms,
                                               start_id="0-0", count=count)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue
            got = [QueueEntry.from_fields(eid, f) for eid, f in resp[1] if f]
            if got:
                out[j] = got
        return out


def job_item(custom_id: str, msg) -> dict:
    """A queued request from a ``BatchItem`` or ``GenerateRequest`` (both carry the prompt oneof, ``max_tokens``,
    ``sampling``, ``chat``): what the dispatcher runs."""
    s = msg.sampling
    item = {"custom_id": custom_id, "max_tokens": msg.max_tokens, "chat": msg.chat,
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "stop": list(s.stop)}}
    if s.HasField("seed"):
        item["sampling"]["seed"] = s.seed
    if s.ignore_eos:
        item["sampling"]["ignore_eos"] = True
    which = msg.WhichOneof("prompt")
    if which == "token_ids":
        item["token_ids"] = list(msg.token_ids.ids)
    elif which == "messages":
        item["messages"] = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    else:
        item["text"] = msg.text
    if getattr(msg, "fit_max_tokens", False):
        item["fit"] = True
    return item
