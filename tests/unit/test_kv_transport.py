"""Unit tests of the KV transport interface, the received map, the fake, shm and the gRPC chunk codec."""

from __future__ import annotations

import os
import threading

import pytest

from duopool.kv.segment import KvSegment, SegmentError, segment_path, unlink_segment
from duopool.kv.transport import (
    Endpoint,
    LocalCopyTransport,
    TransferError,
    available_transports,
    choose_transport,
    get_transport,
    split_runs,
)
from duopool.kv.transport.testing import digest, make_meta, make_segment

pytestmark = pytest.mark.unit


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    monkeypatch.setenv("DUOPOOL_KV_DIR", str(src))
    return src, dst


# -- choice ---------------------------------------------------------------------------------------------
def test_choose_transport_rules():
    cpu = frozenset({"shm", "gloo", "grpc"})
    gpu = frozenset({"shm", "nccl", "ucx", "gloo", "grpc"})
    a, b = Endpoint("a", "h1", cpu), Endpoint("b", "h1", cpu)
    assert choose_transport(a, b) == "shm"
    assert choose_transport(a, Endpoint("c", "h2", cpu)) == "gloo"
    assert choose_transport(Endpoint("a", "h1", frozenset()), Endpoint("c", "h2", cpu)) == "grpc"
    g1, g2 = Endpoint("g1", "h1", gpu, "cuda"), Endpoint("g2", "h2", gpu, "cuda")
    assert choose_transport(g1, g2) == "nccl"
    assert choose_transport(g1, Endpoint("g3", "h1", gpu, "cuda")) == "nccl"  # device to device on one host
    assert choose_transport(g1, g2, available=["ucx", "gloo"]) == "ucx"
    assert choose_transport(g1, Endpoint("c", "h2", gpu, "cpu")) == "ucx"  # GPU to a CPU host
    assert choose_transport(g1, g2, available=[]) == "grpc"


def test_registry_and_availability():
    assert get_transport("shm").name == "shm"
    assert get_transport("grpc").push is False
    with pytest.raises(KeyError):
        get_transport("carrier-pigeon")
    names = available_transports()
    assert {"shm", "gloo", "grpc"} <= set(names)
    assert "nccl" not in names and "ucx" not in names  # no GPU / ucxx here


def test_split_runs():
    assert split_runs([(0, 5), (10, 2)], 2) == [(0, 2), (2, 2), (4, 1), (10, 2)]


# -- segment received map -------------------------------------------------------------------------------
def test_block_map_marks_and_resets(dirs):
    src, _ = dirs
    seg = KvSegment.create(segment_path("t1", src), make_meta("t1", 2, 3, 64), block_map=True)
    assert seg.missing_runs() == [(0, 6)]
    seg.mark_units(1, 2)
    seg.mark_units(5)
    assert seg.missing_runs() == [(0, 1), (3, 2)]
    assert seg.missing_units() == [0, 3, 4]
    seg.mark_units(0, 6)
    assert seg.is_complete()
    seg.seal()
    seg.close()
    with KvSegment.open(segment_path("t1", src)) as r:  # readers ignore the trailer
        assert r.meta.sealed and r.data_view().nbytes == 6 * 64
    w = KvSegment.open(segment_path("t1", src), require_sealed=False, writable=True)
    w.reset_received()
    assert w.missing_runs() == [(0, 6)] and not w.meta.sealed
    w.close()
    with pytest.raises(SegmentError):
        KvSegment.open(segment_path("t1", src))


def test_segment_without_map_is_complete_iff_sealed(dirs):
    src, _ = dirs
    seg = make_segment(src, "plain", 2, 2, 64, seal=False)
    assert seg.missing_runs() == [(0, 4)]
    seg.seal()
    assert seg.missing_runs() == []
    seg.close()


def test_write_layer_writes_each_layer_and_checks_its_size(dirs):
    src, _ = dirs
    meta = make_meta("wl", 3, 4, 64)
    layers = [bytes((li * 7 + i) % 251 for i in range(4 * 64)) for li in range(3)]
    seg = KvSegment.create(segment_path("wl", src), meta)
    for li in (2, 0, 1):  # any order
        seg.write_layer(li, layers[li])
    with pytest.raises(ValueError, match="256"):
        seg.write_layer(0, b"short")
    with pytest.raises(IndexError):
        seg.write_layer(3, layers[0])
    seg.seal_with_checksum()
    seg.close()
    with KvSegment.open(segment_path("wl", src), populate=True) as back:
        assert [bytes(back.layer_view(li)) for li in range(3)] == layers and back.verify()
        with pytest.raises(SegmentError):
            back.write_layer(0, layers[0])  # read-only
    with KvSegment.open(segment_path("wl", src), require_sealed=False, writable=True) as again:
        again.write_layer(1, layers[0])  # reopened: through the mapping
    with KvSegment.open(segment_path("wl", src)) as back:
        assert bytes(back.layer_view(1)) == layers[0] and not back.verify()  # the checksum catches it


# -- the fake: resume and idempotency -------------------------------------------------------------------
def test_local_fake_resumes_after_failure_and_is_idempotent(dirs):
    src, dst = dirs
    make_segment(src, "r1", 4, 8, 256, seed=3).close()
    t = LocalCopyTransport(src, dst, fail_after_units=10, units_per_piece=4)
    with pytest.raises(TransferError):
        t.receive("r1")
    with pytest.raises(SegmentError):
        KvSegment.open(segment_path("r1", dst))  # partial: unsealed
    with KvSegment.open(segment_path("r1", dst), require_sealed=False) as part:
        assert len(part.missing_units()) == 32 - 8
    res = t.receive("r1")
    assert (res.units_moved, res.units_skipped) == (24, 8)
    assert digest(segment_path("r1", dst)) == digest(segment_path("r1", src))
    again = t.receive("r1")
    assert again.units_moved == 0 and again.units_skipped == 32


# -- shm ------------------------------------------------------------------------------------------------
def test_shm_receive_and_load_into(dirs):
    src, _ = dirs
    shm = get_transport("shm")(src)
    seg = make_segment(src, "s1", 3, 4, 128, seed=1)
    expected = bytes(seg.data_view())
    seg.close()
    assert shm.send("s1").state == "ready"
    assert shm.receive("s1").location == str(segment_path("s1", src))
    buf = bytearray(len(expected))
    res = shm.load_into("s1", buf)
    assert bytes(buf) == expected and res.bytes_moved == len(expected)
    with pytest.raises(SegmentError):
        shm.receive("missing", timeout_s=0.01)


def test_shm_streams_layers_before_seal(dirs):
    src, _ = dirs
    shm = get_transport("shm")(src)
    seg = KvSegment.create(segment_path("st", src), make_meta("st", 4, 4, 64), block_map=True)
    payload = os.urandom(seg.meta.data_bytes)
    buf = bytearray(len(payload))
    result = {}

    def consumer():
        result["r"] = shm.load_into("st", buf, stream=True, timeout_s=5)

    th = threading.Thread(target=consumer)
    th.start()
    for layer in range(4):  # the producer writes layer by layer (as save_kv_layer would)
        lo = layer * 4 * 64
        seg.layer_view(layer)[:] = payload[lo : lo + 4 * 64]
        seg.mark_units(layer * 4, 4)
    th.join(5)
    seg.seal()
    seg.close()
    assert bytes(buf) == payload and result["r"].units_moved == 16


# -- gRPC chunk codec (no network) ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [4096, 300 * 4])  # whole units per chunk / pieces of one unit
def test_grpc_chunks_roundtrip_idempotent_and_resumable(dirs, chunk):
    from duopool.kv.transport.grpc_stream import ChunkReceiver, iter_segment_chunks

    src, dst = dirs
    seg = make_segment(src, "g1", 3, 5, 4096 if chunk == 4096 else 3000, seed=7)
    chunks = [(o, bytes(d)) for o, d in iter_segment_chunks(seg, chunk)]
    assert chunks[0][0] == 0
    rx = ChunkReceiver("g1", dst)
    half = len(chunks) // 2
    for o, d in chunks[:half]:
        rx.write(o, d)
    with pytest.raises(TransferError):
        rx.finish()
    rx.close()
    rx2 = ChunkReceiver("g1", dst)  # resume: a new receiver, same file
    for o, d in chunks + chunks[1:3]:  # everything again, plus re-sent chunks
        rx2.write(o, d)
    rx2.finish().close()
    assert rx2.units_skipped > 0
    assert digest(segment_path("g1", dst)) == digest(segment_path("g1", src))
    seg.close()
    assert unlink_segment(segment_path("g1", dst))


def test_grpc_receiver_rejects_wrong_transfer(dirs):
    from duopool.kv.transport.grpc_stream import ChunkReceiver, iter_segment_chunks

    src, dst = dirs
    seg = make_segment(src, "a", 1, 1, 64)
    off, head = next(iter_segment_chunks(seg))
    with pytest.raises(TransferError):
        ChunkReceiver("b", dst).write(off, bytes(head))
    seg.close()


MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev,size=65536k 0 0
tmpfs /mnt/huge tmpfs rw,relatime,size=2097152k,huge=within_size 0 0
tmpfs /mnt/never tmpfs rw,relatime,huge=never 0 0
tmpfs /mnt/my\\040dir tmpfs rw,huge=always 0 0
"""


@pytest.mark.parametrize(("directory", "want"), [
    ("/dev/shm/duopool-kv", ""),
    ("/mnt/huge/duopool-kv", "huge=within_size"),
    ("/mnt/huge", "huge=within_size"),
    ("/mnt/hugepages/kv", ""),  # a prefix of the name is not the mount
    ("/mnt/never/kv", ""),
    ("/mnt/my dir/kv", "huge=always"),
    ("/var/tmp/kv", ""),  # not a tmpfs
])
def test_huge_page_tmpfs_is_recognised(directory, want):
    import pathlib

    from duopool.kv.segment import huge_pages

    assert huge_pages(pathlib.Path(directory), MOUNTS) == want
