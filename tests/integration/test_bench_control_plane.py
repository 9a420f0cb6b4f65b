"""`duopool bench control-plane` runs end to end (real processes, SIMULATED workers) and writes what it says:
per layout and rate, the added latency, the achieved rate and every service's CPU per request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_control_plane_bench_writes_its_figures(tmp_path):
    out = subprocess.run([sys.executable, "-m", "duopool.cli.main", "bench", "control-plane", "--rates", "20",
                          "--seconds", "2", "--layout", "pd,mixed", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "control_plane.json").read_text())
    assert report["engine"].startswith("sim") and report["engine_ms"] > 0
    hop = report["grpc_hop"]  # the floor one bare gRPC hop costs here
    assert hop["calls"] > 0 and hop["client_cpu_ms_per_call"] > 0 and hop["latency_ms_per_call"] > 0
    for layout in ("pd", "mixed"):
        (row,) = report["layouts"][layout]["rows"]
        assert row["offered"] > 10 and row["completed"] == row["offered"] and not row["errors"]
        assert 0 < row["added_p50_ms"] <= row["added_p99_ms"]
        cpu = row["cpu_ms_per_request"]
        assert {"router", "scheduler", "kvtransfer", "client"} <= set(cpu) and cpu["router"] > 0
        workers = {"prefill-0", "decode-0"} if layout == "pd" else {"mixed-0"}
        assert workers <= set(cpu)
        assert f"[{layout}]" in out.stdout
