"""Conversions between protobuf enums/messages and the plain values used inside the services."""

from __future__ import annotations

from duopool.common.registry import WorkerRecord
from duopool.v1 import common_pb2

ROLE_PB = {"prefill": common_pb2.PREFILL, "decode": common_pb2.DECODE, "mixed": common_pb2.MIXED}
POOL_PB = {"strict": common_pb2.STRICT, "relaxed": common_pb2.RELAXED}
PB_ROLE = {v: k for k, v in ROLE_PB.items()}
PB_POOL = {v: k for k, v in POOL_PB.items()}


def worker_info_pb(w: WorkerRecord) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=w.worker_id, address=w.address, role=ROLE_PB.get(w.role, 0), pool=POOL_PB.get(w.pool, 0),
        engine=w.engine, model=w.model, max_model_len=w.max_model_len, block_size=w.block_size, host=w.host,
        running=w.running, waiting=w.waiting, kv_usage=w.kv_usage, last_heartbeat=w.last_heartbeat,
    )
