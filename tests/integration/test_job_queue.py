"""The per-job queues in real Redis: cancel deletes a job's queue at once, a finished job leaves the active set,
and entries of the single shared stream older releases used move into their jobs' queues exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from duopool.common.jobs import ACTIVE, GROUP, LEGACY_QUEUE, QUEUE, JobStore

pytestmark = pytest.mark.integration


def run(coro):
    return asyncio.run(coro)


async def _store(redis_server, db: int) -> JobStore:
    r = aioredis.Redis.from_url(redis_server.url.replace("/0", f"/{db}"), decode_responses=True)
    await r.flushdb()
    return JobStore(r)


def test_cancel_deletes_the_queue_and_done_leaves_the_active_set(redis_server):
    async def go():
        s = await _store(redis_server, 11)
        items = [{"custom_id": f"c{i}", "max_tokens": 1, "text": "x"} for i in range(3)]
        await s.submit(items, job_id="keep", owner="a")
        await s.submit(items, job_id="drop", owner="b")
        assert [j for j, _, _ in await s.active_jobs()] == ["keep", "drop"]
        assert await s.r.xlen(QUEUE.format("drop")) == 3
        await s.cancel("drop")
        assert not await s.r.exists(QUEUE.format("drop"))
        assert [(j, o, st) for j, o, st in await s.active_jobs()] == [("keep", "a", "queued")]
        got = await s.read("c1", ["keep", "drop"], count=10)  # a deleted queue is skipped, not an error
        assert [e.index for e in got["keep"]] == [0, 1, 2] and "drop" not in got
        for e in got["keep"]:
            await s.complete(e, {"custom_id": f"c{e.index}"}, output_tokens=1, failed=False)
        assert (await s.status("keep"))["state"] == "done"
        assert await s.active_jobs() == [] and not await s.r.exists(QUEUE.format("keep"))
        await s.r.aclose()
    run(go())


def test_legacy_shared_stream_moves_into_job_queues_once(redis_server):
    async def go():
        s = await _store(redis_server, 12)
        r = s.r
        await r.hset("duopool:job:old", mapping={"job_id": "old", "state": "running", "total": 2, "done": 0,
                                                  "failed": 0, "created_at": 5, "owner": ""})
        await r.hset("duopool:job:gone", mapping={"job_id": "gone", "state": "cancelled", "created_at": 6})
        await r.xgroup_create(LEGACY_QUEUE, GROUP, id="0", mkstream=True)
        for job, i in (("old", 0), ("gone", 0), ("old", 1)):
            await r.xadd(LEGACY_QUEUE, {"job_id": job, "index": i, "prompt": "", "generated": "[1]", "text": "t",
                                        "preemptions": 2})
        await s.ensure_group()
        await s.ensure_group()  # idempotent
        assert not await r.exists(LEGACY_QUEUE)
        assert await r.zrange(ACTIVE, 0, -1) == ["old"]
        got = (await s.read("c", ["old", "gone"], count=10))["old"]
        assert [(e.index, e.generated, e.text, e.preemptions) for e in got] == [(0, [1], "t", 2), (1, [1], "t", 2)]
        await r.aclose()
    run(go())
