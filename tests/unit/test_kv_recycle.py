"""Recycled KV segment files (duopool.kv.recycle): a finished segment's file is reused by the next segment
written in its directory, a reader keeps its mapping, a reuse under a reader is detected, caps hold."""

from __future__ import annotations

import os

import numpy as np
import pytest

from duopool.kv import recycle
from duopool.kv.segment import KvSegment, SegmentError, segment_path, unlink_segment
from duopool.kv.transport.shm import ShmTransport
from duopool.kv.transport.testing import make_meta

pytestmark = pytest.mark.unit

BB = 4096


@pytest.fixture()
def kvdir(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOPOOL_KV_RECYCLE_MIB", "4")
    monkeypatch.setattr(recycle, "_CACHE", None)  # a fresh mapping cache per test
    return tmp_path


def _write(directory, tid, blocks, fill, layers=2, block_map=False):
    meta = make_meta(tid, layers, blocks, BB)
    seg = KvSegment.create(segment_path(tid, directory), meta, block_map=block_map)
    for layer in range(layers):
        seg.write_layer(layer, np.full(blocks * BB, fill + layer, np.uint8))
    if not block_map:
        seg.seal()
    return seg


def _free(directory):
    return sorted(p.name for p in (directory / recycle.FREE_DIR).glob("*.kv"))


def test_a_retired_file_is_reused_by_the_next_segment_of_about_its_size(kvdir):
    with _write(kvdir, "t1", 32, 1) as seg:
        assert not seg.recycled
    path = segment_path("t1", kvdir)
    ino = os.stat(path).st_ino
    assert unlink_segment(path, recycle_file=True)
    assert not path.exists() and len(_free(kvdir)) == 1
    with _write(kvdir, "t2", 24, 7) as seg:  # a bit smaller: fits the same file
        assert seg.recycled
    assert os.stat(segment_path("t2", kvdir)).st_ino == ino and _free(kvdir) == []
    with KvSegment.open(segment_path("t2", kvdir), populate=True) as back:
        assert back.meta.transfer_id == "t2" and back.meta.num_blocks == 24
        assert bytes(back.layer_view(1)) == bytes([8]) * (24 * BB)
    # a segment needing far less than the free file does not pin it; one needing more gets a new file
    unlink_segment(segment_path("t2", kvdir), recycle_file=True)
    with _write(kvdir, "tiny", 1, 0, layers=1) as seg:
        assert not seg.recycled
    with _write(kvdir, "big", 64, 0) as seg:
        assert not seg.recycled
    assert len(_free(kvdir)) == 1


def test_the_free_list_is_capped_and_zero_turns_recycling_off(kvdir, monkeypatch):
    monkeypatch.setenv("DUOPOOL_KV_RECYCLE_MIB", "1")
    for k in range(3):  # 0.48 MiB each: two fit under 1 MiB, the third is unlinked
        _write(kvdir, f"c{k}", 60, k).close()
    for k in range(3):
        unlink_segment(segment_path(f"c{k}", kvdir), recycle_file=True)
    sizes = [int(n.split("-")[0]) for n in _free(kvdir)]
    assert len(sizes) == 2 and sum(sizes) <= 1 << 20
    assert not any(kvdir.glob("c*.kv"))
    monkeypatch.setenv("DUOPOOL_KV_RECYCLE_MIB", "0")
    with _write(kvdir, "off", 60, 0) as seg:
        assert not seg.recycled
    unlink_segment(segment_path("off", kvdir), recycle_file=True)
    assert not segment_path("off", kvdir).exists() and len(_free(kvdir)) == 2
    assert recycle.mapping_cache() is None


def test_a_reader_keeps_its_mapping_and_sees_the_new_contents(kvdir):
    _write(kvdir, "r1", 8, 3).close()
    buf = bytearray(2 * 8 * BB)
    shm = ShmTransport(kvdir)
    shm.load_into("r1", buf)
    assert buf[:BB] == bytes([3]) * BB
    cache = recycle.mapping_cache()
    assert (cache.hits, cache.misses) == (0, 1)
    unlink_segment(segment_path("r1", kvdir), recycle_file=True)
    _write(kvdir, "r2", 8, 9).close()  # the same file, new data
    shm.load_into("r2", buf)
    assert (cache.hits, cache.misses) == (1, 1)
    assert buf[:BB] == bytes([9]) * BB and buf[-BB:] == bytes([10]) * BB


def test_a_file_rewritten_under_a_reader_is_refused(kvdir):
    _write(kvdir, "x1", 8, 1).close()
    reader = KvSegment.open(segment_path("x1", kvdir), populate=True)
    assert reader.unchanged()
    unlink_segment(segment_path("x1", kvdir), recycle_file=True)  # its lease ended while it was read
    writer = _write(kvdir, "x2", 8, 5)  # reused at once
    assert not reader.unchanged()
    reader.close()
    writer.close()
    # a reader of the live segment is fine, and the old name is gone
    with KvSegment.open(segment_path("x2", kvdir), populate=True) as ok:
        assert ok.unchanged()
    with pytest.raises(SegmentError, match="does not exist"):
        KvSegment.open(segment_path("x1", kvdir), populate=True)


def test_a_recycled_file_forgets_what_a_receiver_had_received(kvdir):
    seg = _write(kvdir, "m1", 4, 0, block_map=True)
    seg.mark_units(0, seg.num_units)
    seg.seal()
    seg.close()
    unlink_segment(segment_path("m1", kvdir), recycle_file=True)
    with _write(kvdir, "m2", 4, 0, block_map=True) as again:
        assert again.recycled
        assert again.missing_runs() == [(0, again.num_units)]
        assert not again.meta.sealed


def test_the_mapping_cache_lets_go_of_unlinked_files(kvdir):
    cache = recycle.MappingCache(max_bytes=1 << 30, max_entries=2)
    paths = []
    for k in range(2):
        _write(kvdir, f"u{k}", 2, k).close()
        paths.append(segment_path(f"u{k}", kvdir))
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            cache.get(fd, os.fstat(fd))
        finally:
            os.close(fd)
    assert len(cache) == 2
    paths[0].unlink()  # not recycled: gone for good
    _write(kvdir, "u2", 2, 2).close()
    fd = os.open(segment_path("u2", kvdir), os.O_RDONLY)
    try:
        cache.get(fd, os.fstat(fd))  # a miss prunes: u0's mapping goes
    finally:
        os.close(fd)
    assert len(cache) == 2 and cache.misses == 3
    cache.clear()
    assert len(cache) == 0
