"""`duopool workers` (list the cluster's workers) and `duopool health ADDR` (gRPC health check)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from duopool.cli.generate import DEFAULT_ROUTER, router_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workers", help="list the workers registered with the cluster")
    p.add_argument("--router", help=f"router address [env DUOPOOL_ROUTER; default {DEFAULT_ROUTER}]")
    p.set_defaults(func=run_workers)
    sr = sub.add_parser("set-role", help="change a worker's role and/or pool at run time (via the scheduler)")
    sr.add_argument("worker_id")
    sr.add_argument("--role", choices=("prefill", "decode", "mixed"))
    sr.add_argument("--pool", choices=("strict", "relaxed"))
    sr.add_argument("--scheduler", default="127.0.0.1:50052",
                    help="scheduler address (an internal service) [127.0.0.1:50052]")
    sr.set_defaults(func=run_set_role)
    h = sub.add_parser("health", help="check a service's gRPC health (exit 0 when SERVING)")
    h.add_argument("address", help="host:port")
    h.add_argument("--timeout", type=float, default=3.0)
    h.set_defaults(func=run_health)


def run_workers(args: argparse.Namespace) -> int:
    import grpc

    from duopool.v1 import common_pb2, router_pb2_grpc

    with grpc.insecure_channel(router_address(args)) as ch:
        try:
            resp = router_pb2_grpc.RouterStub(ch).ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{'worker':<16} {'role':<8} {'pool':<8} {'engine':<6} {'model':<24} {'address':<22} run wait  kv")
    for w in resp.workers:
        print(f"{w.worker_id:<16} {common_pb2.WorkerRole.Name(w.role).lower():<8} "
              f"{common_pb2.Pool.Name(w.pool).lower():<8} {w.engine:<6} {w.model[-24:]:<24} {w.address:<22} "
              f"{w.running:>3} {w.waiting:>4} {w.kv_usage:4.0%}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    from duopool.common.rpc import wait_healthy

    try:
        asyncio.run(wait_healthy(args.address, timeout=args.timeout))
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def run_set_role(args: argparse.Namespace) -> int:
    import grpc

    from duopool.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

    if not args.role and not args.pool:
        print("error: give --role and/or --pool", file=sys.stderr)
        return 2
    req = scheduler_pb2.SetWorkerRoleRequest(
        worker_id=args.worker_id, reason="duopool workers set-role",
        role=common_pb2.WorkerRole.Value(args.role.upper()) if args.role else 0,
        pool=common_pb2.Pool.Value(args.pool.upper()) if args.pool else 0)
    with grpc.insecure_channel(args.scheduler) as ch:
        try:
            info = scheduler_pb2_grpc.SchedulerStub(ch).SetWorkerRole(req, timeout=10)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{info.worker_id}: role {common_pb2.WorkerRole.Name(info.role).lower()}, "
          f"pool {common_pb2.Pool.Name(info.pool).lower()}")
    return 0
