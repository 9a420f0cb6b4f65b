"""Benchmarks behind `duopool bench`. Each module exposes register(subparsers)."""
