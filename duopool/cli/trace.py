"""`duopool trace ID`: one request's span tree, with durations, from the traces `duopool up` keeps."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

# Attributes worth a line in the terminal (the rest: --json).
SHOWN = ("duopool.policy", "duopool.prefill_worker", "duopool.decode_worker", "duopool.reason", "duopool.worker",
         "duopool.class", "duopool.prompt_tokens", "duopool.output_tokens", "duopool.cached_tokens",
         "duopool.kv.bytes", "duopool.kv.tokens", "duopool.kv.transport", "duopool.finish_reason",
         "rpc.grpc.status_code")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="print one request's spans as a tree with durations",
                       description="Print the spans of one trace (the trace id a Generate summary and "
                       "`duopool generate --json` show) as a tree: service, span, duration, key attributes. "
                       "Reads the traces.jsonl that `duopool up` keeps in its run dir (or --file).")
    p.add_argument("trace_id", help="32 hex digits")
    p.add_argument("--file", type=pathlib.Path, default=None,
                   help="a traces.jsonl (default: that of the cluster `duopool up` runs)")
    p.add_argument("--json", action="store_true", help="the spans as JSON lines instead of a tree")
    p.set_defaults(func=run)


def trace_file(given: pathlib.Path | None) -> pathlib.Path:
    if given is not None:
        return given
    from duopool.cli.up import read_state, state_file

    path = read_state().get("traces")
    if not path:
        raise FileNotFoundError(f"no trace file: no cluster of `duopool up` keeps traces ({state_file()} names "
                                "none); give --file, or look in your OpenTelemetry collector")
    return pathlib.Path(path)


def load(path: pathlib.Path, trace_id: str) -> list[dict]:
    spans = []
    for p in (pathlib.Path(str(path) + ".1"), path):  # the rotated file first: older spans
        if not p.exists():
            continue
        with p.open() as f:
            for line in f:
                if trace_id in line:
                    s = json.loads(line)
                    if s["trace_id"] == trace_id:
                        spans.append(s)
    return spans


def render(spans: list[dict]) -> list[str]:
    """The tree, a line per span: indentation by depth, start offset and duration in ms."""
    if not spans:
        return []
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict]] = {}
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in ids else ""
        children.setdefault(parent, []).append(s)
    for kids in children.values():
        kids.sort(key=lambda s: s["start_ns"])
    t0 = min(s["start_ns"] for s in spans)
    lines = []

    def walk(s: dict, depth: int) -> None:
        attrs = s.get("attributes", {})
        shown = " ".join(f"{k.removeprefix('duopool.')}={attrs[k]}" for k in SHOWN if k in attrs)
        lines.append(f"{(s['start_ns'] - t0) / 1e6:9.1f} ms {(s['end_ns'] - s['start_ns']) / 1e6:9.1f} ms  "
                     f"{'  ' * depth}{s['name']}  [{s['service'].removeprefix('duopool-')}]"
                     + (f"  {shown}" if shown else ""))
        for e in s.get("events", []):
            lines.append(f"{(e['time_ns'] - t0) / 1e6:9.1f} ms {'':>12}  {'  ' * (depth + 1)}* {e['name']} "
                         + " ".join(f"{k.removeprefix('duopool.')}={v}" for k, v in e.get("attributes", {}).items()))
        for c in children.get(s["span_id"], []):
            walk(c, depth + 1)

    for root in children.get("", []):
        walk(root, 0)
    return lines


def run(args: argparse.Namespace) -> int:
    tid = args.trace_id.strip().lower()
    if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
        print(f"duopool trace: {args.trace_id!r} is not a trace id (32 hex digits)", file=sys.stderr)
        return 2
    try:
        path = trace_file(args.file)
    except FileNotFoundError as exc:
        print(f"duopool trace: {exc}", file=sys.stderr)
        return 1
    spans = load(path, tid)
    if not spans:
        print(f"duopool trace: no spans of {tid} in {path} (spans arrive within a second or two of the "
              "request ending)", file=sys.stderr)
        return 1
    if args.json:
        for s in sorted(spans, key=lambda s: s["start_ns"]):
            print(json.dumps(s))
        return 0
    print(f"  start      duration    span  (trace {tid}, {len(spans)} spans, from {path})")
    for line in render(spans):
        print(line)
    return 0
