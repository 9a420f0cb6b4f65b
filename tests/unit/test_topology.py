"""docker-compose.yml and the local launcher run the same topology (duopool/topology.py)."""

import pathlib

import pytest

from duopool.cli.main import build_parser
from duopool.topology import Topology, compose_services, render_compose, render_prometheus

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_compose_file_is_the_rendered_topology():
    assert (ROOT / "docker-compose.yml").read_text() == render_compose(), \
        "docker-compose.yml is stale: python -m duopool.topology > docker-compose.yml"


def test_committed_prometheus_config_is_the_rendered_topology():
    assert (ROOT / "deploy" / "prometheus.yml").read_text() == render_prometheus(), \
        "deploy/prometheus.yml is stale: python -m duopool.topology prometheus > deploy/prometheus.yml"


def test_every_compose_command_parses_with_the_cli():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    parser = build_parser()
    names = {s.name for s in compose_services(Topology())}
    assert names <= set(doc["services"])
    for name in names:
        args = parser.parse_args(doc["services"][name]["command"])
        assert args.command == "serve" and callable(args.func)
    loopback_uis = ("jaeger", "prometheus", "grafana")  # observability UIs: on 127.0.0.1 only
    published = [n for n, s in doc["services"].items() if s.get("ports") and n not in loopback_uis]
    assert published == ["router"], "only the router may be public"
    for name in loopback_uis:
        assert all(p.startswith("127.0.0.1:") for p in doc["services"][name].get("ports", [])), name


def test_compose_redis_has_a_password_and_no_admin_commands():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cmd = doc["services"]["redis"]["command"]
    assert cmd[cmd.index("--requirepass") + 1] == "${DUOPOOL_REDIS_PASSWORD:-}"
    renamed = {cmd[i + 1] for i, x in enumerate(cmd) if x == "--rename-command" and cmd[i + 2] == ""}
    assert {"CONFIG", "DEBUG", "SHUTDOWN"} <= renamed
    for name in {s.name for s in compose_services(Topology())}:
        svc = doc["services"][name]
        assert not any("redis://" in a for a in svc["command"]), f"{name}: the Redis URL must not be in argv"
        if name != "kvtransfer":
            assert svc["environment"]["REDIS_URL"] == "redis://:${DUOPOOL_REDIS_PASSWORD:-}@redis:6379/0", name
