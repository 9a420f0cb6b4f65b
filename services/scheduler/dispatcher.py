"""The offline dispatcher: feeds queued batch requests to workers whenever they have offline capacity.

Runs inside the scheduler service (it shares the scheduler's placement and in-flight accounting, which is
what lets an online request preempt offline work at once). Its loop is receive → schedule → execute →
update: read queue entries (its own pending ones first after a restart), place each on a worker with
offline capacity (``duopool.core.colocation``), run prefill → KV → decode on the workers, and record the
result — or, if the request was preempted or its worker died, re-queue it with the tokens it already
produced so it resumes where it stopped (greedy decoding then yields exactly the uninterrupted output).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from redis.exceptions import RedisError

from duopool.common.jobs import JOB, JobStore, QueueEntry
from duopool.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("duopool.dispatcher")

REQUEUE_BACKOFF_S = 0.2
JOB_STATE_TTL_S = 1.0  # how stale a job's state may be when deciding to drop its entries (cancel latency)
DRAIN_READ = 1000  # entries read at once while a cancelled job's entries are being dropped
STORE_RETRY_S = 120.0  # how long a finished request's queue update is retried while Redis is unreachable


class OfflineDispatcher:
    def __init__(self, service, store: JobStore, consumer: str, idle_claim_ms: int = 300_000) -> None:
        self.service = service  # SchedulerService: placement, in-flight accounting, worker channels
        self.store = store
        self.consumer = consumer
        self.idle_claim_ms = idle_claim_ms
        self.backlog: list[QueueEntry] = []  # read but not yet placed (still pending at this consumer)
        self.running: dict[str, asyncio.Task] = {}  # entry id -> task
        self.completed = 0
        self.requeued = 0
        self.dropped = 0  # entries of cancelled jobs removed unrun
        self._job_state: dict[str, tuple[float, str]] = {}  # job id -> (monotonic time read, state)

    async def run(self, stop: asyncio.Event) -> None:
        await self.store.ensure_group()
        # Entries this consumer held before a restart: run them again (results are exactly-once).
        self.backlog = await self.store.read(self.consumer, count=100_000, block_ms=0, pending=True)
        if self.backlog:
            log.info("resuming %d offline request(s) pending from before a restart", len(self.backlog))
        claim_tick = 0
        while not stop.is_set():
            try:
                await self._step(claim_tick % 100 == 0)
            except Exception:  # noqa: BLE001 - Redis blips must not kill the loop
                log.exception("dispatcher step failed")
                await asyncio.sleep(1.0)
            claim_tick += 1
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _step(self, claim: bool) -> None:
        free = await self.service.offline_free_slots()
        if free <= 0:
            await asyncio.sleep(0.05)
            return
        if not self.backlog:
            if claim:
                stale = await self.store.claim_stale(self.consumer, self.idle_claim_ms, count=free)
                self.backlog = [e for e in stale if e.entry_id not in self.running]
            if not self.backlog:
                # After dropping a cancelled job's entries, read in bulk: a cancelled 50,000-request job
                # must not hold later jobs back while its entries drain a few at a time.
                count = max(free, DRAIN_READ) if self._draining else free
                self.backlog = await self.store.read(self.consumer, count=count, block_ms=200)
        if await self._drop_cancelled():
            return
        started = 0
        while self.backlog and started < free:
            entry = self.backlog[0]
            placement = await self.service.place_offline(self._rid(entry))
            if placement is None:
                break  # no worker has room right now
            self.backlog.pop(0)
            started += 1
            self.running[entry.entry_id] = asyncio.create_task(self._execute(entry, placement))
        if not started:
            await asyncio.sleep(0.05)

    _draining = False

    async def _job_states(self, job_ids: set[str]) -> dict[str, str]:
        now = asyncio.get_running_loop().time()
        stale = [j for j in job_ids if now - self._job_state.get(j, (-1e9, ""))[0] > JOB_STATE_TTL_S]
        if stale:
            async with self.store.r.pipeline(transaction=False) as p:
                for j in stale:
                    p.hget(JOB.format(j), "state")
                states = await p.execute()
            for j, st in zip(stale, states, strict=True):
                self._job_state[j] = (now, st or "")
            if len(self._job_state) > 10_000:
                self._job_state.clear()
        return {j: self._job_state.get(j, (0.0, ""))[1] for j in job_ids}

    async def _drop_cancelled(self) -> bool:
        """Removes backlog entries of cancelled (or vanished) jobs without running them. True if any went."""
        if not self.backlog:
            self._draining = False
            return False
        states = await self._job_states({e.job_id for e in self.backlog})
        dead = [e for e in self.backlog if states.get(e.job_id) in ("cancelled", "")]
        self._draining = bool(dead)
        if not dead:
            return False
        await self.store.drop_many(dead)
        self.dropped += len(dead)
        gone = {e.entry_id for e in dead}
        self.backlog = [e for e in self.backlog if e.entry_id not in gone]
        return True

    @staticmethod
    def _rid(entry: QueueEntry) -> str:
        return f"{entry.job_id}-{entry.index}-{entry.preemptions}-{uuid.uuid4().hex[:6]}"

    async def _execute(self, entry: QueueEntry, placement) -> None:
        rid, prefill_w, decode_w = placement
        try:
            await self._run_request(entry, rid, prefill_w, decode_w)
        except Exception:  # noqa: BLE001
            log.exception("offline request %s/%d failed unexpectedly; re-queued", entry.job_id, entry.index)
            await self._durably("requeue", entry, lambda: self.store.requeue(
                entry, entry.prompt, entry.generated, entry.text, preempted=False))
        finally:
            self.service.release(rid)
            self.running.pop(entry.entry_id, None)

    async def _run_request(self, entry: QueueEntry, rid: str, prefill_w, decode_w) -> None:
        job = await self.store.status(entry.job_id)
        item = await self.store.item(entry.job_id, entry.index)
        if job is None or item is None or job.get("state") == "cancelled":
            await self.store.drop(entry)
            return
        generated, text = list(entry.generated), entry.text
        remaining = int(item["max_tokens"]) - len(generated)
        sampling = common_pb2.SamplingParams(**item.get("sampling", {}))
        pre_req = worker_pb2.PrefillRequest(
            request_id=rid, max_tokens=remaining, sampling=sampling, request_class=common_pb2.OFFLINE,
            export_kv=remaining > 1, decode_worker=decode_w.worker_id, decode_host=decode_w.host,
            fit_max_tokens=bool(item.get("fit")),  # max_tokens is a bound: what the context leaves
        )
        if entry.prompt:  # resumed: the prompt's ids plus what it produced before
            pre_req.token_ids.ids.extend(entry.prompt + generated)
        elif "token_ids" in item:
            pre_req.token_ids.ids.extend(item["token_ids"])
        elif "messages" in item:
            pre_req.messages.messages.extend(common_pb2.ChatMessage(**m) for m in item["messages"])
        else:
            pre_req.text, pre_req.chat = item["text"], bool(item.get("chat"))
        prompt = list(entry.prompt)
        try:
            pre = await self._worker(prefill_w).Prefill(pre_req, timeout=600)
            prompt = prompt or list(pre.prompt_token_ids)
            if pre_req.fit_max_tokens and pre.max_tokens:
                remaining = pre.max_tokens
            generated.append(pre.first_token_id)
            text += pre.first_token_text
            finish = pre.finish_reason
            if not pre.finished and self.service.offline_must_yield(decode_w.worker_id):
                # Online work landed on the decode worker while this request was prefilling: step back
                # before decoding (the worker could not preempt what it was not yet running).
                await self._abandon(prefill_w, rid, pre.kv if pre.HasField("kv") else None)
                await self._requeue(entry, prompt, generated, text, preempted=True)
                return
            if not pre.finished:
                dreq = worker_pb2.DecodeRequest(
                    request_id=rid, prompt_token_ids=prompt, generated_token_ids=generated,
                    max_tokens=remaining - 1, sampling=sampling, request_class=common_pb2.OFFLINE)
                if pre.HasField("kv"):
                    dreq.kv.CopyFrom(pre.kv)
                async for d in self._worker(decode_w).Decode(dreq, timeout=3600):
                    generated.extend(d.token_ids)
                    text += d.text
                    if d.finished:
                        finish = d.finish_reason
                if finish == "preempted":
                    await self._requeue(entry, prompt, generated, text, preempted=True)
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                error = {"custom_id": item["custom_id"], "error": exc.details(), "at": time.time()}
                await self._durably("complete", entry, lambda: self.store.complete(entry, error, 0, failed=True))
                return
            preempted = exc.code() == grpc.StatusCode.ABORTED
            if not preempted:
                log.warning("offline request %s/%d: %s on %s; re-queued", entry.job_id, entry.index,
                            exc.code().name, prefill_w.worker_id)
                await asyncio.sleep(REQUEUE_BACKOFF_S)
            await self._requeue(entry, prompt, generated, text, preempted=preempted)
            return
        self.completed += 1
        result = {
            "custom_id": item["custom_id"], "text": text, "token_ids": generated, "finish_reason": finish,
            "prefill_worker": prefill_w.worker_id, "decode_worker": decode_w.worker_id,
            "preemptions": entry.preemptions, "prompt_tokens": len(prompt), "at": time.time(),
        }
        await self._durably("complete", entry, lambda: self.store.complete(
            entry, result, output_tokens=len(generated), failed=False))

    async def _requeue(self, entry, prompt, generated, text, preempted: bool) -> None:
        self.requeued += 1
        await self._durably("requeue", entry, lambda: self.store.requeue(
            entry, prompt if generated else entry.prompt, generated, text, preempted))

    async def _durably(self, what: str, entry: QueueEntry, op) -> None:
        """Runs a queue update (one Lua script, idempotent: a complete records a result once, a requeue of an
        entry already replaced is a no-op) until Redis takes it, so a Redis restart mid-request neither loses
        the work done nor runs the request again. After ``STORE_RETRY_S`` it gives up: the entry stays
        pending at this consumer and runs again after a restart or a stale claim."""
        delay, deadline = 0.1, asyncio.get_running_loop().time() + STORE_RETRY_S
        while True:
            try:
                await op()
                return
            except (RedisError, OSError) as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    log.error("offline request %s/%d: %s not recorded (%s); left pending", entry.job_id,
                              entry.index, what, exc)
                    return
                log.warning("offline request %s/%d: %s failed (%s); retrying", entry.job_id, entry.index, what,
                            exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _abandon(self, prefill_w, rid: str, kv) -> None:
        """Frees the KV a prefill exported for a decode that will not happen (else its lease frees it)."""
        try:
            await self._worker(prefill_w).Abort(worker_pb2.AbortRequest(request_id=rid, kv=kv), timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("releasing the KV of %s on %s failed: %s", rid, prefill_w.worker_id, exc.code().name)

    def _worker(self, w) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.service.channels.get(w.address))
