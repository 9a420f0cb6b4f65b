"""`duopool serve SERVICE [flags]`: run one service in the foreground (what compose and `duopool up` run)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from duopool.common.config import (
    ConfigError,
    KvTransferConfig,
    RouterConfig,
    SchedulerConfig,
    WorkerConfig,
    add_config_arguments,
    config_from_namespace,
)

SERVICES = {
    "router": (RouterConfig, "duopool.router.server", "the public gRPC API"),
    "scheduler": (SchedulerConfig, "duopool.scheduler.server", "placement and cluster state"),
    "worker": (WorkerConfig, "duopool.worker.server", "one engine instance (vllm or simulated)"),
    "kvtransfer": (KvTransferConfig, "duopool.kvtransfer.server", "KV transfer broker and data plane"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run one duopool service in the foreground")
    svc = parser.add_subparsers(dest="service", metavar="SERVICE", required=True)
    for name, (cls, _module, text) in SERVICES.items():
        p = svc.add_parser(name, help=text, description=f"Run the {name} service: {text}. "
                           "Each flag can also be set by the environment variable in brackets.")
        add_config_arguments(p, cls)
        p.add_argument("--log-level", default="INFO", help="logging level [default INFO]")
        p.set_defaults(func=run)


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import importlib

    cls, module_name, _ = SERVICES[args.service]
    setup_logging(args.log_level, args.service)
    try:
        config = config_from_namespace(cls, args)
    except ConfigError as exc:
        print(f"duopool serve {args.service}: invalid setting {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)

    from duopool.common.rpc import run_until_signal
    from duopool.common.telemetry import shutdown_telemetry

    try:
        asyncio.run(run_until_signal(lambda stop: module.serve(config, stop)))
    finally:
        shutdown_telemetry()
    return 0
