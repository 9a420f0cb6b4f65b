"""KV transports between real processes: shm, gloo and gRPC; byte-exact, resumable, idempotent, no leaks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import subprocess
import sys

import pytest

from duopool.kv.segment import KvSegment, SegmentError, segment_path, unlink_segment
from duopool.kv.transport import LocalCopyTransport, TransferError
from duopool.kv.transport.testing import digest, gloo_peer, grpc_read_server, make_segment

pytestmark = pytest.mark.integration

CTX = mp.get_context("spawn")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    monkeypatch.setenv("DUOPOOL_KV_DIR", str(src))
    yield src, dst
    # nothing may be left behind but what the test created on purpose (removed here) — checked in tests


def _shm_leftovers() -> set[str]:
    """Names in /dev/shm, except the KV dirs of local clusters that may run alongside (other tests)."""
    d = pathlib.Path("/dev/shm")
    return {p.name for p in d.iterdir() if not p.name.startswith("duopool-kv-")} if d.exists() else set()


def _partial(src: pathlib.Path, dst: pathlib.Path, tid: str, units: int) -> None:
    """Leaves a partial destination segment with ``units`` units received (an interrupted transfer)."""
    with pytest.raises(TransferError):
        LocalCopyTransport(src, dst, fail_after_units=units, units_per_piece=1).receive(tid)


def test_shm_between_processes(dirs):
    src, _ = dirs
    before = _shm_leftovers()
    seg = make_segment(src, "shm1", 6, 16, 8192, seed=11)
    expected = digest(seg.path)
    seg.close()
    code = (
        "import sys, hashlib; from duopool.kv.transport.shm import ShmTransport\n"
        "t = ShmTransport(sys.argv[1]); r = t.receive('shm1', timeout_s=5)\n"
        "buf = bytearray(6 * 16 * 8192); t.load_into('shm1', buf)\n"
        "print(hashlib.sha256(buf).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    assert unlink_segment(segment_path("shm1", src))
    assert not list(src.iterdir())
    assert _shm_leftovers() <= before


def test_grpc_stream_resume_and_idempotent(dirs):
    src, dst = dirs
    from duopool.kv.transport.grpc_stream import GrpcStreamTransport

    before = _shm_leftovers()
    make_segment(src, "g1", 8, 16, 16384, seed=5).close()  # 2 MiB, 128 units
    parent, child = CTX.Pipe()
    server = CTX.Process(target=grpc_read_server, args=(str(src), child, 20))  # first stream dies at chunk 20
    server.start()
    try:
        port = parent.recv()
        with GrpcStreamTransport(f"127.0.0.1:{port}", dst, chunk_bytes=64 << 10) as t:
            with pytest.raises(TransferError):
                t.receive("g1", timeout_s=30)
            with KvSegment.open(segment_path("g1", dst), require_sealed=False) as part:
                left = len(part.missing_units())
            assert 0 < left < 128
            res = t.receive("g1", timeout_s=30)  # resume
            assert res.units_moved == left and res.units_skipped == 128 - left
            assert digest(segment_path("g1", dst)) == digest(segment_path("g1", src))
            again = t.receive("g1", timeout_s=30)  # idempotent: nothing moves
            assert again.units_moved == 0 and again.bytes_moved == 0
            with pytest.raises(TransferError):
                t.receive("nope", timeout_s=10)
    finally:
        parent.send("stop")
        server.join(20)
    assert server.exitcode == 0
    for d in (src, dst):
        for p in list(d.iterdir()):
            unlink_segment(p)
    assert _shm_leftovers() <= before


def test_gloo_push_resume_idempotent(dirs, tmp_path):
    src, dst = dirs
    before = _shm_leftovers()
    make_segment(src, "a", 8, 16, 16384, seed=1).close()
    make_segment(src, "b", 4, 8, 4096, seed=2).close()
    _partial(src, dst, "b", 10)  # b was interrupted after 10 of 32 units
    init = tmp_path / "gloo.init"
    p0, c0 = CTX.Pipe()
    p1, c1 = CTX.Pipe()
    ops_send = [("send", "a"), ("send", "b"), ("send", "a")]
    ops_recv = [("receive", "a"), ("receive", "b"), ("receive", None)]
    procs = [CTX.Process(target=gloo_peer, args=(0, str(init), str(src), ops_send, c0)),
             CTX.Process(target=gloo_peer, args=(1, str(init), str(dst), ops_recv, c1))]
    for p in procs:
        p.start()
    try:
        sent = [p0.recv() for _ in ops_send]
        got = [p1.recv() for _ in ops_recv]
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert all("error" not in r for r in sent + got), (sent, got)
    assert got[0]["units_moved"] == 128 and got[0]["state"] == "completed"
    assert (got[1]["units_moved"], got[1]["units_skipped"]) == (22, 10)  # resumed: only the missing units
    assert got[2]["units_moved"] == 0 and sent[2]["bytes_moved"] == 0  # idempotent re-send
    for tid in ("a", "b"):
        assert digest(segment_path(tid, dst)) == digest(segment_path(tid, src))
    assert not init.exists()  # rendezvous file removed once the pair is up
    for d in (src, dst):
        for p in list(d.iterdir()):
            unlink_segment(p)
        assert not list(d.iterdir())
    assert _shm_leftovers() <= before


def test_gloo_receiver_death_leaves_resumable_segment(dirs, tmp_path):
    """The sender sees a TransferError (defined end state) if the peer vanishes; no hang."""
    src, dst = dirs
    make_segment(src, "x", 2, 4, 4096, seed=3).close()
    init = tmp_path / "g2.init"
    p0, c0 = CTX.Pipe()
    p1, c1 = CTX.Pipe()
    sender = CTX.Process(target=gloo_peer, args=(0, str(init), str(src), [("send", "x")], c0))
    receiver = CTX.Process(target=gloo_peer, args=(1, str(init), str(dst), [], c1))  # connects, leaves
    sender.start()
    receiver.start()
    receiver.join(60)
    res = p0.recv() if p0.poll(60) else {"error": "no answer"}
    sender.join(30)
    assert "error" in res
    with pytest.raises(SegmentError):
        KvSegment.open(segment_path("x", dst))  # nothing sealed at the destination


def test_bench_kv_quick_smoke(tmp_path):
    env = {**os.environ, "DUOPOOL_KV_DIR": str(tmp_path / "kv")}
    out = subprocess.run([sys.executable, "-m", "duopool.cli.main", "bench", "kv", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "kv.json").read_text())
    assert data["memcpy_gb_s"] > 0
    for name in ("shm", "gloo", "grpc"):
        t = data["transports"][name]
        for size in ("256KiB", "4MiB", "64MiB"):
            assert t[size]["gb_s"] > 0
        assert t["request_latency_ms"] > 0
    # each shm repetition is a new transfer; with recycling on every one after the first reuses a file
    recycled, fresh = data["transports"]["shm"]["64MiB"], data["transports"]["shm-fresh"]["64MiB"]
    assert recycled["writes_into_recycled_files"] == recycled["reps"] and fresh["writes_into_recycled_files"] == 0
    assert recycled["write_gb_s"] > 0 and fresh["write_gb_s"] > 0
    assert not list((tmp_path / "kv").glob("*")) if (tmp_path / "kv").exists() else True
