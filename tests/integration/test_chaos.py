"""Chaos under `duopool up` (real processes, SIMULATED workers): kill -9 of each kind of service — and of
Redis — while online requests flow and a batch job runs, with `duopool up`'s supervisor doing every restart.
Online failures may only be clean statuses within the request's deadline; the batch ends with every request
answered exactly once and exactly right. Prints the figures (failed online requests and recovery seconds
per kind) for the closing note.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest

from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration

DEADLINE_S = 8.0
CLEAN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL", "RESOURCE_EXHAUSTED"}
KINDS = ["kvtransfer", "decode-0", "prefill-0", "scheduler", "router", "redis"]


def child(up: subprocess.Popen, kind: str) -> psutil.Process | None:
    for p in psutil.Process(up.pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if kind == "redis" and ("redis-server" in cmd or "valkey-server" in cmd):
            return p
        if kind in ("kvtransfer", "scheduler", "router") and f"serve {kind} " in cmd + " " and "duopool" in cmd:
            return p
        if kind.startswith(("prefill", "decode")) and "serve worker" in cmd and f"--worker-id {kind}" in cmd:
            return p
    return None


def test_kill_every_service_kind_under_load_supervisor_restarts_and_nothing_is_lost(tmp_path):
    env = {**os.environ, "DUOPOOL_CACHE_DIR": str(tmp_path / "cache"), "OTEL_TRACES_EXPORTER": "none",
           "DUOPOOL_SIM_SPEEDUP": "0.5"}
    up = subprocess.Popen([sys.executable, "-m", "duopool.cli.main", "up", "--engine", "sim", "--port", "0",
                           "--http-port", "0", "--run-dir", str(tmp_path / "run")], stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(up.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        state_path = tmp_path / "cache" / "current-cluster.json"
        wait_for(lambda: state_path.exists(), 90, what="duopool up to write its state file")
        state = json.loads(state_path.read_text())
        assert oct(state_path.stat().st_mode & 0o777) == "0o600"  # it holds the cluster token
        ch = grpc.insecure_channel(state["router"])
        router = router_pb2_grpc.RouterStub(ch)
        wait_for(lambda: len(router.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5).workers) == 2, 60,
                 what="workers")
        prompts = {f"c{i}": f"chaos job item {i} " * 3 for i in range(30)}
        router.SubmitBatch(router_pb2.SubmitBatchRequest(job_id="chaos-job", requests=[
            router_pb2.BatchItem(custom_id=c, text=t, max_tokens=20) for c, t in prompts.items()]), timeout=10)

        calls: list[tuple[float, float, str]] = []
        stop = threading.Event()

        def online():
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    msgs = list(router.Generate(router_pb2.GenerateRequest(
                        text=f"online {i}", max_tokens=6, request_class=common_pb2.ONLINE), timeout=DEADLINE_S))
                    code = "OK" if msgs[-1].summary.output_tokens == 6 else "SHORT"
                except grpc.RpcError as exc:
                    code = exc.code().name
                calls.append((t0, time.monotonic(), code))
                i += 1
                time.sleep(0.05)

        load = threading.Thread(target=online)
        load.start()
        figures = {}
        for kind in KINDS:
            proc = child(up, kind)
            assert proc is not None, f"no {kind} process"
            t_kill = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            wait_for(lambda k=kind, old=proc.pid: (c := child(up, k)) is not None and c.pid != old, 60,
                     what=f"the supervisor to restart {kind}")

            def ok_after(t=t_kill):
                return any(code == "OK" and start > t for start, _, code in calls)

            wait_for(ok_after, 60, interval=0.1, what=f"an online request to succeed after killing {kind}")
            first_ok = min(end for start, end, code in calls if code == "OK" and start > t_kill)
            failed = sum(1 for start, _, code in calls if start >= t_kill and code != "OK" and start < first_ok)
            figures[kind] = {"recovery_s": round(first_ok - t_kill, 2), "failed_online": failed}
            time.sleep(1.0)
        stop.set()
        load.join(30)
        bad = [(round(e - s, 2), c) for s, e, c in calls if c != "OK" and (c not in CLEAN or e - s > DEADLINE_S + 2)]
        assert not bad, f"unclean or late failures: {bad[:10]}"
        codes: dict[str, int] = {}
        for _, _, c in calls:
            codes[c] = codes.get(c, 0) + 1
        print("chaos figures:", json.dumps(figures), "online calls:", codes)

        def done():
            st = router.GetBatch(router_pb2.GetBatchRequest(job_id="chaos-job"), timeout=5)
            return st if st.state == router_pb2.DONE else None
        st = wait_for(done, 180, interval=0.5, what="the batch job to finish")
        assert (st.done, st.failed) == (30, 0)
        results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id="chaos-job"), timeout=30))
        assert sorted(r.custom_id for r in results) == sorted(prompts), "every request exactly once"
        for r in results:
            assert list(r.token_ids) == sim_expected_tokens(sim_tokenize(prompts[r.custom_id]), 20), r.custom_id
        restarts = [ln for ln in log if "supervisor:" in ln]
        assert len(restarts) >= len(KINDS), "".join(log[-30:])
        ch.close()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
