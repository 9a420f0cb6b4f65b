"""The offline dispatcher: feeds queued batch requests to workers whenever they have offline capacity.

Runs inside the scheduler service (it shares the scheduler's placement and in-flight accounting, which is
what lets an online request preempt offline work at once). Its loop is receive → schedule → execute →
update: read queue entries (its own pending ones first after a restart), place each on a worker with
offline capacity (``duopool.core.colocation``), run prefill → KV → decode on the workers, and record the
result — or, if the request was preempted or its worker died, re-queue it with the tokens it already
produced so it resumes where it stopped (greedy decoding then yields exactly the uninterrupted output).

Each job has its own queue (``duopool.common.jobs``); the dispatcher shares the offline capacity between the
owners (API keys) of the active jobs in turn, one request each, and runs one owner's jobs oldest first
(``FairQueue``). A cancelled job's queue is deleted by the cancel itself, so nothing waits behind it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections import deque

import grpc
from redis.exceptions import RedisError

from duopool.common import metrics
from duopool.common.jobs import JobStore, QueueEntry
from duopool.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("duopool.dispatcher")

REQUEUE_BACKOFF_S = 0.2
ACTIVE_REFRESH_S = 0.5  # how often the list of active jobs (and their owners, states) is re-read while busy
IDLE_REFRESH_S = 0.1  # ... and while nothing is buffered (how soon a new job's first request starts)
MAX_READ = 64  # entries read per job at once
READ_ROUNDS = 8  # jobs of one owner read in one dispatcher step, at most (while the older ones fall short)
# --parked-resumes auto: the policies whose parked decodes go to a pulling instance. Measured (60 s, 8 simulated
# workers): online-priority gains (300 s: 0.76 -> 0.86 of the simulator); ooco loses (its strict pullers run
# SLO margins on the brain's inexact mirror: 95-97% SLO / 9.8-10.7k tok/s against 98.4% / 11.5k admitted)
PULL_PARKED_POLICIES = ("online-priority",)
ITEMS_KEPT = 256  # items kept between the size read and the run (see OfflineDispatcher._items)
RESUME_TRIES = 16  # parked decodes set aside per dispatcher step (each offer asks the step plans)
MAX_HANDOFFS = 8  # moves of one request handed over directly in one run (beyond: re-queued)
STORE_RETRY_S = 120.0  # how long a finished request's queue update is retried while Redis is unreachable


class FairQueue:
    """Offline entries read but not yet placed, one FIFO per job. ``peek`` serves the owners (API keys) of the
    active jobs in turn, one request each, and within one owner its oldest job first: a key with a 50,000-request
    job does not hold back another key's ten requests, and one key's jobs run in the order it made them. Pure
    (no I/O): the dispatcher feeds it."""

    def __init__(self) -> None:
        self.order: list[tuple[str, str]] = []  # (job_id, owner) of the active jobs, oldest first
        self.owner_of: dict[str, str] = {}
        self.owners: list[str] = []  # owners in the order of their oldest active job
        self.buf: dict[str, deque[QueueEntry]] = {}
        self.ids: set[str] = set()  # entry ids buffered
        self.last_owner: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def set_jobs(self, jobs: list[tuple[str, str]]) -> list[QueueEntry]:
        """The active jobs now, oldest first. Returns the buffered entries of jobs no longer active."""
        self.order = list(jobs)
        self.owner_of = dict(jobs)
        self.owners = list(dict.fromkeys(o for _, o in jobs))
        gone = [e for j in [j for j in self.buf if j not in self.owner_of] for e in self.buf.pop(j)]
        self.ids.difference_update(e.entry_id for e in gone)
        return gone

    def add(self, entries: list[QueueEntry]) -> int:
        """Buffers entries (an entry already buffered is ignored). Returns how many were new."""
        new = 0
        for e in entries:
            if e.entry_id in self.ids:
                continue
            if e.job_id not in self.owner_of:  # not (yet) listed active: served last, as its own owner
                self.order.append((e.job_id, ""))
                self.owner_of[e.job_id] = ""
                if "" not in self.owners:
                    self.owners.append("")
            self.buf.setdefault(e.job_id, deque()).append(e)
            self.ids.add(e.entry_id)
            new += 1
        return new

    def buffered(self, job_id: str) -> int:
        return len(self.buf.get(job_id, ()))

    def peek(self) -> QueueEntry | None:
        """The entry to place next, or None."""
        first: dict[str, str] = {}  # owner -> its oldest job with a buffered entry
        for j, o in self.order:
            if o not in first and self.buf.get(j):
                first[o] = j
        if not first:
            return None
        start = self.owners.index(self.last_owner) + 1 if self.last_owner in self.owners else 0
        for k in range(len(self.owners)):
            o = self.owners[(start + k) % len(self.owners)]
            if o in first:
                return self.buf[first[o]][0]
        return None

    def take(self, entry: QueueEntry) -> None:
        """Removes ``entry`` (the one ``peek`` gave) and passes the turn to the next owner."""
        q = self.buf.get(entry.job_id)
        if q and q[0].entry_id == entry.entry_id:
            q.popleft()
        elif q:
            q.remove(entry)
        if q is not None and not q:
            del self.buf[entry.job_id]
        self.ids.discard(entry.entry_id)
        self.last_owner = self.owner_of.get(entry.job_id, "")

    def drop_job(self, job_id: str) -> list[QueueEntry]:
        gone = list(self.buf.pop(job_id, ()))
        self.ids.difference_update(e.entry_id for e in gone)
        return gone

    def to_read(self, target: int, dry: set[str]) -> list[str]:
        """Jobs to read up to ``target`` more entries from: per owner, its oldest jobs until the owner would hold
        ``target`` buffered (a younger job is read once the older ones run dry)."""
        held: dict[str, int] = {}
        for j, _ in self.order:
            held[self.owner_of[j]] = held.get(self.owner_of[j], 0) + self.buffered(j)
        want = []
        for j, o in self.order:
            if j in dry or held[o] >= target:
                continue
            want.append(j)
            held[o] += target
        return want


class OfflineDispatcher:
    def __init__(self, service, store: JobStore, consumer: str, idle_claim_ms: int = 300_000) -> None:
        self.service = service  # SchedulerService: placement, in-flight accounting, worker channels
        self.store = store
        self.consumer = consumer
        self.idle_claim_ms = idle_claim_ms
        self.fair = FairQueue()  # read but not yet placed (still pending at this consumer)
        # preempted decodes with parked KV that no instance's plan pulled yet: kept aside (still pending at
        # this consumer) so they do not hold back new work behind them, offered again each step, oldest first
        self.resumes: collections.OrderedDict[str, QueueEntry] = collections.OrderedDict()  # by entry id
        self.running: dict[str, asyncio.Task] = {}  # entry id -> task
        self.completed = 0
        self.requeued = 0
        self.tokens = 0  # offline tokens received from the engines (as generated, finished or not)
        self.resumed_parked = 0  # preempted requests resumed from their parked KV
        self.resumed_recomputed: collections.Counter[str] = collections.Counter()  # ... recomputing, by reason
        self.tokens_not_recomputed = 0  # context tokens the parked resumes loaded instead of computing
        self.dropped = 0  # entries of cancelled jobs removed unrun
        self.moved = 0  # preempted requests handed straight to the worker that pulled them (OOCO's move)
        self.dry: set[str] = set()  # jobs whose queues had nothing new at the last read
        self.sizes: dict[str, tuple[int, int]] = {}  # entry id -> its size for the decision core (read once)
        # entry id -> the item its size was read from, for the run that follows its placement (an item holds
        # the whole prompt: decoding it twice cost the scheduler ~4% of its CPU); the latest ITEMS_KEPT only
        self._items: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._refreshed = -1e9

    async def run(self, stop: asyncio.Event) -> None:
        await self.store.ensure_group()
        await self._refresh()
        # Entries this consumer held before a restart: run them again (results are exactly-once).
        pending = await self.store.read(self.consumer, [j for j, _ in self.fair.order], count=100_000, pending=True)
        n = self.fair.add([e for es in pending.values() for e in es])
        if n:
            log.info("resuming %d offline request(s) pending from before a restart", n)
        tick = 0
        while not stop.is_set():
            try:
                await self._step(tick % 100 == 0)
            except Exception:  # noqa: BLE001 - Redis blips must not kill the loop
                log.exception("dispatcher step failed")
                await asyncio.sleep(1.0)
            tick += 1
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _step(self, claim: bool) -> None:
        free = await self.service.offline_free_slots()
        if free <= 0:
            await asyncio.sleep(0.05)
            return
        now = asyncio.get_running_loop().time()
        if now - self._refreshed >= (ACTIVE_REFRESH_S if len(self.fair) else IDLE_REFRESH_S):
            await self._refresh()
        active = [j for j, _ in self.fair.order]
        if claim and active:
            stale = await self.store.claim_stale(self.consumer, active, self.idle_claim_ms, count=free)
            self.fair.add([e for es in stale.values() for e in es if self._unseen(e)])
        owners = max(1, len(self.fair.owners))
        target = min(MAX_READ, max(1, -(-free // owners)))
        # An owner's oldest job is read first; one that gives fewer entries than asked (its last few, or the
        # re-queued ones trickling back) lets the owner's next job be read in the same step. (Reading only the
        # oldest job while it was not dry starved the backlog: with preemptions re-queuing into it now and
        # then, its younger jobs were never read — the cluster ran a handful of requests.)
        want = self.fair.to_read(target, self.dry)
        short: set[str] = set()
        for _ in range(READ_ROUNDS):
            if not want:
                break
            got = await self.store.read(self.consumer, want, count=target)
            self.dry.update(j for j in want if j not in got)
            short.update(j for j in want if len(got.get(j, ())) < target)
            self.fair.add([e for es in got.values() for e in es if self._unseen(e)])
            want = self.fair.to_read(target, self.dry | short)
        started = 0
        # parked decodes first, oldest first, until one is not pulled (the simulator's instances pull their
        # swapped decodes in that order and stop at the first that does not fit)
        while self.resumes and started < free:
            entry = next(iter(self.resumes.values()))
            placement = await self._place(entry)
            if placement is None:
                break
            del self.resumes[entry.entry_id]
            started += self._start(entry, placement)
        set_aside = 0
        while started < free and (entry := self.fair.peek()) is not None:
            placement = await self._place(entry)
            if placement is None:
                if self._pulled(entry) and set_aside < RESUME_TRIES:
                    # a parked decode waits for an instance's plan to pull it; new work behind it goes on
                    self.fair.take(entry)
                    self.resumes[entry.entry_id] = entry
                    set_aside += 1
                    continue
                break  # no worker has room right now
            self.fair.take(entry)
            started += self._start(entry, placement)
        metrics.OFFLINE_RUNNING.set(len(self.running))
        metrics.OFFLINE_BUFFERED.set(len(self.fair) + len(self.resumes))
        if not started:
            await asyncio.sleep(0.05)

    def _unseen(self, e: QueueEntry) -> bool:
        """An entry read from the queue that this dispatcher does not hold already (running or set aside)."""
        return e.entry_id not in self.running and e.entry_id not in self.resumes

    @staticmethod
    def _parked(entry: QueueEntry) -> bool:
        """A preempted decode whose KV waits in kvtransfer's pool (its resume computes only the tail)."""
        return bool(entry.park.get("key")) and bool(entry.prompt) and bool(entry.generated)

    def _pulled(self, entry: QueueEntry) -> bool:
        """A parked decode that resumes where a step plan pulls it (``--parked-resumes pull``, the decision
        core's policies)."""
        if not self._parked(entry) or getattr(self.service, "driver", None) is None:
            return False
        mode = getattr(getattr(self.service, "config", None), "parked_resumes", "pull")
        if mode == "auto":
            return getattr(self.service, "policy_name", "") in PULL_PARKED_POLICIES
        return mode == "pull"

    async def _place(self, entry: QueueEntry):
        if getattr(self.service, "driver", None) is not None:  # the decision core sizes its admission
            prompt, max_tokens = await self._size(entry)
            return await self.service.place_offline(self._rid(entry), prompt, max_tokens,
                                                    key=f"{entry.job_id}/{entry.index}", parked=self._pulled(entry))
        return await self.service.place_offline(self._rid(entry))

    def _start(self, entry: QueueEntry, placement) -> int:
        self.sizes.pop(entry.entry_id, None)
        self.running[entry.entry_id] = asyncio.create_task(self._execute(entry, placement))
        return 1

    async def _refresh(self) -> None:
        """Re-reads the active jobs; entries of jobs cancelled, finished or gone are dropped unrun (their queue
        was deleted with the cancel, so nothing else is left to remove)."""
        live = []
        for j, owner, state in await self.store.active_jobs():
            if state in ("enqueuing", "queued", "running"):
                live.append((j, owner))
            else:
                await self.store.retire(j)
        gone = self.fair.set_jobs(live)
        active = {j for j, _ in live}
        for e in [e for e in self.resumes.values() if e.job_id not in active]:
            gone.append(self.resumes.pop(e.entry_id))
        for e in gone:
            self.sizes.pop(e.entry_id, None)
            self._items.pop(e.entry_id, None)
        self.dropped += len(gone)
        metrics.OFFLINE_REQUESTS.labels("dropped").inc(len(gone))
        metrics.ACTIVE_JOBS.set(len(live))
        self.dry.clear()
        self._refreshed = asyncio.get_running_loop().time()

    async def _size(self, entry: QueueEntry) -> tuple[int, int]:
        """(prompt tokens, tokens still to generate) of a queued request, for the decision core's offline
        admission (KV and token budgets), read once per entry (a held entry is offered again and again).
        Text prompts count ~4 characters a token."""
        if entry.entry_id not in self.sizes:
            self.sizes[entry.entry_id] = await self._read_size(entry)
        return self.sizes[entry.entry_id]

    async def _read_size(self, entry: QueueEntry) -> tuple[int, int]:
        item = await self.store.item(entry.job_id, entry.index) or {}
        if item:
            self._items[entry.entry_id] = item
            while len(self._items) > ITEMS_KEPT:
                self._items.popitem(last=False)
        max_tokens = max(1, int(item.get("max_tokens", 0) or 0) - len(entry.generated))
        if entry.prompt:
            return len(entry.prompt) + len(entry.generated), max_tokens
        if "token_ids" in item:
            return len(item["token_ids"]), max_tokens
        if "messages" in item:
            return sum(len(m.get("content", "")) for m in item["messages"]) // 4 + 8, max_tokens
        return len(item.get("text", "")) // 4 + 1, max_tokens

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
            self.dry.discard(entry.job_id)
        finally:
            self.service.release(rid)
            self.running.pop(entry.entry_id, None)

    async def _run_request(self, entry: QueueEntry, rid: str, prefill_w, decode_w) -> None:
        job = await self.store.status(entry.job_id)
        item = self._items.pop(entry.entry_id, None) or await self.store.item(entry.job_id, entry.index)
        if job is None or item is None or job.get("state") == "cancelled":
            await self.store.drop(entry)
            return
        generated, text = list(entry.generated), entry.text
        remaining = int(item["max_tokens"]) - len(generated)
        if remaining <= 0:  # it has every token it asked for (stopped just as it ended): done, never one more
            await self._complete(entry, item, list(entry.prompt), generated[:int(item["max_tokens"])], text,
                                 "length", prefill_w, decode_w)
            return
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
        texts: list[str] | None = None
        park_key = entry.park.get("key", "") if self._parked(entry) else ""
        if entry.park and not park_key:
            self.resumed_recomputed[entry.park.get("failure") or "not parked"] += 1
        try:
            if park_key:  # its KV waits in kvtransfer's pool: decode on, computing only the tail
                if self.service.offline_must_yield(decode_w.worker_id, rid):
                    await self._requeue(entry, prompt, generated, text, preempted=True, park=entry.park)
                    return
                texts = [text]
                await self._decode(entry, item, rid, prompt, generated, texts, remaining, sampling, prefill_w,
                                   decode_w, park_key=park_key)
                return
            if prefill_w.worker_id == decode_w.worker_id and getattr(self.service, "driver", None) is not None:
                # the decision core placed it to decode where it prefills: one engine request
                pre_req.export_kv = False
                stream = self._worker(prefill_w).PrefillDecode(pre_req, timeout=3600)
                finish, first, park = "", True, {}
                try:
                    async for m in stream:
                        generated.extend(m.token_ids)
                        self.tokens += len(m.token_ids)
                        text += m.text
                        if m.finished:
                            finish = m.finish_reason
                            park = _park_of(m)
                        if first:
                            first = False
                            prompt = prompt or list(m.prompt_token_ids)
                            if not m.finished and self.service.offline_must_yield(prefill_w.worker_id, rid):
                                # online work landed here meanwhile: step back (the engine aborts it)
                                await self._requeue(entry, prompt, generated, text, preempted=True)
                                return
                finally:
                    stream.cancel()
                if finish == "preempted":
                    texts = [text]
                    await self._preempted(entry, item, rid, prompt, generated, texts, park, sampling, prefill_w, 0)
                    return
                await self._complete(entry, item, prompt, generated, text, finish, prefill_w, decode_w)
                return
            pre = await self._worker(prefill_w).Prefill(pre_req, timeout=600)
            prompt = prompt or list(pre.prompt_token_ids)
            if pre_req.fit_max_tokens and pre.max_tokens:
                remaining = pre.max_tokens
            generated.append(pre.first_token_id)
            self.tokens += 1
            text += pre.first_token_text
            finish = pre.finish_reason
            if not pre.finished and self.service.offline_must_yield(decode_w.worker_id, rid):
                # Online work landed on the decode worker while this request was prefilling: step back
                # before decoding (the worker could not preempt what it was not yet running).
                await self._abandon(prefill_w, rid, pre.kv if pre.HasField("kv") else None)
                await self._requeue(entry, prompt, generated, text, preempted=True)
                return
            if not pre.finished:
                texts = [text]
                await self._decode(entry, item, rid, prompt, generated, texts, remaining - 1, sampling, prefill_w,
                                   decode_w, kv=pre.kv if pre.HasField("kv") else None)
                return
        except grpc.aio.AioRpcError as exc:
            if texts is not None:  # failed in its decode: the text that arrived
                text = "".join(texts)
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                metrics.OFFLINE_REQUESTS.labels("failed").inc()
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
        await self._complete(entry, item, prompt, generated, text, finish, prefill_w, decode_w)

    async def _decode(self, entry: QueueEntry, item: dict, rid: str, prompt: list[int], generated: list[int],
                      texts: list[str], max_tokens: int, sampling, prefill_w, decode_w, kv=None,
                      park_key: str = "", hops: int = 0) -> None:
        """The decode phase on ``decode_w``: with the prefill's KV (``kv``) or the request's parked KV
        (``park_key``, a resume); then complete, or re-queue a preempted request with its KV parked.
        ``generated`` and ``texts`` (the text so far, in pieces) grow in place: a failure's re-queue keeps
        what arrived."""
        dreq = worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, generated_token_ids=generated, max_tokens=max_tokens,
            sampling=sampling, request_class=common_pb2.OFFLINE, park_key=park_key)
        if kv is not None:
            dreq.kv.CopyFrom(kv)
        finish, first, park = "", True, {}
        async for d in self._worker(decode_w).Decode(dreq, timeout=3600):
            if first and park_key:
                first = False
                if d.cached_tokens > 0:
                    self.resumed_parked += 1
                    self.tokens_not_recomputed += d.cached_tokens
                else:
                    self.resumed_recomputed[d.park_failure or "parked KV not loadable"] += 1
            generated.extend(d.token_ids)
            self.tokens += len(d.token_ids)
            texts.append(d.text)
            if d.finished:
                finish = d.finish_reason
                park = _park_of(d)
        if finish == "preempted":
            await self._preempted(entry, item, rid, prompt, generated, texts, park, sampling, prefill_w, hops)
            return
        await self._complete(entry, item, prompt, generated, "".join(texts), finish, prefill_w, decode_w)

    async def _preempted(self, entry: QueueEntry, item: dict, rid: str, prompt: list[int], generated: list[int],
                         texts: list[str], park: dict, sampling, prefill_w, hops: int) -> None:
        """A request stopped (preempted). If the decision core moved it (OOCO's pull: it waits for it on the
        puller) and its KV is parked, it decodes on there now from that KV — a placement the brain pins to the
        puller, no trip through the queue; else (not parked, or that placement refused) it is re-queued (with
        its KV parked where it was) and placed again by the policy.
        Crash-safe as any decode: until it completes, the queue holds the entry as it was last recorded."""
        key = f"{entry.job_id}/{entry.index}"
        driver = getattr(self.service, "driver", None)
        left = int(item["max_tokens"]) - len(generated)
        # only with its KV parked: a decode instance does not run offline prompts (its engine hands one back)
        if park.get("key") and left > 0 and hops < MAX_HANDOFFS and driver is not None and driver.moving(key):
            new_rid = self._rid(entry)
            placement = await self.service.place_offline(new_rid, len(prompt) + len(generated), left, key=key)
            if placement is not None:
                self.service.release(rid)  # the stopped leg ends (after the placement took the brain's pin)
                dst = placement[2]
                try:
                    if self.service.offline_must_yield(dst.worker_id, new_rid):
                        await self._requeue(entry, prompt, generated, "".join(texts), preempted=True, park=park)
                        return
                    self.moved += 1
                    metrics.OFFLINE_REQUESTS.labels("moved").inc()
                    await self._decode(entry, item, new_rid, prompt, generated, texts, left, sampling, prefill_w,
                                       dst, park_key=park["key"], hops=hops + 1)
                finally:
                    self.service.release(new_rid)
                return
        await self._requeue(entry, prompt, generated, "".join(texts), preempted=True, park=park)

    async def _complete(self, entry: QueueEntry, item: dict, prompt, generated, text, finish, prefill_w,
                        decode_w) -> None:
        self.completed += 1
        metrics.OFFLINE_REQUESTS.labels("completed").inc()
        metrics.OFFLINE_TOKENS.inc(len(generated))
        result = {
            "custom_id": item["custom_id"], "text": text, "token_ids": generated, "finish_reason": finish,
            "prefill_worker": prefill_w.worker_id, "decode_worker": decode_w.worker_id,
            "preemptions": entry.preemptions, "prompt_tokens": len(prompt), "at": time.time(),
        }
        await self._durably("complete", entry, lambda: self.store.complete(
            entry, result, output_tokens=len(generated), failed=False))

    async def _requeue(self, entry, prompt, generated, text, preempted: bool, park: dict | None = None) -> None:
        """Re-queues ``entry`` to resume from ``generated``; a preempted one notes where its KV went (``park``;
        default: nowhere, its resume recomputes)."""
        self.requeued += 1
        metrics.OFFLINE_REQUESTS.labels("requeued").inc()
        self.dry.discard(entry.job_id)
        if preempted and not park:
            park = {"failure": "stopped before its decode"}
        await self._durably("requeue", entry, lambda: self.store.requeue(
            entry, prompt if generated else entry.prompt, generated, text, preempted, park=park))

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
        return self.service.channels.stub(w.address, worker_pb2_grpc.WorkerStub)


def _park_of(m) -> dict:
    """Where a preempted stream's last message says its KV went (see ``QueueEntry.park``)."""
    if m.finish_reason != "preempted":
        return {}
    if m.parked_key:
        return {"key": m.parked_key, "tokens": m.parked_tokens}
    return {"failure": m.park_failure or "not parked"}
