"""Helpers for tests and the benchmark: synthetic sealed segments with checkable contents."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

from duopool.kv.segment import KvSegment, SegmentMeta, segment_path


def make_meta(transfer_id: str, num_layers: int, num_blocks: int, block_bytes: int, *, block_size: int = 16,
              dtype: str = "uint8") -> SegmentMeta:
    return SegmentMeta(
        transfer_id=transfer_id,
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_bytes=block_bytes,
        dtype=dtype,
        block_shape=(block_bytes,),
        block_size=block_size,
        num_tokens=num_blocks * block_size,
        layer_names=tuple(f"model.layers.{i}.self_attn" for i in range(num_layers)),
    )


def make_segment(directory: pathlib.Path, transfer_id: str, num_layers: int = 4, num_blocks: int = 8,
                 block_bytes: int = 4096, *, seed: int = 0, block_map: bool = False, seal: bool = True) -> KvSegment:
    """Creates a segment filled with seeded random bytes (sealed unless ``seal=False``). Caller closes it."""
    meta = make_meta(transfer_id, num_layers, num_blocks, block_bytes)
    seg = KvSegment.create(segment_path(transfer_id, pathlib.Path(directory)), meta, block_map=block_map)
    data = np.frombuffer(seg.data_view(), np.uint8)
    data[:] = np.random.default_rng(seed).integers(0, 256, size=data.size, dtype=np.uint8)
    del data
    if block_map:
        seg.mark_units(0, seg.num_units)
    if seal:
        seg.seal()
    return seg


def digest(path: pathlib.Path) -> str:
    """sha256 of a sealed segment's data bytes."""
    with KvSegment.open(path) as seg:
        h = hashlib.sha256(seg.data_view()).hexdigest()
    return h


# -- process entry points (spawned by the integration tests; importable by multiprocessing "spawn") -------
def gloo_peer(rank: int, init_file: str, kv_dir: str, ops: list[tuple[str, str | None]], conn) -> None:
    """Connects rank ``rank`` of a gloo pair and runs ops [("send"|"receive", transfer_id)], reporting
    each TransferResult (as a dict) or the error text through ``conn``."""
    from dataclasses import asdict

    from duopool.kv.transport.gloo import GlooTransport

    t = GlooTransport.connect(rank, init_file, kv_dir, timeout_s=30, piece_bytes=64 << 10)
    try:
        for op, tid in ops:
            try:
                res = t.send(tid) if op == "send" else t.receive(tid)
                conn.send(asdict(res))
            except Exception as exc:  # reported to the test
                conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        t.close()
        conn.close()


def grpc_read_server(kv_dir: str, conn, fail_after_chunks: int | None = None) -> None:
    """Serves ``Read`` from ``kv_dir`` on a free 127.0.0.1 port; sends the port, stops on any message."""
    from duopool.kv.transport.grpc_stream import serve_read

    server, port = serve_read(kv_dir, fail_after_chunks=fail_after_chunks)
    conn.send(port)
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop(0).wait()
    conn.close()
