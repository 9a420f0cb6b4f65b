"""docker-compose.yml and the local launcher run the same topology (duopool/topology.py)."""

import pathlib

import pytest

from duopool.cli.main import build_parser
from duopool.topology import Topology, compose_services, render_compose, render_compose_gpu, render_prometheus

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_compose_file_is_the_rendered_topology():
    assert (ROOT / "docker-compose.yml").read_text() == render_compose(), \
        "docker-compose.yml is stale: python -m duopool.topology > docker-compose.yml"


def test_committed_gpu_override_is_the_rendered_topology():
    assert (ROOT / "docker-compose.gpu.yml").read_text() == render_compose_gpu(), \
        "docker-compose.gpu.yml is stale: python -m duopool.topology gpu > docker-compose.gpu.yml"


def test_compose_services_restart_wait_for_health_and_keep_the_baked_model():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ours = {s.name: s for s in compose_services(Topology())}
    for name, svc in doc["services"].items():
        assert svc.get("restart") == "unless-stopped", name
    for name, spec in ours.items():
        svc = doc["services"][name]
        hc = svc["healthcheck"]
        assert hc["test"][-1] == f"127.0.0.1:{spec.flags['port']}" and hc["timeout"] and hc["start_period"], name
        assert svc["deploy"]["resources"]["limits"]["memory"], name
        for dep, cond in svc.get("depends_on", {}).items():  # started once healthy, not merely started
            assert cond == {"condition": "service_healthy"} and "healthcheck" in doc["services"][dep], (name, dep)
        mounts = [v.split(":")[1] for v in svc.get("volumes", [])]
        assert not any(m.startswith("/root") or m.startswith("/opt/duopool") for m in mounts), \
            f"{name}: a volume would shadow the image's model checkpoint"
        if spec.service == "worker":  # vLLM's CPU engine needs more than Docker's 64 MiB of /dev/shm
            assert svc.get("shm_size") or svc.get("ipc") == "host", name
    assert set(doc["services"]["prefill-0"]["depends_on"]) == {"redis", "scheduler", "kvtransfer"}
    router = doc["services"]["router"]
    assert router["environment"]["DUOPOOL_PUBLISH_ADDR"] == "${DUOPOOL_PUBLISH_ADDR:-127.0.0.1}"
    assert all(p.startswith("${DUOPOOL_PUBLISH_ADDR:-127.0.0.1}:") for p in router["ports"])
    # every user of the kv-shm volume may write it (the services run as an unprivileged user)
    assert "mode=1777" in doc["volumes"]["kv-shm"]["driver_opts"]["o"]


def test_gpu_override_gives_each_worker_its_own_gpu_and_the_cuda_image():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    workers = [s.name for s in compose_services(Topology()) if s.service == "worker"]
    assert set(doc["services"]) == set(workers)
    devices = []
    for name in workers:
        svc = doc["services"][name]
        assert svc["build"]["args"]["ENGINE"].startswith("vllm==") and svc["build"]["args"]["TORCH"] == ""
        (res,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert res["driver"] == "nvidia" and res["capabilities"] == ["gpu"]
        devices.append(res["device_ids"][0].rsplit(":-", 1)[1].rstrip("}"))
        assert "NCCL_SOCKET_IFNAME" in svc["environment"] and "UCX_TLS" in svc["environment"]
    assert len(set(devices)) == len(workers), f"workers share a GPU by default: {devices}"


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
    # each vLLM engine pins itself to its own share of the host's cores, one torch thread per core
    workers = [s for s in compose_services(Topology()) if s.service == "worker"]
    assert [w.flags["cpus"] for w in workers] == [f"share:{i}/{len(workers)}" for i in range(len(workers))]
    assert all(w.flags["threads"] == "0" for w in workers)
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
