"""`duopool up` as a user runs it: starts, answers, and Ctrl-C (SIGINT) stops everything it started."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_up_serves_generate_then_stops_cleanly_on_ctrl_c(tmp_path):
    env = {**os.environ, "DUOPOOL_CACHE_DIR": str(tmp_path / "cache")}
    up = subprocess.Popen([sys.executable, "-m", "duopool.cli.main", "up", "--engine", "sim", "--port", "0",
                           "--run-dir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True)
    try:
        address = None
        deadline = time.monotonic() + 90
        lines = []
        while time.monotonic() < deadline and address is None:
            line = up.stderr.readline()
            lines.append(line)
            m = re.search(r"router at (\S+)", line)
            address = m.group(1) if m else None
        assert address, "".join(lines)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6  # redis, scheduler, kvtransfer, 2 workers, router
        gen = subprocess.run([sys.executable, "-m", "duopool.cli.main", "generate", "--router", address,
                              "--max-tokens", "5", "one two three"], capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr
        assert len(gen.stdout.split()) == 5 and "SIMULATED" in gen.stderr
        # its trace, kept by `duopool up`, as a tree in the terminal (found without flags)
        tid = re.search(r"trace ([0-9a-f]{32})", gen.stderr).group(1)
        env_cli = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": ""}

        def tree():
            t = subprocess.run([sys.executable, "-m", "duopool.cli.main", "trace", tid], capture_output=True,
                               text=True, timeout=30, env=env_cli)
            names = ("/duopool.v1.Router/Generate", "duopool.schedule", "duopool.engine.prefill",
                     "duopool.engine.decode")  # each service exports in its own batches: wait for all
            return t.stdout if t.returncode == 0 and all(n in t.stdout for n in names) else None
        from tests.conftest import wait_for

        out = wait_for(tree, 20, interval=0.5, what=f"`duopool trace {tid}`")
        for name in ("/duopool.v1.Router/Generate", "duopool.schedule", "duopool.engine.prefill", "duopool.engine.decode"):
            assert name in out, out
        assert re.search(r"\d+\.\d ms", out)
        # metrics: the router's /metrics (on its HTTP port) counts the request
        import json
        import urllib.request

        state = json.loads((tmp_path / "cache" / "current-cluster.json").read_text())
        page = urllib.request.urlopen(state["metrics"]["router"], timeout=10).read().decode()
        assert 'duopool_requests_total{class="online",status="ok"} 1.0' in page
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        rest = up.stderr.read()
        assert "stopped" in rest
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
