"""A local cluster: Redis (unless given) and every service as a child process, from duopool.topology.

Used by `duopool up`, by the integration tests and by the benchmarks, so all three run the same thing.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from duopool.common.redis_server import RedisServer, free_ports
from duopool.topology import DEFAULT_PORTS, ServiceSpec, Topology, instance_names, services


@dataclass
class Proc:
    spec: ServiceSpec
    popen: subprocess.Popen
    log_path: pathlib.Path


@dataclass
class LocalCluster:
    topology: Topology
    run_dir: pathlib.Path
    redis_url: str = ""
    router_port: int = DEFAULT_PORTS["router"]
    http_port: int | None = None  # the OpenAI HTTP API; None: 8000 with the default router port, else a free one
    fixed_ports: bool = False  # True: the default ports for every service; False: free ports but the router's
    extra_env: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print  # progress lines
    kv_root: pathlib.Path = pathlib.Path("/dev/shm")  # where the cluster's KV segment dir is made (a tmpfs)
    pin_cpus: bool = False  # give each vLLM engine its own cores (when there are enough) and threads to match

    def __post_init__(self) -> None:
        self.procs: dict[str, Proc] = {}
        self.redis: RedisServer | None = None
        self.kv_dir = pathlib.Path(self.kv_root) / f"duopool-kv-{os.getpid()}-{int(time.time())}"
        self.specs: list[ServiceSpec] = []
        # Internal services accept only calls carrying this (duopool.common.clusterauth): one per cluster.
        self.cluster_token = (self.extra_env.get("DUOPOOL_CLUSTER_TOKEN") or os.environ.get("DUOPOOL_CLUSTER_TOKEN")
                              or secrets.token_hex(16))
        self.extra_env = {**self.extra_env, "DUOPOOL_CLUSTER_TOKEN": self.cluster_token}
        self._restarts: dict[str, list[float]] = {}  # service -> monotonic times of its recent restarts
        self._due: dict[str, float] = {}  # service -> when its pending restart is due

    # -- addresses -------------------------------------------------------------------------------------
    def _ports(self) -> dict[str, int]:
        names = instance_names(self.topology)
        spare = iter(free_ports(len(names) + 2))  # distinct: services never share a port
        ports = {n: (DEFAULT_PORTS.get(n, 0) if self.fixed_ports else 0) or next(spare) for n in names}
        ports["router"] = self.router_port or next(spare)
        http = self.http_port
        if http is None:
            http = DEFAULT_PORTS["router-http"] if self.router_port == DEFAULT_PORTS["router"] else 0
        ports["router-http"] = http or next(spare)
        return ports

    def metrics_urls(self) -> dict[str, str]:
        """Each service's Prometheus endpoint (the router's is on its HTTP port)."""
        urls = {n: f"http://127.0.0.1:{p}/metrics" for n, p in getattr(self, "metrics_ports", {}).items()}
        if self.specs:
            urls["router"] = self.http_url.removesuffix("/v1") + "/metrics"
        return urls

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.specs[-1].flags['port']}"

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying the cluster's first API key (none when the API is open)."""
        keys = self.extra_env.get("DUOPOOL_API_KEYS", os.environ.get("DUOPOOL_API_KEYS", ""))
        key = next((k.strip() for k in keys.split(",") if k.strip()), "")
        return (("authorization", f"Bearer {key}"),) if key else ()

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (what the ``openai`` client takes as ``base_url``)."""
        return f"http://127.0.0.1:{self.specs[-1].flags['http-port']}/v1"

    def address(self, name: str) -> str:
        spec = next(s for s in self.specs if s.name == name)
        return f"127.0.0.1:{spec.flags['port']}"

    def internal_channel(self, name: str):
        """A blocking channel to an internal service that carries this cluster's token."""
        from duopool.common.clusterauth import sync_channel

        return sync_channel(self.address(name), token=self.cluster_token)

    def aio_internal_channel(self, name: str):
        from duopool.common.clusterauth import aio_channel

        return aio_channel(self.address(name), token=self.cluster_token)

    def write_state(self, path: pathlib.Path) -> None:
        """What CLI commands need to find this cluster (addresses, the cluster token), readable by the owner
        only: ``duopool stats`` / ``set-role`` / ``workers`` read it when given no address."""
        state = {"run_dir": str(self.run_dir), "router": self.router_address, "http_url": self.http_url,
                 "scheduler": self.address("scheduler"), "kvtransfer": self.address("kvtransfer"),
                 "cluster_token": self.cluster_token, "pid": os.getpid(),
                 "metrics": self.metrics_urls(),
                 "traces": str(getattr(self, "trace_file", "") or "")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, path)

    def _assign_cpus(self) -> None:
        """Engines that share a host do not fight over its cores: with ``pin_cpus`` each vLLM worker gets its
        own contiguous share of the cores this process may use (``--cpus``), and a worker whose threads are
        0 ("auto") gets one torch thread per core of its share (1 when not pinned)."""
        from duopool.common.config import available_cpus, format_cpus, resolve_cpus

        workers = [s for s in self.specs if s.service == "worker"]
        cores = available_cpus()
        shares = [resolve_cpus(f"share:{i}/{len(workers)}", cores) for i in range(len(workers))]
        pin = self.pin_cpus and self.topology.engine == "vllm" and all(shares)
        if self.pin_cpus and self.topology.engine == "vllm" and not pin:
            self.log(f"  cpus        not pinned: {len(workers)} engines on {len(cores)} cores")
        for spec, share in zip(workers, shares, strict=True):
            if pin:
                spec.flags["cpus"] = format_cpus(share)
                self.log(f"  cpus        {spec.name} pinned to core(s) {spec.flags['cpus']}")
            if spec.flags.get("threads") == "0":
                spec.flags["threads"] = str(len(share) if pin else 1)

    # -- life cycle ------------------------------------------------------------------------------------
    def _wait_group_gone(self, name: str, timeout: float = 5.0) -> None:
        """Waits until every process of a killed service's group has exited (their mappings released)."""
        proc = self.procs[name]
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.popen.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def _sweep_after(self, name: str) -> None:
        """Before a killed worker starts again: what its engine processes left in shared memory goes."""
        if self.procs[name].spec.service == "worker":
            self._wait_group_gone(name)
            self.sweep_shm(f"{name} restarting")

    def sweep_shm(self, when: str) -> None:
        """Removes shared memory no live process holds that this cluster's kind of processes leave after a
        kill (duopool.common.shm_sweep): at start (a previous cluster killed), after a restart, at stop."""
        from duopool.common.shm_sweep import sweep

        removed = sweep(kv_root=pathlib.Path(self.kv_root), keep={self.kv_dir})
        if removed:
            mib = sum(size for _, size in removed) / 2**20
            self.log(f"  shm         {when}: removed {len(removed)} orphaned shared-memory file(s)/KV dir(s), "
                     f"{mib:.0f} MiB")

    def start(self, timeout: float = 900.0) -> LocalCluster:
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_shm("at start")
        if not self.redis_url:  # our own, with a password (and no admin commands) only the cluster knows
            self.redis = RedisServer(log_path=self.run_dir / "redis.log", data_dir=self.run_dir / "redis",
                                     password=secrets.token_hex(16)).start()
            self.redis_url = self.redis.url
            self.log(f"  redis       127.0.0.1:{self.redis.port} with a password "
                     f"({pathlib.Path(self.redis.binary).name})")
        ports = self._ports()
        names = [n for n in ports if n != "router-http"]
        taken = set(ports.values())
        spare = iter(p for p in free_ports(len(names) + len(taken)) if p not in taken)
        self.metrics_ports = {n: next(spare) for n in names if n != "router"}
        self.specs = services(self.topology, bind={n: "127.0.0.1" for n in names}, port=ports,
                              addr={n: f"127.0.0.1:{p}" for n, p in ports.items()}, redis_url=self.redis_url,
                              kv_dir=str(self.kv_dir), metrics=self.metrics_ports)
        for spec in self.specs:  # the URL may hold a password: in the environment, not on command lines
            spec.flags.pop("redis-url", None)
        self._assign_cpus()
        self.extra_env["REDIS_URL"] = self.redis_url
        if self.topology.engine == "vllm":
            self.log(f"  model       preparing {self.topology.model!r} (converted and cached on first use)...")
            from duopool.models import resolve_model

            path = resolve_model(self.topology.model)
            self.log(f"  model       {path} ({time.monotonic() - t0:.0f}s)")
        try:
            asyncio.run(self._start_all(t0, timeout))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, spec: ServiceSpec) -> Proc:
        log_path = self.run_dir / f"{spec.name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env["OTEL_SERVICE_NAME"] = f"duopool-{spec.name}"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", "duopool.cli.main", *spec.argv()], stdout=out,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(spec, popen, log_path)
        self.procs[spec.name] = proc
        return proc

    async def _wait(self, proc: Proc, t0: float, timeout: float) -> None:
        from duopool.common.rpc import wait_healthy

        address = f"127.0.0.1:{proc.spec.flags['port']}"
        deadline = time.monotonic() + timeout
        while True:
            if proc.popen.poll() is not None:
                tail = proc.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{proc.spec.name} exited with {proc.popen.returncode}; its log "
                                   f"({proc.log_path}) ends:\n{tail}")
            try:
                await wait_healthy(address, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{proc.spec.name} not healthy after {timeout:.0f}s; see {proc.log_path}") from None
        self.log(f"  {proc.spec.name:<11} {address} ready ({time.monotonic() - t0:.0f}s)")

    async def _start_all(self, t0: float, timeout: float) -> None:
        by_kind: dict[str, list[ServiceSpec]] = {}
        for s in self.specs:
            by_kind.setdefault(s.service, []).append(s)
        for group in (["scheduler", "kvtransfer"], ["worker"], ["router"]):
            procs = [self._spawn(s) for kind in group for s in by_kind.get(kind, [])]
            await asyncio.gather(*(self._wait(p, t0, timeout) for p in procs))
        await self._wait_registered(timeout=30)

    async def _wait_registered(self, timeout: float) -> None:
        import grpc

        from duopool.v1 import common_pb2, router_pb2_grpc

        want = self.topology.prefill_workers + self.topology.decode_workers + self.topology.mixed_workers
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.router_address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            while True:
                resp = await stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5, metadata=self.auth_metadata)
                if len(resp.workers) >= want:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(resp.workers)} of {want} workers registered")
                await asyncio.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kills one service (its whole process group: a vLLM worker's engine processes too)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass
        proc.popen.wait(30)

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Starts a killed service again with the same command (same ports and identity)."""
        proc = self.procs[name]
        if proc.popen.poll() is None:
            self.kill(name, signal.SIGTERM)
        self._sweep_after(name)
        new = self._spawn(proc.spec)
        asyncio.run(self._wait(new, time.monotonic(), timeout))

    # -- supervision -----------------------------------------------------------------------------------
    def supervise(self, now: float | None = None) -> list[str]:
        """One pass of the supervisor: a child (or our Redis) that exited is started again, after a back-off
        that doubles with each recent restart (1 s ... 30 s). Returns log lines; raises RuntimeError once a
        service has been restarted ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S`` (it keeps dying: say why
        rather than loop)."""
        now = time.monotonic() if now is None else now
        lines: list[str] = []
        if self.redis is not None and not self.redis.alive:
            lines += self._restart_later("redis", now, self._restart_redis)
        for name, proc in list(self.procs.items()):
            if proc.popen.poll() is not None:
                code = proc.popen.returncode
                lines += self._restart_later(name, now, lambda n=name: self._respawn(n), f"exit {code}")
        return lines

    MAX_RESTARTS = 5
    RESTART_WINDOW_S = 300.0

    def _restart_later(self, name: str, now: float, restart, why: str = "exited") -> list[str]:
        history = self._restarts.setdefault(name, [])
        history[:] = [t for t in history if now - t < self.RESTART_WINDOW_S]
        if len(history) >= self.MAX_RESTARTS:
            log_hint = f"; see {self.procs[name].log_path}" if name in self.procs else ""
            raise RuntimeError(f"{name} died {len(history) + 1} times within {self.RESTART_WINDOW_S:.0f}s "
                               f"({why}); giving up{log_hint}")
        due = self._due.setdefault(name, now + min(30.0, 2.0 ** len(history) - 1))
        if now < due:
            return []
        del self._due[name]
        history.append(now)
        restart()
        return [f"supervisor: {name} {why}; restarted ({len(history)} restart(s) in the last "
                f"{self.RESTART_WINDOW_S:.0f}s)"]

    def _respawn(self, name: str) -> None:
        try:  # what is left of its process group (a vLLM worker's engine processes) goes first
            os.killpg(self.procs[name].popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._sweep_after(name)
        self._spawn(self.procs[name].spec)  # same ports and identity; it re-registers on its own

    def _restart_redis(self) -> None:
        self.redis.start()  # same port, data dir and password: the append-only file brings the state back

    def stop(self, timeout: float = 30.0) -> None:
        order = ["router"] + [s.name for s in self.specs if s.service == "worker"] + ["kvtransfer", "scheduler"]
        for name in order:
            proc = self.procs.get(name)
            if proc and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in order:
            proc = self.procs.get(name)
            if not proc:
                continue
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # engine subprocesses of a worker live in its process group
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.popen.wait()
        self.procs.clear()
        if self.redis:
            self.redis.stop()
            self.redis = None
        import shutil

        shutil.rmtree(self.kv_dir, ignore_errors=True)
        self.sweep_shm("at stop")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
