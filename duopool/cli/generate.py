"""`duopool generate PROMPT`: send one request to the router and stream the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_ROUTER = "127.0.0.1:50051"


def router_address(args: argparse.Namespace) -> str:
    """--router, else $DUOPOOL_ROUTER, else the cluster `duopool up` runs (its state file), else the default."""
    if args.router or os.environ.get("DUOPOOL_ROUTER"):
        return args.router or os.environ["DUOPOOL_ROUTER"]
    from duopool.cli.up import read_state

    return read_state().get("router") or DEFAULT_ROUTER


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion from the router")
    p.add_argument("prompt", help="prompt text")
    add_request_arguments(p)
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    p.set_defaults(func=run)


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", help=f"router address [env DUOPOOL_ROUTER; default {DEFAULT_ROUTER}]")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate [128]")
    p.add_argument("--class", dest="request_class", choices=("online", "offline"), default="online",
                   help="request class [online]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling [1.0]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="TTFT SLO in ms (0: none)")
    p.add_argument("--tpot-ms", type=float, default=0.0, help="TPOT SLO in ms (0: none)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up [600]")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")


def build_request(args: argparse.Namespace, prompt: str):
    from duopool.v1 import common_pb2, router_pb2

    sampling = common_pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p, stop=args.stop)
    if args.seed is not None:
        sampling.seed = args.seed
    return router_pb2.GenerateRequest(
        text=prompt, max_tokens=args.max_tokens, sampling=sampling,
        request_class=common_pb2.ONLINE if args.request_class == "online" else common_pb2.OFFLINE,
        slo=common_pb2.Slo(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms), chat=not args.raw,
    )


def stream(address: str, request, out=sys.stdout, timeout: float = 600.0):
    """Streams a Generate call, writing text to ``out``; returns the summary message."""

    from duopool.cli.client import router_channel
    from duopool.v1 import router_pb2_grpc

    with router_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        summary = None
        for msg in stub.Generate(request, timeout=timeout):
            if msg.HasField("chunk"):
                out.write(msg.chunk.text)
                out.flush()
            else:
                summary = msg.summary
        return summary


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    address = router_address(args)
    try:
        summary = stream(address, build_request(args, args.prompt), out=sys.stderr if args.json else sys.stdout,
                         timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(summary, preserving_proto_field_name=True), indent=2))
    else:
        s = summary
        print(f"\n\n[{s.output_tokens} tokens, TTFT {s.ttft_ms:.0f} ms, prefill {s.prefill_worker} -> "
              f"decode {s.decode_worker or '-'}, KV {s.kv_transferred_tokens} tokens moved / "
              f"{s.decode_cached_tokens} reused, engine {s.engine}{' (SIMULATED)' if s.engine == 'sim' else ''}"
              f"{', trace ' + s.trace_id if s.trace_id else ''}]", file=sys.stderr)
    return 0
