"""The dispatcher's ``FairQueue``: owners served in turn, one owner's jobs oldest first, reads bounded."""

from __future__ import annotations

from duopool.common.jobs import QueueEntry
from duopool.scheduler.dispatcher import FairQueue


def entries(job: str, n: int, start: int = 0) -> list[QueueEntry]:
    return [QueueEntry(f"{job}-{i}", job, i) for i in range(start, start + n)]


def drain(q: FairQueue, n: int) -> list[str]:
    out = []
    for _ in range(n):
        e = q.peek()
        if e is None:
            break
        q.take(e)
        out.append(e.job_id)
    return out


def test_owners_take_turns_whatever_the_backlog():
    q = FairQueue()
    q.set_jobs([("big", "a"), ("small", "b")])
    q.add(entries("big", 50))
    q.add(entries("small", 3))
    assert drain(q, 8) == ["big", "small", "big", "small", "big", "small", "big", "big"]


def test_one_owner_runs_its_jobs_oldest_first_while_another_owner_keeps_its_turn():
    q = FairQueue()
    q.set_jobs([("a1", "a"), ("a2", "a"), ("b1", "b")])
    q.add(entries("a2", 3) + entries("a1", 2) + entries("b1", 4))
    assert drain(q, 9) == ["a1", "b1", "a1", "b1", "a2", "b1", "a2", "b1", "a2"]


def test_jobs_no_longer_active_give_back_their_entries_and_duplicates_are_ignored():
    q = FairQueue()
    q.set_jobs([("x", "a"), ("y", "b")])
    assert q.add(entries("x", 3) + entries("y", 2)) == 5
    assert q.add(entries("x", 3)) == 0, "an entry already buffered (e.g. claimed again) is not added twice"
    gone = q.set_jobs([("y", "b")])  # x cancelled
    assert sorted(e.entry_id for e in gone) == ["x-0", "x-1", "x-2"] and len(q) == 2
    assert drain(q, 5) == ["y", "y"]


def test_reads_are_bounded_per_owner_and_skip_dry_queues():
    q = FairQueue()
    q.set_jobs([("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")])
    q.add(entries("b1", 4))
    # a: its oldest job only; b already holds 4 >= target; c: its job
    assert q.to_read(4, dry=set()) == ["a1", "c1"]
    assert q.to_read(4, dry={"a1"}) == ["a2", "c1"], "a younger job is read once the older one is dry"


def test_unlisted_job_is_served_not_lost():
    q = FairQueue()
    q.set_jobs([("x", "a")])
    q.add(entries("x", 1) + entries("new", 1))
    assert sorted(drain(q, 3)) == ["new", "x"]


def test_a_short_old_job_lets_the_next_job_be_read_in_the_same_step():
    """The oldest job of an owner trickles (a few re-queued entries each step): the dispatcher reads the
    owner's next job in the same step instead of waiting for the old one to run dry (it starved before)."""
    import asyncio
    from types import SimpleNamespace

    from duopool.scheduler.dispatcher import OfflineDispatcher

    streams = {"j1": entries("j1", 1), "j2": entries("j2", 40), "j3": entries("j3", 40)}
    reads = []

    class Store:
        async def read(self, consumer, want, count, pending=False):
            reads.append(list(want))
            out = {}
            for j in want:
                got, streams[j] = streams[j][:count], streams[j][count:]
                if got:
                    out[j] = got
            streams["j1"] += entries("j1", 1, start=100 + len(reads))  # a re-queue lands in j1 every read
            return out

    async def free_slots():
        return 16

    async def place(rid, *a, **k):
        return None  # nothing placed: what was read stays buffered

    service = SimpleNamespace(offline_free_slots=free_slots, place_offline=place, driver=None)
    d = OfflineDispatcher(service, Store(), "c")

    async def main():
        d.fair.set_jobs([("j1", "a"), ("j2", "a"), ("j3", "a")])
        d._refreshed = asyncio.get_running_loop().time()
        await d._step(claim=False)

    asyncio.run(main())
    assert reads[0] == ["j1"] and ["j2"] in reads  # j1 gave 1 of 16: j2 read in the same step
    assert d.fair.buffered("j2") == 16 and len(d.fair) >= 17


def test_a_parked_decode_no_plan_pulls_yet_does_not_hold_back_new_work_behind_it():
    """A preempted decode with parked KV waits for an instance's plan to pull it: it is set aside (still
    pending, offered again each step) and the new requests behind it are placed meanwhile."""
    import asyncio
    from types import SimpleNamespace

    from duopool.scheduler.dispatcher import OfflineDispatcher

    parked = QueueEntry("j1-0", "j1", 0, prompt=[1] * 40, generated=[2] * 8, park={"key": "j1-0", "tokens": 32})
    queue = {"j1": [parked, *entries("j1", 3, start=1)]}
    asked = []

    class Store:
        async def read(self, consumer, want, count, pending=False):
            out = {j: queue[j][:count] for j in want if queue.get(j)}
            for j in out:
                queue[j] = queue[j][count:]
            return out

        async def item(self, job, index):
            return {"max_tokens": 64, "token_ids": [1] * 40}

    async def free_slots():
        return 4

    pulls = {"open": False}

    async def place(rid, prompt=0, max_tokens=0, key="", parked=False):
        asked.append((key, parked))
        if parked and not pulls["open"]:
            return None  # no instance's plan pulls it yet
        return rid, SimpleNamespace(worker_id="w"), SimpleNamespace(worker_id="w")

    started = []
    service = SimpleNamespace(offline_free_slots=free_slots, place_offline=place, driver=object())
    d = OfflineDispatcher(service, Store(), "c")

    async def execute(entry, placement):
        started.append(entry.entry_id)

    d._execute = execute

    async def main():
        d.fair.set_jobs([("j1", "a")])
        d._refreshed = asyncio.get_running_loop().time()
        await d._step(claim=False)
        await asyncio.sleep(0)
        assert started == ["j1-1", "j1-2", "j1-3"] and list(d.resumes) == ["j1-0"]
        assert ("j1/0", True) in asked
        d.store.read = lambda *a, **k: _empty()  # nothing new in the queue
        pulls["open"] = True
        await d._step(claim=False)
        await asyncio.sleep(0)
        assert started[-1] == "j1-0" and not d.resumes

    async def _empty():
        return {}

    asyncio.run(main())
