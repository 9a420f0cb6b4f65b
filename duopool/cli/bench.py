"""`duopool bench ...`: benchmarks that print figures and write JSON. One module per benchmark in duopool.bench."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = ["kv", "serving", "replay", "openai_serve", "batch_accept", "telemetry", "park", "control_plane"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (prints figures, writes JSON)")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(f"duopool.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"duopool.bench.{name}":
                continue
            raise
        module.register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
