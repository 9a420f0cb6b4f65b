"""The router refuses to publish its API beyond loopback with no API key (DUOPOOL_PUBLISH_ADDR, set by compose)."""

import os
import subprocess
import sys

import pytest

from duopool.router.server import _is_loopback

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("::", False),
                                       ("10.1.2.3", False), ("api.example.com", False)])
def test_is_loopback(host, loop):
    assert _is_loopback(host) is loop


def test_router_published_beyond_loopback_without_a_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUOPOOL_API_KEYS")}
    env.update(DUOPOOL_PUBLISH_ADDR="0.0.0.0", DUOPOOL_TRACING="0", DUOPOOL_METRICS="0")
    p = subprocess.run([sys.executable, "-m", "duopool", "serve", "router", "--port", "0", "--http-port", "-1",
                        "--scheduler", "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "DUOPOOL_PUBLISH_ADDR=0.0.0.0" in p.stderr and "DUOPOOL_API_KEYS" in p.stderr, p.stderr[-2000:]
