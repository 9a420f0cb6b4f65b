"""`duopool batch submit|status|results|cancel`: offline batch jobs through the router.

Input file: JSON Lines, one request per line::

    {"custom_id": "a1", "prompt": "Summarise ...", "max_tokens": 256, "temperature": 0, "chat": true}
    {"custom_id": "a2", "token_ids": [1, 2, 3], "max_tokens": 64, "seed": 7, "stop": ["\\n\\n"]}

OpenAI Batch API lines are accepted too: ``{"custom_id": ..., "body": {"messages": [...], "max_tokens": ...}}``
(the last user message is the prompt, sent through the chat template). The whole file is checked before
anything is sent; the router checks it again and enqueues all of it or nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from duopool.cli.generate import DEFAULT_ROUTER, router_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="offline batch jobs: submit, status, results, cancel")
    bs = p.add_subparsers(dest="batch_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--router", help=f"router address [env DUOPOOL_ROUTER; default {DEFAULT_ROUTER}]")

    s = bs.add_parser("submit", help="submit a JSONL file of requests; prints the job id")
    s.add_argument("file", type=pathlib.Path, help="JSONL file (see `duopool batch --help`)")
    s.add_argument("--job-id", default="", help="choose the job id (resubmitting it is a no-op)")
    s.add_argument("--max-tokens", type=int, default=128, help="for lines without max_tokens [128]")
    s.add_argument("--wait", action="store_true", help="then show progress until the job is done")
    common(s)
    s.set_defaults(func=run_submit)
    st = bs.add_parser("status", help="a job's progress (with --watch: a live progress bar until done)")
    st.add_argument("job_id")
    st.add_argument("--watch", action="store_true")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=run_status)
    r = bs.add_parser("results", help="results as JSONL (request order)")
    r.add_argument("job_id")
    r.add_argument("--out", type=pathlib.Path, help="write to this file instead of stdout")
    common(r)
    r.set_defaults(func=run_results)
    c = bs.add_parser("cancel", help="cancel a job (requests not yet finished are dropped)")
    c.add_argument("job_id")
    common(c)
    c.set_defaults(func=run_cancel)


class BatchFileError(ValueError):
    pass


def parse_line(raw: dict, lineno: int, default_max_tokens: int):
    from duopool.v1 import common_pb2, router_pb2

    body = raw.get("body", raw)
    item = router_pb2.BatchItem(custom_id=str(raw.get("custom_id", "")))
    if "messages" in body:
        users = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise BatchFileError(f"line {lineno}: messages has no user message with text content")
        item.text, item.chat = users[-1], True
    elif "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise BatchFileError(f"line {lineno}: prompt must be a string")
        item.text, item.chat = body["prompt"], bool(body.get("chat", False))
    elif "token_ids" in body:
        item.token_ids.ids.extend(int(t) for t in body["token_ids"])
    else:
        raise BatchFileError(f"line {lineno}: needs prompt, token_ids or messages")
    try:
        item.max_tokens = int(body.get("max_tokens", default_max_tokens))
        item.sampling.CopyFrom(common_pb2.SamplingParams(
            temperature=float(body.get("temperature", 0.0)), top_p=float(body.get("top_p", 1.0)),
            stop=[body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop", []))))
        if body.get("seed") is not None:
            item.sampling.seed = int(body["seed"])
    except (TypeError, ValueError) as exc:
        raise BatchFileError(f"line {lineno}: {exc}") from None
    return item


def read_batch_file(path: pathlib.Path, default_max_tokens: int = 128) -> list:
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchFileError(f"line {lineno}: not JSON ({exc.msg})") from None
            if not isinstance(raw, dict):
                raise BatchFileError(f"line {lineno}: expected a JSON object")
            items.append(parse_line(raw, lineno, default_max_tokens))
    if not items:
        raise BatchFileError("the file has no requests")
    return items


def _stub(args):

    from duopool.cli.client import router_channel
    from duopool.v1 import router_pb2_grpc

    ch = router_channel(router_address(args))
    return ch, router_pb2_grpc.RouterStub(ch)


def _state(status) -> str:
    from duopool.v1 import router_pb2

    return router_pb2.BatchState.Name(status.state).lower()


def show_progress(stub, job_id: str, out=sys.stderr) -> object:
    from duopool.v1 import router_pb2

    while True:
        st = stub.GetBatch(router_pb2.GetBatchRequest(job_id=job_id), timeout=10)
        finished = st.done + st.failed
        width = 30
        filled = int(width * finished / st.total) if st.total else width
        out.write(f"\r{job_id[:12]} [{'#' * filled}{'.' * (width - filled)}] {finished}/{st.total} "
                  f"failed {st.failed} | {st.tokens_per_s:7.1f} tok/s | preemptions {st.preemptions} | "
                  f"{_state(st):<9}")
        out.flush()
        if st.state in (router_pb2.DONE, router_pb2.CANCELLED):
            out.write("\n")
            return st
        time.sleep(0.5)


def run_submit(args: argparse.Namespace) -> int:
    import grpc

    from duopool.v1 import router_pb2

    try:
        items = read_batch_file(args.file, args.max_tokens)
    except (BatchFileError, OSError) as exc:
        print(f"error: {args.file}: {exc} (nothing submitted)", file=sys.stderr)
        return 2
    ch, stub = _stub(args)
    with ch:
        try:
            st = stub.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id=args.job_id), timeout=120)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()} (nothing submitted)", file=sys.stderr)
            return 1
        print(st.job_id)
        print(f"job {st.job_id}: {st.total} requests accepted", file=sys.stderr)
        if args.wait:
            show_progress(stub, st.job_id)
    return 0


def run_status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from duopool.v1 import router_pb2

    ch, stub = _stub(args)
    with ch:
        try:
            st = show_progress(stub, args.job_id) if args.watch else \
                stub.GetBatch(router_pb2.GetBatchRequest(job_id=args.job_id), timeout=10)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))
    elif not args.watch:
        print(f"{st.job_id}: {_state(st)}, {st.done + st.failed}/{st.total} finished ({st.failed} failed), "
              f"{st.output_tokens} tokens, {st.tokens_per_s:.1f} tok/s, {st.preemptions} preemptions")
    return 0


def run_results(args: argparse.Namespace) -> int:
    import grpc

    from duopool.v1 import router_pb2

    ch, stub = _stub(args)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    n = 0
    try:
        with ch:
            for r in stub.GetBatchResults(router_pb2.GetBatchRequest(job_id=args.job_id), timeout=300):
                rec = {"custom_id": r.custom_id, "index": r.index}
                if r.error:
                    rec["error"] = r.error
                else:
                    rec.update(text=r.text, token_ids=list(r.token_ids), finish_reason=r.finish_reason,
                               preemptions=r.preemptions)
                out.write(json.dumps(rec) + "\n")
                n += 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        if args.out:
            out.close()
    print(f"{n} results", file=sys.stderr)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    import grpc

    from duopool.v1 import router_pb2

    ch, stub = _stub(args)
    with ch:
        try:
            st = stub.CancelBatch(router_pb2.GetBatchRequest(job_id=args.job_id), timeout=10)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{st.job_id}: {_state(st)}")
    return 0
