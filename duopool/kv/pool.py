"""Host-memory KV pool: parks preempted offline requests' KV segments until some worker pulls them.

The kvtransfer service holds one :class:`KvPool` per host. When an offline request is preempted, its KV
(already a sealed segment, or written into one) is *parked* under a key (the request id) with a priority;
later any worker resumes the request by *checking it out* (``checkout(key, transfer_id)`` renames the file
to an ordinary transfer segment, which the transports then move like any other — that is how offline
decode moves between pools) or by reading it in place (``reading(key)``).

* Capacity: a byte limit over the parked segments' file sizes. Parking evicts until the new entry fits;
  an entry larger than the whole pool is refused (:class:`PoolFull`).
* Eviction: ``"lru"`` (least recently parked/read first) or ``"priority"`` (lowest priority first, LRU
  among equals; an entry is never evicted for a lower-priority one). Entries being read are pinned.
  ``on_evict(key, nbytes)`` tells the owner (the request must be recomputed).
* Files: ``<directory>/<key>.kv`` (default ``<kv_dir>/pool``), moved in and out by rename (same
  filesystem, no copy). A pool opened on a directory with files left by a previous process adopts them
  (priority 0, oldest first) so nothing leaks and accounting stays true; ``clear()`` removes everything.
* Thread-safe: one lock around the index; file renames and unlinks happen under it (they are cheap).

Pure Python + files: no torch, no grpc.
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from duopool.kv.segment import KvSegment, kv_dir, segment_path, unlink_segment

POLICIES = ("lru", "priority")


class PoolFull(RuntimeError):
    """The segment cannot fit even after evicting everything evictable."""


@dataclass(frozen=True)
class PoolEntry:
    key: str
    path: pathlib.Path
    nbytes: int
    priority: int
    num_tokens: int


@dataclass(frozen=True)
class PoolStats:
    capacity_bytes: int
    used_bytes: int
    entries: int
    parked: int  # total parks
    evictions: int
    evicted_bytes: int
    hits: int
    misses: int
    refused: int
    policy: str


@dataclass
class _Slot:
    entry: PoolEntry
    pins: int = 0


class KvPool:
    def __init__(self, capacity_bytes: int, *, policy: str = "lru", directory: pathlib.Path | str | None = None,
                 on_evict: Callable[[str, int], None] | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.directory = pathlib.Path(directory) if directory is not None else kv_dir() / "pool"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_evict = on_evict
        self._lock = threading.RLock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # LRU order: oldest first
        self._used = 0
        self._counts = {"parked": 0, "evictions": 0, "evicted_bytes": 0, "hits": 0, "misses": 0, "refused": 0}
        self._adopt()

    # -- parking ----------------------------------------------------------------------------------------
    def park(self, key: str, source: pathlib.Path | str, *, priority: int = 0) -> PoolEntry:
        """Moves the sealed segment file ``source`` into the pool under ``key`` (replacing an entry with
        the same key). Evicts as needed; raises :class:`PoolFull` (leaving ``source`` in place) if it
        cannot fit. Returns the entry."""
        source = pathlib.Path(source)
        with KvSegment.open(source) as seg:  # refuses torn / unsealed KV
            num_tokens = seg.meta.num_tokens
        nbytes = os.stat(source).st_size
        dest = segment_path(key, self.directory)
        with self._lock:
            old = self._slots.get(key)
            if old is not None and old.pins:
                raise PoolFull(f"{key!r} is being read; cannot replace it")
            freed = old.entry.nbytes if old else 0
            if not self._make_room(nbytes - freed, priority, exclude=key):
                self._counts["refused"] += 1
                raise PoolFull(f"cannot park {key!r} ({nbytes} bytes): pool of {self.capacity_bytes} bytes, "
                               f"{self._used} used by entries it may not evict")
            if old:
                self._drop(key)
            os.replace(source, dest)
            entry = PoolEntry(key, dest, nbytes, priority, num_tokens)
            self._slots[key] = _Slot(entry)
            self._used += nbytes
            self._counts["parked"] += 1
            return entry

    def park_segment(self, key: str, transfer_id: str, *, priority: int = 0,
                     directory: pathlib.Path | None = None) -> PoolEntry:
        """``park`` of the transfer segment ``<kv_dir>/<transfer_id>.kv``."""
        return self.park(key, segment_path(transfer_id, directory), priority=priority)

    # -- pulling ----------------------------------------------------------------------------------------
    def get(self, key: str) -> PoolEntry | None:
        """The entry (counts a hit and refreshes its LRU position) or None (a miss)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                self._counts["misses"] += 1
                return None
            self._counts["hits"] += 1
            self._slots.move_to_end(key)
            return slot.entry

    @contextmanager
    def reading(self, key: str) -> Iterator[KvSegment]:
        """Opens the parked segment for reading; it is pinned (never evicted) until the block exits."""
        with self._lock:
            entry = self.get(key)
            if entry is None:
                raise KeyError(key)
            self._slots[key].pins += 1
        try:
            with KvSegment.open(entry.path) as seg:
                yield seg
        finally:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None:
                    slot.pins -= 1

    def checkout(self, key: str, transfer_id: str, directory: pathlib.Path | None = None) -> pathlib.Path | None:
        """Removes the entry and renames its file to the transfer segment ``<kv_dir>/<transfer_id>.kv``
        (ownership passes to the caller / the transfer). None if absent (a miss)."""
        dest = segment_path(transfer_id, directory)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                self._counts["misses"] += 1
                return None
            if slot.pins:
                raise PoolFull(f"{key!r} is being read")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(slot.entry.path, dest)
            del self._slots[key]
            self._used -= slot.entry.nbytes
            self._counts["hits"] += 1
            return dest

    def release(self, key: str) -> bool:
        """Drops an entry and its file (request finished or cancelled). True if it existed."""
        with self._lock:
            if key not in self._slots:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._slots):
                self._drop(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._slots

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self.capacity_bytes, self._used, len(self._slots), policy=self.policy, **self._counts)

    # -- internals --------------------------------------------------------------------------------------
    def _victims(self, priority: int, exclude: str) -> list[str]:
        cands = [(k, s) for k, s in self._slots.items() if not s.pins and k != exclude]
        if self.policy == "priority":
            cands = [(k, s) for k, s in cands if s.entry.priority <= priority]
            order = {k: i for i, k in enumerate(self._slots)}
            cands.sort(key=lambda ks: (ks[1].entry.priority, order[ks[0]]))
        return [k for k, _ in cands]

    def _make_room(self, need: int, priority: int, exclude: str) -> bool:
        if self._used + need <= self.capacity_bytes:
            return True
        victims, free = [], self.capacity_bytes - self._used
        for k in self._victims(priority, exclude):
            if free >= need:
                break
            victims.append(k)
            free += self._slots[k].entry.nbytes
        if free < need:
            return False
        for k in victims:
            nbytes = self._slots[k].entry.nbytes
            self._drop(k)
            self._counts["evictions"] += 1
            self._counts["evicted_bytes"] += nbytes
            if self.on_evict is not None:
                try:
                    self.on_evict(k, nbytes)
                except Exception:  # the owner's callback must not break the pool
                    pass
        return True

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._used -= slot.entry.nbytes
        unlink_segment(slot.entry.path)

    def _adopt(self) -> None:
        files = sorted(self.directory.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        for p in self.directory.glob("*.tmp"):
            p.unlink(missing_ok=True)
        for p in files:
            try:
                with KvSegment.open(p) as seg:
                    tokens = seg.meta.num_tokens
            except Exception:
                unlink_segment(p)  # torn or foreign: not worth keeping
                continue
            nbytes = p.stat().st_size
            key = p.name[: -len(".kv")]
            if self._used + nbytes > self.capacity_bytes:
                unlink_segment(p)
                continue
            self._slots[key] = _Slot(PoolEntry(key, p, nbytes, 0, tokens))
            self._used += nbytes
