"""The kvtransfer service in-process, on a fake clock: leases, the host KV pool RPCs, Read (units, a segment
that vanishes mid-stream), stats, and the config. Real segment files in a temporary directory."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from duopool.common.config import ConfigError, KvTransferConfig, WorkerConfig, config_from_namespace
from duopool.kv.segment import HEADER_BYTES, KvSegment, SegmentMeta, segment_path
from duopool.kv.transport.grpc_stream import ChunkReceiver
from duopool.kvtransfer.server import KEEP_ENDED_S, KvTransferService
from duopool.v1 import common_pb2, kvtransfer_pb2

pytestmark = pytest.mark.unit
S = kvtransfer_pb2
BLOCK = 1024


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class Ctx:
    async def abort(self, code, details):
        raise Aborted(code, details)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_segment(kv_dir: pathlib.Path, tid: str, blocks: int = 4, layers: int = 2) -> pathlib.Path:
    meta = SegmentMeta(transfer_id=tid, num_layers=layers, num_blocks=blocks, block_bytes=BLOCK, dtype="uint8",
                       block_shape=(BLOCK,), block_size=16, num_tokens=16 * blocks, layer_names=("a", "b")[:layers])
    path = segment_path(tid, kv_dir)
    with KvSegment.create(path, meta) as seg:
        for u in range(seg.num_units):
            seg.units_view(u)[:] = bytes([u % 251]) * BLOCK
        seg.seal()
    return path


def seg_bytes(blocks: int = 4, layers: int = 2) -> int:
    return HEADER_BYTES + blocks * layers * BLOCK


@pytest.fixture()
def kv_dir(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    return d


def service(kv_dir, **kw) -> tuple[KvTransferService, Clock]:
    clock = Clock()
    cfg = KvTransferConfig(kv_dir=str(kv_dir), lease_s=kw.pop("lease_s", 10.0), **kw)
    return KvTransferService(cfg, clock=clock), clock


async def start(svc, kv_dir, tid, **kw) -> kvtransfer_pb2.TransferStatus:
    path = make_segment(kv_dir, tid, **kw)
    meta_bytes = path.stat().st_size - HEADER_BYTES
    kv = common_pb2.KvHandle(transfer_id=tid, num_tokens=64, num_blocks=4, num_bytes=meta_bytes, transport="shm",
                             location=str(path), source_worker="prefill-0", source_host="h1")
    return await svc.StartTransfer(kvtransfer_pb2.StartTransferRequest(kv=kv, destination_worker="decode-0"), Ctx())


async def read_all(svc, tid, chunk_bytes=0, units=()) -> list[kvtransfer_pb2.DataChunk]:
    req = kvtransfer_pb2.ReadRequest(transfer_id=tid, chunk_bytes=chunk_bytes, units=list(units))
    return [c async for c in svc.Read(req, Ctx())]


async def test_destination_that_never_pulls_expires_and_the_segment_goes(kv_dir):
    svc, clock = service(kv_dir, lease_s=5.0)
    st = await start(svc, kv_dir, "t1")
    path = pathlib.Path(st.kv.location)
    assert st.state == S.READY and path.exists()
    clock.t += 4.9
    await svc.sweep()
    assert svc.transfers["t1"].state == S.READY and path.exists()
    clock.t += 0.2
    await svc.sweep()
    polled = await svc.PollTransfer(kvtransfer_pb2.PollTransferRequest(transfer_id="t1"), Ctx())
    assert polled.state == S.EXPIRED and polled.error == "lease expired"
    assert not path.exists() and not list(kv_dir.glob("*.tmp"))
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert stats.expired == 1 and stats.active_transfers == 0 and stats.completed == 0
    # A late completion does not change the end state.
    late = await svc.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(transfer_id="t1", ok=True), Ctx())
    assert late.state == S.EXPIRED


@pytest.mark.parametrize("ending", ["complete", "fail", "release"])
async def test_an_end_that_overtakes_its_start_ends_the_late_start_at_once(kv_dir, ending):
    """The source announces its KV in the background, so a fast decode's CompleteTransfer (or a router's
    Release) can arrive first: NOT_FOUND as before, but the late StartTransfer ends in that state at once and
    the segment goes, rather than lingering for its lease."""
    svc, _ = service(kv_dir)
    path = segment_path("early-1", kv_dir)
    with pytest.raises(Aborted) as err:
        if ending == "release":
            await svc.Release(kvtransfer_pb2.ReleaseTransferRequest(transfer_id="early-1"), Ctx())
        else:
            await svc.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(
                transfer_id="early-1", ok=ending == "complete", error="x"), Ctx())
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    st = await start(svc, kv_dir, "early-1")
    want = {"complete": S.COMPLETED, "fail": S.FAILED, "release": S.RELEASED}[ending]
    assert st.state == want and not path.exists()
    assert not svc._ended_early
    again = await start(svc, kv_dir, "other-1")  # an unrelated transfer is untouched
    assert again.state == S.READY and segment_path("other-1", kv_dir).exists()


async def test_park_take_complete_moves_by_rename_and_counts(kv_dir):
    svc, _ = service(kv_dir)
    st = await start(svc, kv_dir, "t1")
    src = pathlib.Path(st.kv.location)
    ino = src.stat().st_ino
    parked = await svc.Park(kvtransfer_pb2.ParkRequest(key="req-7", transfer_id="t1", priority=1), Ctx())
    assert parked.num_bytes == seg_bytes() and parked.num_tokens == 64 and not parked.evicted
    assert not src.exists()
    pooled = kv_dir / "pool" / "req-7.kv"
    assert pooled.stat().st_ino == ino  # renamed, not copied
    polled = await svc.PollTransfer(kvtransfer_pb2.PollTransferRequest(transfer_id="t1"), Ctx())
    assert polled.state == S.PARKED
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert (stats.pool_entries, stats.pool_used_bytes, stats.pool_parks, stats.parked_transfers) == (1, seg_bytes(), 1, 1)
    assert stats.pool_capacity_bytes == 2 << 30 and stats.pool_policy == "lru"

    taken = await svc.Take(kvtransfer_pb2.TakeRequest(key="req-7", new_transfer_id="t2",
                                                      destination_worker="decode-3"), Ctx())
    assert taken.state == S.READY and taken.transfer_id == "t2"
    loc = pathlib.Path(taken.kv.location)
    assert loc == segment_path("t2", kv_dir) and loc.stat().st_ino == ino and not pooled.exists()
    assert taken.kv.num_tokens == 64 and taken.kv.num_blocks == 4 and taken.kv.num_bytes == 8 * BLOCK
    with KvSegment.open(loc) as seg:  # an ordinary transfer segment now: the header names t2
        assert seg.meta.transfer_id == "t2" and seg.meta.sealed
        assert bytes(seg.units_view(5)) == bytes([5]) * BLOCK
    done = await svc.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(transfer_id="t2", ok=True), Ctx())
    assert done.state == S.COMPLETED and not loc.exists()
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert (stats.pool_entries, stats.pool_used_bytes, stats.pool_hits, stats.completed) == (0, 0, 1, 1)
    with pytest.raises(Aborted) as err:  # taken once: the second Take misses
        await svc.Take(kvtransfer_pb2.TakeRequest(key="req-7", new_transfer_id="t3"), Ctx())
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "already taken" in err.value.details
    assert (await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())).pool_misses == 1


async def test_lru_eviction_take_of_evicted_key_is_not_found(kv_dir):
    svc, _ = service(kv_dir, kv_pool_gib=2 * seg_bytes() / (1 << 30) + 1e-9)
    for i in range(3):
        make_segment(kv_dir, f"s{i}")
        r = await svc.Park(kvtransfer_pb2.ParkRequest(key=f"k{i}", location=str(segment_path(f"s{i}", kv_dir))), Ctx())
        assert list(r.evicted) == ([] if i < 2 else ["k0"])
    assert sorted(p.name for p in (kv_dir / "pool").iterdir()) == ["k1.kv", "k2.kv"]
    assert not list(kv_dir.glob("*.kv"))
    with pytest.raises(Aborted) as err:
        await svc.Take(kvtransfer_pb2.TakeRequest(key="k0"), Ctx())
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "evicted" in err.value.details
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert (stats.pool_entries, stats.pool_evictions, stats.pool_evicted_bytes, stats.pool_misses) == (
        2, 1, seg_bytes(), 1)
    assert (await svc.Drop(kvtransfer_pb2.DropRequest(key="k1"), Ctx())).found
    assert not (await svc.Drop(kvtransfer_pb2.DropRequest(key="k1"), Ctx())).found
    assert (await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())).pool_entries == 1


async def test_priority_pool_refuses_lower_priority_newcomer_and_leaves_its_segment(kv_dir):
    svc, _ = service(kv_dir, kv_pool_gib=seg_bytes() / (1 << 30) + 1e-9, kv_pool_policy="priority")
    await start(svc, kv_dir, "hi")
    await svc.Park(kvtransfer_pb2.ParkRequest(key="high", transfer_id="hi", priority=5), Ctx())
    low = await start(svc, kv_dir, "lo")
    with pytest.raises(Aborted) as err:
        await svc.Park(kvtransfer_pb2.ParkRequest(key="low", transfer_id="lo", priority=1), Ctx())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pathlib.Path(low.kv.location).exists() and svc.transfers["lo"].state == S.READY
    top = await start(svc, kv_dir, "top")
    r = await svc.Park(kvtransfer_pb2.ParkRequest(key="top", transfer_id="top", priority=9), Ctx())
    assert list(r.evicted) == ["high"] and not pathlib.Path(top.kv.location).exists()
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert (stats.pool_refused, stats.pool_evictions, stats.pool_policy) == (1, 1, "priority")


async def test_park_validation(kv_dir):
    svc, _ = service(kv_dir)
    await start(svc, kv_dir, "t1")
    cases = [
        (kvtransfer_pb2.ParkRequest(key="", transfer_id="t1"), grpc.StatusCode.INVALID_ARGUMENT, "key:"),
        (kvtransfer_pb2.ParkRequest(key="a/b", transfer_id="t1"), grpc.StatusCode.INVALID_ARGUMENT, "key:"),
        (kvtransfer_pb2.ParkRequest(key="k"), grpc.StatusCode.INVALID_ARGUMENT, "transfer_id:"),
        (kvtransfer_pb2.ParkRequest(key="k", transfer_id="nope"), grpc.StatusCode.NOT_FOUND, "transfer_id:"),
        (kvtransfer_pb2.ParkRequest(key="k", location="/etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "location:"),
        (kvtransfer_pb2.ParkRequest(key="k", location=str(segment_path("t1", kv_dir))),
         grpc.StatusCode.FAILED_PRECONDITION, "location:"),
    ]
    for req, code, prefix in cases:
        with pytest.raises(Aborted) as err:
            await svc.Park(req, Ctx())
        assert err.value.code == code and err.value.details.startswith(prefix), err.value
    disabled, _ = service(kv_dir, kv_pool_gib=0.0)
    with pytest.raises(Aborted) as err:
        await disabled.Park(kvtransfer_pb2.ParkRequest(key="k", transfer_id="t1"), Ctx())
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (await disabled.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())).pool_capacity_bytes == 0


async def test_read_streams_only_requested_units_and_a_receiver_rebuilds_the_segment(kv_dir, tmp_path):
    svc, _ = service(kv_dir)
    await start(svc, kv_dir, "t1")
    chunks = await read_all(svc, "t1", chunk_bytes=4096, units=[1, 2, 6])
    assert chunks[0].offset == 0 and len(chunks[0].data) == HEADER_BYTES
    sent = sorted((c.offset - HEADER_BYTES) // BLOCK for c in chunks[1:] for _ in range(len(c.data) // BLOCK))
    assert sum(len(c.data) for c in chunks[1:]) == 3 * BLOCK
    assert {(c.offset - HEADER_BYTES) // BLOCK for c in chunks[1:]} <= {1, 6} and len(sent) == 3
    full = await read_all(svc, "t1", chunk_bytes=4096)
    dst = tmp_path / "dst"
    rx = ChunkReceiver("t1", dst)
    for c in full:
        rx.write(c.offset, c.data)
    with rx.finish() as seg:
        assert seg.meta.sealed and bytes(seg.units_view(7)) == bytes([7]) * BLOCK
    rx.close()
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert stats.bytes_streamed == 2 * HEADER_BYTES + 11 * BLOCK and stats.active_reads == 0
    with pytest.raises(Aborted) as err:
        await read_all(svc, "t1", units=[99])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_read_renews_the_lease_and_stops_when_the_segment_vanishes(kv_dir):
    svc, clock = service(kv_dir, lease_s=5.0)
    st = await start(svc, kv_dir, "t1")
    gen = svc.Read(kvtransfer_pb2.ReadRequest(transfer_id="t1", chunk_bytes=4096), Ctx())
    await gen.__anext__()  # header
    clock.t += 4.0
    await gen.__anext__()  # first data chunk: lease renewed to now + 5
    clock.t += 4.0
    await svc.sweep()
    assert svc.transfers["t1"].state == S.READY
    pathlib.Path(st.kv.location).unlink()  # the source's memory is gone mid-stream
    with pytest.raises(Aborted) as err:
        await gen.__anext__()
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "vanished" in err.value.details
    assert svc.transfers["t1"].state == S.FAILED
    stats = await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())
    assert stats.failed == 1 and stats.active_reads == 0


async def test_read_of_an_ended_transfer_is_refused(kv_dir):
    svc, _ = service(kv_dir)
    await start(svc, kv_dir, "t1")
    await svc.Release(kvtransfer_pb2.ReleaseTransferRequest(transfer_id="t1"), Ctx())
    with pytest.raises(Aborted) as err:
        await read_all(svc, "t1")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "RELEASED" in err.value.details
    with pytest.raises(Aborted) as err:
        await read_all(svc, "unknown")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_orphan_sweep_spares_active_transfers_and_subdirectories(kv_dir):
    import os
    import time

    svc, _ = service(kv_dir)
    make_segment(kv_dir, "orphan")
    (kv_dir / "stale.tmp").write_bytes(b"x")
    (kv_dir / "pool").mkdir(exist_ok=True)
    make_segment(kv_dir / "pool", "parked")
    old = time.time() - 100
    for p in kv_dir.rglob("*"):
        os.utime(p, (old, old))
    assert svc.remove_orphans(older_than_s=10) == 2
    assert [p.name for p in kv_dir.rglob("*.kv")] == ["parked.kv"]


def test_config_fields_flags_env_and_validation():
    import argparse

    ns = argparse.Namespace()
    cfg = config_from_namespace(KvTransferConfig, ns, {"DUOPOOL_KV_POOL_GIB": "0.5", "DUOPOOL_KV_POOL_POLICY": "priority"})
    assert cfg.kv_pool_gib == 0.5 and cfg.kv_pool_bytes == 1 << 29 and cfg.kv_pool_policy == "priority"
    for env, field in [({"DUOPOOL_KV_POOL_GIB": "-1"}, "kv_pool_gib"), ({"DUOPOOL_KV_POOL_GIB": "nan"}, "kv_pool_gib"),
                       ({"DUOPOOL_KV_POOL_GIB": "lots"}, "kv_pool_gib"),
                       ({"DUOPOOL_KV_POOL_POLICY": "fifo"}, "kv_pool_policy"),
                       ({"DUOPOOL_KV_READ_MAX_MIB_S": "-2"}, "read_max_mib_s"),
                       ({"DUOPOOL_KV_LEASE_S": "0"}, "lease_s")]:
        with pytest.raises(ConfigError) as err:
            config_from_namespace(KvTransferConfig, ns, env)
        assert err.value.field == field
    w = config_from_namespace(WorkerConfig, ns, {"REDIS_URL": "redis://x", "DUOPOOL_HOST_ID": "h9"})
    assert w.host_id == "h9" and w.kv_pull_timeout_s > 0
    with pytest.raises(ConfigError) as err:
        config_from_namespace(WorkerConfig, ns, {"REDIS_URL": "redis://x", "DUOPOOL_KV_PULL_TIMEOUT_S": "0"})
    assert err.value.field == "kv_pull_timeout_s"


async def test_an_ended_transfer_frees_its_location_and_is_forgotten_oldest_first(kv_dir):
    """Park by location refuses only a segment of a transfer still active (kept in O(1), not by scanning the
    ended transfers remembered for late callers), and ended transfers are forgotten after KEEP_ENDED_S."""
    svc, clock = service(kv_dir)
    await start(svc, kv_dir, "t1")
    await svc.CompleteTransfer(kvtransfer_pb2.CompleteTransferRequest(transfer_id="t1", ok=True), Ctx())
    path = make_segment(kv_dir, "t1")  # a new segment where the ended transfer's was
    parked = await svc.Park(kvtransfer_pb2.ParkRequest(key="k1", location=str(path)), Ctx())
    assert parked.key == "k1" and not path.exists()
    await start(svc, kv_dir, "t2")
    clock.t += KEEP_ENDED_S + 1
    await svc.sweep()  # t2's lease ran out now; t1 ended long ago
    assert "t1" not in svc.transfers and svc.transfers["t2"].state == S.EXPIRED
    assert (await svc.Stats(kvtransfer_pb2.KvStatsRequest(), Ctx())).active_transfers == 0
    clock.t += KEEP_ENDED_S + 1
    await svc.sweep()
    assert not svc.transfers
