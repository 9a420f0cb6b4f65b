"""`duopool workers` (list the cluster's workers), `duopool set-role`, `duopool stats` (the scheduler's
co-location state) and `duopool health ADDR` (gRPC health check)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from duopool.cli.generate import DEFAULT_ROUTER, router_address

DEFAULT_SCHEDULER = "127.0.0.1:50052"
SCHEDULER_HELP = ("scheduler address (an internal service) [env DUOPOOL_SCHEDULER, else the cluster `duopool up` "
                  f"runs, else {DEFAULT_SCHEDULER}]; the cluster token from DUOPOOL_CLUSTER_TOKEN or that cluster")


def scheduler_channel(args: argparse.Namespace):
    """(address, channel carrying the cluster token) for the scheduler the user means."""
    import os

    from duopool.cli.up import read_state
    from duopool.common.clusterauth import cluster_token, sync_channel

    state = read_state()
    address = args.scheduler or os.environ.get("DUOPOOL_SCHEDULER") or state.get("scheduler") or DEFAULT_SCHEDULER
    token = cluster_token() or (state.get("cluster_token", "") if state.get("scheduler") == address else "")
    return address, sync_channel(address, token=token)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workers", help="list the workers registered with the cluster")
    p.add_argument("--router", help=f"router address [env DUOPOOL_ROUTER; default {DEFAULT_ROUTER}]")
    p.set_defaults(func=run_workers)
    sr = sub.add_parser("set-role", help="change a worker's role and/or pool at run time (via the scheduler)")
    sr.add_argument("worker_id")
    sr.add_argument("--role", choices=("prefill", "decode", "mixed"))
    sr.add_argument("--pool", choices=("strict", "relaxed"))
    sr.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)
    sr.set_defaults(func=run_set_role)
    st = sub.add_parser("stats", help="the scheduler's co-location state: in-flight work, preemptions and their "
                                      "latency, SLO pressure per worker, role moves")
    st.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.add_argument("--request", default="", metavar="ID",
                    help="also list the decisions the scheduler took about request ID (placed where and why, "
                         "preempted, held); offline batch requests are named <job id>-<index>-<attempt>-<suffix>")
    st.set_defaults(func=run_stats)
    h = sub.add_parser("health", help="check a service's gRPC health: Watch until SERVING, then List every "
                                      "service (exit 0 when all SERVING)")
    h.add_argument("address", help="host:port")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for SERVING (default 3)")
    h.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit status says it")
    h.set_defaults(func=run_health)


def run_workers(args: argparse.Namespace) -> int:
    import grpc

    from duopool.cli.client import router_channel
    from duopool.v1 import common_pb2, router_pb2_grpc

    with router_channel(router_address(args)) as ch:
        try:
            resp = router_pb2_grpc.RouterStub(ch).ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{'worker':<16} {'role':<8} {'pool':<8} {'engine':<6} {'model':<24} run wait  kv")
    for w in resp.workers:
        print(f"{w.worker_id:<16} {common_pb2.WorkerRole.Name(w.role).lower():<8} "
              f"{common_pb2.Pool.Name(w.pool).lower():<8} {w.engine:<6} {w.model[-24:]:<24} "
              f"{w.running:>3} {w.waiting:>4} {w.kv_usage:4.0%}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    import grpc

    from duopool.common.rpc import health_report

    try:
        statuses = asyncio.run(health_report(args.address, timeout=args.timeout))
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.address}: SERVING")
        for name, status in statuses.items():
            if name:
                print(f"  {name}: {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1


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
    address, ch = scheduler_channel(args)
    with ch:
        try:
            info = scheduler_pb2_grpc.SchedulerStub(ch).SetWorkerRole(req, timeout=10)
        except grpc.RpcError as exc:
            print(f"error: scheduler at {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{info.worker_id}: role {common_pb2.WorkerRole.Name(info.role).lower()}, "
          f"pool {common_pb2.Pool.Name(info.pool).lower()}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    import json

    import grpc
    from google.protobuf.json_format import MessageToDict

    from duopool.v1 import scheduler_pb2, scheduler_pb2_grpc

    address, ch = scheduler_channel(args)
    with ch:
        try:
            st = scheduler_pb2_grpc.SchedulerStub(ch).Stats(
                scheduler_pb2.SchedulerStatsRequest(request_id=args.request), timeout=5)
        except grpc.RpcError as exc:
            print(f"error: scheduler at {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        d = MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        d.pop("preemption_ms", None)
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    print(f"policy {st.policy}, preemption trigger {st.preempt_trigger}")
    print(f"in flight: {st.online_inflight} online, {st.offline_inflight} offline (per worker placement)")
    print(f"offline: {st.offline_completed} completed, {st.offline_requeued} re-queued; "
          f"preemptions {st.preemptions} (latency p50/p99 {st.preemption_ms_p50:.1f}/{st.preemption_ms_p99:.1f} ms); "
          f"role moves {st.role_moves}" + (f"; offline decodes moved {st.offline_moved}" if st.offline_moved else ""))
    recomputed = sum(st.resumed_recomputed.values())
    if st.resumed_parked or recomputed:
        why = ", ".join(f"{k} {n}" for k, n in sorted(st.resumed_recomputed.items(), key=lambda kv: -kv[1]))
        print(f"preempted work resumed: {st.resumed_parked} from parked KV ({st.tokens_not_recomputed} tokens not "
              f"recomputed), {recomputed} recomputing" + (f" ({why})" if why else ""))
    for wid, p in sorted(st.slo_pressure.items()):
        print(f"  {wid:<16} SLO pressure {p:5.2f}")
    if st.decisions:
        print("decisions (decision core), by kind and reason:")
        for k, n in sorted(st.decisions.items(), key=lambda kv: -kv[1]):
            print(f"  {n:>9}  {k}")
    if args.request:
        if st.request_decisions:
            print(f"request {args.request}:")
            for line in st.request_decisions:
                print(f"  {line}")
        else:
            print(f"request {args.request}: no decisions recorded (unknown id, older than the log, or a policy "
                  f"outside the decision core)")
    return 0
