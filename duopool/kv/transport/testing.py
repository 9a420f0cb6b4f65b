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
