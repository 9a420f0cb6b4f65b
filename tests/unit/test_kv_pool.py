"""Unit tests of the host-memory KV pool."""

from __future__ import annotations

import threading

import pytest

from duopool.kv.pool import KvPool, PoolFull
from duopool.kv.segment import KvSegment, SegmentError, segment_path
from duopool.kv.transport.testing import digest, make_segment

pytestmark = pytest.mark.unit

SEG = 4096 + 4 * 4096  # file size of a 1x4x4096 segment


@pytest.fixture()
def kv(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOPOOL_KV_DIR", str(tmp_path))
    return tmp_path


def _seg(kv, tid, seed=0):
    make_segment(kv, tid, 1, 4, 4096, seed=seed).close()
    return segment_path(tid, kv)


def test_park_get_checkout_and_stats(kv):
    pool = KvPool(3 * SEG)
    src = _seg(kv, "t1", seed=4)
    want = digest(src)
    e = pool.park("req-1", src, priority=1)
    assert e.nbytes == SEG and not src.exists()
    assert pool.get("req-1").path == e.path
    assert pool.get("nope") is None
    with pool.reading("req-1") as seg:
        assert seg.meta.num_blocks == 4
    out = pool.checkout("req-1", "xfer-9")
    assert out == segment_path("xfer-9", kv) and digest(out) == want
    s = pool.stats()
    assert (s.used_bytes, s.entries, s.hits, s.misses, s.parked) == (0, 0, 3, 1, 1)
    assert pool.checkout("req-1", "again") is None


def test_lru_eviction(kv):
    evicted = []
    pool = KvPool(2 * SEG, on_evict=lambda k, n: evicted.append(k))
    pool.park("a", _seg(kv, "a"))
    pool.park("b", _seg(kv, "b"))
    pool.get("a")  # a is now most recent
    pool.park("c", _seg(kv, "c"))
    assert evicted == ["b"] and set(pool.keys()) == {"a", "c"}
    assert not segment_path("b", pool.directory).exists()
    assert pool.stats().evictions == 1 and pool.stats().used_bytes == 2 * SEG


def test_priority_eviction_never_evicts_higher_priority(kv):
    pool = KvPool(2 * SEG, policy="priority")
    pool.park("hi", _seg(kv, "hi"), priority=5)
    pool.park("lo", _seg(kv, "lo"), priority=1)
    pool.park("mid", _seg(kv, "mid"), priority=3)  # evicts lo, not the older hi
    assert set(pool.keys()) == {"hi", "mid"}
    src = _seg(kv, "low2")
    with pytest.raises(PoolFull):
        pool.park("low2", src, priority=0)
    assert src.exists()  # refused: the caller still owns it
    assert pool.stats().refused == 1


def test_pinned_entries_are_not_evicted_and_too_big_is_refused(kv):
    pool = KvPool(SEG)
    pool.park("a", _seg(kv, "a"))
    with pool.reading("a"):
        with pytest.raises(PoolFull):
            pool.park("b", _seg(kv, "b"))
    pool.park("b", segment_path("b", kv))  # after the read, a can go
    assert pool.keys() == ["b"]
    make_segment(kv, "big", 2, 4, 4096).close()
    with pytest.raises(PoolFull):
        pool.park("big", segment_path("big", kv))


def test_adopts_leftovers_and_clear_removes_files(kv):
    pool = KvPool(4 * SEG)
    pool.park("a", _seg(kv, "a"))
    pool.park("b", _seg(kv, "b"))
    again = KvPool(4 * SEG)  # a restarted service finds the files
    assert set(again.keys()) == {"a", "b"} and again.stats().used_bytes == 2 * SEG
    again.clear()
    assert not list(again.directory.iterdir())


def test_unsealed_segments_are_refused(kv):
    pool = KvPool(4 * SEG)
    make_segment(kv, "torn", 1, 4, 4096, seal=False).close()
    with pytest.raises(SegmentError):
        pool.park("torn", segment_path("torn", kv))


def test_thread_safety(kv):
    pool = KvPool(8 * SEG)
    paths = [_seg(kv, f"s{i}") for i in range(32)]
    errors = []

    def worker(chunk):
        try:
            for p in chunk:
                key = p.stem
                pool.park(key, p)
                pool.get(key)
                if int(key[1:]) % 2:
                    pool.checkout(key, f"x-{key}")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(paths[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = pool.stats()
    assert s.used_bytes == s.entries * SEG <= 8 * SEG
    assert len(list(pool.directory.glob("*.kv"))) == s.entries
    with KvSegment.open(segment_path("x-s1", kv)) as seg:
        assert seg.meta.sealed
