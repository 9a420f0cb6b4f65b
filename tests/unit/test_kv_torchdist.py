"""The torch.distributed push protocol (shared by gloo, NCCL and UCX) up to the device call.

Both ranks of a gloo pair run in threads of this process; NCCL's DeviceBlocks (paged caches) run on CPU
tensors, so the exact code the GPU path uses is exercised except ProcessGroupNCCL itself.
"""

from __future__ import annotations

import datetime
import threading

import pytest

torch = pytest.importorskip("torch")

from duopool.kv.segment import KvSegment, segment_path  # noqa: E402
from duopool.kv.transport import TransferError, get_transport  # noqa: E402
from duopool.kv.transport._torchdist import PairChannel, SegmentBlocks, receive_into_segments  # noqa: E402
from duopool.kv.transport.nccl import DeviceBlocks, NcclTransport, receive_blocks  # noqa: E402
from duopool.kv.transport.testing import digest, make_segment  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture()
def pair(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 2)
    pgs = [None, None]

    def make(rank):
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        opts._timeout = datetime.timedelta(seconds=20)
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, opts)

    ts = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    chans = [PairChannel(pgs[r], r, "cpu", window=2, timeout_s=20) for r in (0, 1)]
    yield chans
    for c in chans:
        c.pg.shutdown()


def _run_both(send, recv):
    out = {}

    def rx():
        try:
            out["recv"] = recv()
        except Exception as exc:
            out["recv_err"] = exc

    th = threading.Thread(target=rx)
    th.start()
    out["send"] = send()
    th.join(30)
    if "recv_err" in out:
        raise out["recv_err"]
    return out["send"], out["recv"]


def _paged(layers=3, nblocks=10, block=4, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, nblocks, block, heads, dim, generator=g, dtype=torch.float16) for _ in range(layers)]


def test_nccl_is_unavailable_here_with_a_reason():
    assert not NcclTransport.is_available()
    assert "nccl" in NcclTransport.unavailable_reason().lower() or "cuda" in NcclTransport.unavailable_reason().lower()
    assert not get_transport("ucx").is_available()


def test_device_blocks_to_device_blocks(pair):
    src_caches, dst_caches = _paged(seed=1), _paged(seed=2)
    src = DeviceBlocks(src_caches, [7, 2, 5], "req", block_size=4, piece_bytes=3 * 256)
    dst = DeviceBlocks(dst_caches, [0, 9, 4], "req", block_size=4)
    sent, got = _run_both(lambda: pair[0].push(src), lambda: receive_blocks(pair[1], lambda meta: dst))
    assert got.units_moved == 9 and sent.units_moved == 9
    for layer in range(3):
        for s, d in zip([7, 2, 5], [0, 9, 4], strict=True):
            assert torch.equal(src_caches[layer][:, s], dst_caches[layer][:, d])
    # an untouched destination block stays as it was
    assert not torch.equal(dst_caches[0][:, 1], src_caches[0][:, 1])


def test_device_blocks_to_segment_resume_and_idempotent(pair, tmp_path):
    caches = _paged(seed=3)
    src = DeviceBlocks(caches, [1, 3, 8, 6], "dev1", block_size=4, piece_bytes=512)
    # the destination already holds 5 of the 12 units (an interrupted transfer)
    d = tmp_path / "dst"
    from duopool.kv.transport import open_destination

    seg, _ = open_destination(src.meta, d)
    for u in range(5):
        seg.units_view(u)[:] = src.units_tensor(u, 1).numpy().tobytes()
        seg.mark_units(u)
    seg.close()
    _, got = _run_both(lambda: pair[0].push(src), lambda: receive_into_segments(pair[1], d, 1 << 20))
    assert (got.units_moved, got.units_skipped) == (7, 5)
    with KvSegment.open(segment_path("dev1", d)) as out:
        for u in range(12):
            assert bytes(out.units_view(u)) == src.units_tensor(u, 1).numpy().tobytes()
    sent, again = _run_both(lambda: pair[0].push(src), lambda: receive_into_segments(pair[1], d, 1 << 20))
    assert again.units_moved == 0 and sent.bytes_moved == 0


def test_segment_push_both_directions(pair, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_segment(a, "from0", 2, 8, 1024, seed=4).close()
    make_segment(b, "from1", 3, 4, 2048, seed=5).close()

    def push(rank, directory, tid):
        with KvSegment.open(segment_path(tid, directory)) as seg:
            return pair[rank].push(SegmentBlocks(seg, 4096))

    results = {}
    threads = [
        threading.Thread(target=lambda: results.setdefault("p0", push(0, a, "from0"))),
        threading.Thread(target=lambda: results.setdefault("p1", push(1, b, "from1"))),
        threading.Thread(target=lambda: results.setdefault("r1", receive_into_segments(pair[1], b, 4096))),
        threading.Thread(target=lambda: results.setdefault("r0", receive_into_segments(pair[0], a, 4096))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {"p0", "p1", "r0", "r1"} <= set(results)
    assert digest(segment_path("from0", b)) == digest(segment_path("from0", a))
    assert digest(segment_path("from1", a)) == digest(segment_path("from1", b))


def test_refused_destination_is_a_defined_error(pair):
    src = DeviceBlocks(_paged(), [0, 1], "bad", block_size=4)
    wrong = DeviceBlocks(_paged(layers=2), [0, 1], "bad", block_size=4)
    with pytest.raises(TransferError):
        _run_both(lambda: pair[0].push(src), lambda: receive_blocks(pair[1], lambda meta: wrong))
