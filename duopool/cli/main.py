"""Entry point of the `duopool` command.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code). Registration only
builds parsers: heavy imports (vllm, torch, grpc) happen inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `duopool --help` lists them.
COMMAND_MODULES = ["up", "generate", "trace", "batch", "workers", "serve", "sim", "compare", "profile", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duopool",
        description="Serve LLMs to online and offline traffic on one prefill/decode-disaggregated cluster.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"duopool.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"duopool.cli.{name}":
                continue  # not part of this build yet
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from duopool import __version__

    return f"duopool {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
