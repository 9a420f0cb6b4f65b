"""The router's HTTP server: uvicorn serving the OpenAI-compatible app in the router's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from duopool.common.config import RouterConfig
from duopool.router.auth import ApiKeys
from duopool.router.openai_api import HttpContext, create_app

log = logging.getLogger("duopool.router.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the router's own handlers stop it (run_until_signal)
        yield


class HttpServer:
    def __init__(self, service, config: RouterConfig, keys: ApiKeys) -> None:
        self.config = config
        self.context = HttpContext(service=service, config=config, keys=keys)
        self._redis = []
        if config.redis_url:  # files and batches live in the cluster's Redis
            import redis.asyncio as aioredis

            from duopool.common import registry
            from duopool.common.jobs import JobStore
            from duopool.router.openai_batch_api import make_stores

            r = registry.connect(config.redis_url)
            raw = aioredis.from_url(config.redis_url, decode_responses=False, socket_connect_timeout=3,
                                    health_check_interval=10)
            self._redis = [r, raw]
            make_stores(self.context, r, raw, JobStore(r))
        self.app = create_app(self.context)
        self._sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((config.host, max(config.http_port, 0)))
        self.port = self._sock.getsockname()[1]
        uv = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                            ssl_certfile=config.tls_cert or None, ssl_keyfile=config.tls_key or None,
                            timeout_graceful_shutdown=2, limit_concurrency=None)
        self._server = _Server(uv)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        for hook in self.context.on_start:
            await hook()

    async def stop(self) -> None:
        if self.context.batches is not None:
            for task in self.context.batches.building.values():
                self.context.tasks.add(task)
        await self.context.tasks.close()
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
        for r in self._redis:
            with contextlib.suppress(Exception):
                await r.aclose()
