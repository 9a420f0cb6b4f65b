"""The worker registry in Redis. This module owns these keys:

``duopool:worker:{worker_id}`` (HASH, expires ``ttl`` seconds after the last heartbeat)
    Observed state, written only by the worker itself: ``worker_id``, ``address``, ``role``, ``pool``,
    ``engine``, ``model``, ``max_model_len``, ``block_size``, ``host``, ``running``, ``waiting``,
    ``kv_usage``, ``last_heartbeat`` (unix seconds).
``duopool:workers`` (ZSET, member worker_id, score = last heartbeat unix seconds)
    Index of workers. Workers ZADD themselves on each heartbeat and ZREM on clean shutdown; the
    scheduler drops members whose score is older than the TTL (ZREMRANGEBYSCORE, one atomic command).

``duopool:worker:{worker_id}:desired`` (HASH, no expiry)
    Desired state, written only by the scheduler: ``role``, ``pool``, ``reason``, ``updated_at``. Kept apart
    from the observed hash above; the scheduler reconciles the worker towards it (``Worker.SetRole``).

A heartbeat is one MULTI/EXEC transaction (HSET + EXPIRE + ZADD), so a reader never sees a worker in the
index without its hash, except after expiry, which readers treat as dead. No key is read-modified-written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

WORKER_KEY = "duopool:worker:{}"
WORKERS_INDEX = "duopool:workers"
DESIRED_KEY = "duopool:worker:{}:desired"


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    address: str
    role: str
    pool: str
    engine: str
    model: str
    max_model_len: int
    block_size: int
    host: str
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    last_heartbeat: float = 0.0
    steps: int = -1  # engine steps run (the decision core advances its decode batches by them)
    step_ms: float = 0.0  # the engine's last step
    kv_capacity: int = 0  # KV tokens the engine holds (0: not reported)
    step_plans: str = ""  # the scheduling policy whose step plans form the engine's steps ("" none)
    preempted: int = 0  # offline requests the engine's own step plans stopped since it started
    offline_only: bool = False  # set by the scheduler's layout: the policy's isolated offline share

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> WorkerRecord:
        return cls(
            worker_id=h["worker_id"], address=h["address"], role=h["role"], pool=h["pool"],
            engine=h["engine"], model=h["model"], max_model_len=int(h["max_model_len"]),
            block_size=int(h["block_size"]), host=h["host"], running=int(h.get("running", 0)),
            waiting=int(h.get("waiting", 0)), kv_usage=float(h.get("kv_usage", 0.0)),
            last_heartbeat=float(h.get("last_heartbeat", 0.0)), steps=int(h.get("steps", -1)),
            step_ms=float(h.get("step_ms", 0.0)), kv_capacity=int(h.get("kv_capacity", 0)),
            step_plans=h.get("step_plans", ""), preempted=int(h.get("preempted", 0)),
            offline_only=h.get("offline_only", "False") == "True",
        )


REDIS_MAX_CONNECTIONS = 256  # per process: callers beyond it wait for a free connection
REDIS_POOL_WAIT_S = 10.0  # ... this long at most, then the call fails (ConnectionError) like an outage


def connect(url: str) -> aioredis.Redis:
    """A client whose pool makes a burst of callers wait for a connection (a blocking pool): redis-py's
    default pool raises once 100 are in use, which a scheduler re-queuing a burst of preempted offline
    requests reached (measured: "Too many connections" in a 300 s replay, failing a GetBatch)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_S, decode_responses=True,
        socket_connect_timeout=3, health_check_interval=10)
    return aioredis.Redis.from_pool(pool)


async def heartbeat(r: aioredis.Redis, record: WorkerRecord, ttl_s: float) -> None:
    key = WORKER_KEY.format(record.worker_id)
    async with r.pipeline(transaction=True) as p:
        p.hset(key, mapping=record.to_hash())
        p.pexpire(key, int(ttl_s * 1000))
        p.zadd(WORKERS_INDEX, {record.worker_id: record.last_heartbeat})
        await p.execute()


async def deregister(r: aioredis.Redis, worker_id: str) -> None:
    async with r.pipeline(transaction=True) as p:
        p.delete(WORKER_KEY.format(worker_id))
        p.zrem(WORKERS_INDEX, worker_id)
        await p.execute()


async def live_workers(r: aioredis.Redis, ttl_s: float, now: float | None = None) -> list[WorkerRecord]:
    """Workers whose last heartbeat is within ``ttl_s``; prunes long-dead index members."""
    now = time.time() if now is None else now
    await r.zremrangebyscore(WORKERS_INDEX, "-inf", now - 10 * ttl_s)
    ids = await r.zrangebyscore(WORKERS_INDEX, now - ttl_s, "+inf")
    if not ids:
        return []
    async with r.pipeline(transaction=False) as p:
        for wid in ids:
            p.hgetall(WORKER_KEY.format(wid))
        hashes = await p.execute()
    return sorted((WorkerRecord.from_hash(h) for h in hashes if h), key=lambda w: w.worker_id)


async def set_desired(r: aioredis.Redis, worker_id: str, role: str, pool: str, reason: str, now: float) -> None:
    await r.hset(DESIRED_KEY.format(worker_id), mapping={"role": role, "pool": pool, "reason": reason,
                                                          "updated_at": str(now)})


async def desired_states(r: aioredis.Redis, worker_ids: list[str]) -> dict[str, dict[str, str]]:
    async with r.pipeline(transaction=False) as p:
        for wid in worker_ids:
            p.hgetall(DESIRED_KEY.format(wid))
        found = await p.execute()
    return {wid: h for wid, h in zip(worker_ids, found, strict=True) if h}
