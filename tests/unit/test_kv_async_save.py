"""The vLLM connector's save off the forward pass (``AsyncSaver``): layers handed over by the forward pass are
written and sealed on a background thread; the step does not wait; a decode sees the segment only once
sealed; a failed write leaves no segment; an unsealed segment is never recycled under its writer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from duopool.kv import recycle
from duopool.kv.segment import KvSegment, is_sealed, segment_path, unlink_segment

pytest.importorskip("vllm", reason="the connector module imports vLLM's connector base")
from duopool.worker.kv_connector import AsyncSaver, SaveOp  # noqa: E402

pytestmark = pytest.mark.unit

LAYERS = ("model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn")
BLOCK = 16


@pytest.fixture()
def kvdir(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOPOOL_KV_RECYCLE_MIB", "4")
    monkeypatch.setattr(recycle, "_CACHE", None)
    return tmp_path


def _caches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 2, BLOCK, 2, 8, generator=g).to(torch.float16) for _ in LAYERS]


def _op(kvdir, tid: str, blocks: list[int]) -> SaveOp:
    return SaveOp(f"req-{tid}", tid, str(segment_path(tid, kvdir)), blocks, len(blocks) * BLOCK)


def _wait_done(saver: AsyncSaver, rid: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not saver.done(rid):
        assert time.monotonic() < deadline, f"{rid}: save not done"
        time.sleep(0.002)


def _save(saver: AsyncSaver, op: SaveOp, caches: list[torch.Tensor]) -> None:
    for li, kv in enumerate(caches):
        saver.layer(op, li, kv)
    saver.end_step()


def test_every_layer_of_the_requests_blocks_lands_in_a_sealed_segment(kvdir):
    caches = _caches()
    saver = AsyncSaver(LAYERS, BLOCK)
    a, b = _op(kvdir, "a1", [7, 2, 9]), _op(kvdir, "b1", [0, 11])
    for li, kv in enumerate(caches):  # two requests in one step, interleaved by layer as the forward pass does
        saver.layer(a, li, kv)
        saver.layer(b, li, kv)
    saver.end_step()
    for op in (a, b):
        _wait_done(saver, op.req_id)
        with KvSegment.open(segment_path(op.transfer_id, kvdir)) as seg:
            assert seg.meta.num_blocks == len(op.block_ids) and seg.meta.num_tokens == op.num_tokens
            for li, kv in enumerate(caches):
                got = torch.frombuffer(seg.layer_view(li), dtype=torch.uint8).view(torch.float16)
                want = kv[op.block_ids]
                assert torch.equal(got.view(want.shape), want)
    assert saver.pending() == 0
    assert saver.stats["segments"] == 2 and saver.stats["bytes"] == sum(
        len(LAYERS) * len(op.block_ids) * caches[0][0].numel() * 2 for op in (a, b))


def test_the_step_does_not_wait_for_the_copy_and_the_segment_is_unsealed_until_it_is_done(kvdir):
    saver = AsyncSaver(LAYERS, BLOCK)
    gate = threading.Event()
    real_write = saver._write

    def slow_write(*args):
        gate.wait(10)
        real_write(*args)

    saver._write = slow_write
    op = _op(kvdir, "s1", [1, 3])
    _save(saver, op, _caches())  # returns although no layer is written yet
    path = segment_path("s1", kvdir)
    assert is_sealed(path) is False  # created (its size known) but not sealed: a decode waits for it
    assert not saver.done(op.req_id)
    gate.set()
    _wait_done(saver, op.req_id)
    assert is_sealed(path) is True


def test_a_failed_write_leaves_no_segment_and_is_reported_done(kvdir):
    saver = AsyncSaver(LAYERS, BLOCK)
    caches = _caches()
    op = _op(kvdir, "f1", [1, 2])
    saver.layer(op, 0, caches[0])
    saver.layer(op, 1, caches[1][:, :, :8])  # a layer of another shape: its gather fails
    saver.layer(op, 2, caches[2])
    saver.end_step()
    _wait_done(saver, op.req_id)  # the blocks can be freed: the decode recomputes
    assert is_sealed(segment_path("f1", kvdir)) is None


def test_a_request_without_a_save_is_done_at_once(kvdir):
    assert AsyncSaver(LAYERS, BLOCK).done("never-saved")


def test_an_unsealed_segment_is_unlinked_not_recycled_and_a_sealed_one_is_recycled(kvdir):
    saver = AsyncSaver(LAYERS, BLOCK)
    gate = threading.Event()
    real_write = saver._write
    saver._write = lambda *args: (gate.wait(10), real_write(*args))
    op = _op(kvdir, "u1", [4, 5, 6])
    _save(saver, op, _caches())
    path = segment_path("u1", kvdir)
    assert unlink_segment(path, recycle_file=True)  # released while its writer is still at it
    assert not path.exists() and not list((kvdir / recycle.FREE_DIR).glob("*.kv"))
    gate.set()
    _wait_done(saver, op.req_id)  # the writer finished into the unlinked file, harming nothing
    assert not path.exists()
    op2 = _op(kvdir, "u2", [4, 5, 6])
    _save(saver, op2, _caches())
    _wait_done(saver, op2.req_id)
    unlink_segment(segment_path("u2", kvdir), recycle_file=True)
    assert len(list((kvdir / recycle.FREE_DIR).glob("*.kv"))) == 1
