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
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        rest = up.stderr.read()
        assert "stopped" in rest
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
