"""``duopool bench batch-accept``: a large OpenAI batch file (default 50,000 requests, ~100 MB) through the
HTTP API with the official ``openai`` client: upload, acceptance (``validating`` → ``in_progress``),
progress, cancel, and the cancelled batch's files. Prints the figures and writes JSON.

Against a running cluster (``--base-url``) or, by default, a local cluster with SIMULATED workers started
for the run (the figures are the control plane's: file store, validation, enqueueing, cancel).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import tempfile
import time

PAD_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def make_file(n: int, target_mb: float, model: str, max_tokens: int) -> bytes:
    """``n`` chat-completion lines whose prompts are padded so the file is about ``target_mb`` MB."""
    skeleton = len(json.dumps({"custom_id": "r00000", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": [{"role": "user", "content": ""}],
                                        "max_tokens": max_tokens}})) + 1
    per_line = max(0, int(target_mb * 1e6 / n) - skeleton)
    out = io.BytesIO()
    for i in range(n):
        words = f"request {i}: " + " ".join(PAD_WORDS[(i + k) % len(PAD_WORDS)] for k in range(per_line // 4 + 1))
        body = {"model": model, "messages": [{"role": "user", "content": words[:max(per_line, 16)]}], "max_tokens": max_tokens}
        out.write(json.dumps({"custom_id": f"r{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body}, separators=(",", ":")).encode() + b"\n")
    return out.getvalue()


def run(base_url: str, api_key: str, n: int, target_mb: float, max_tokens: int, progress_s: float,
        log=print) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    data = make_file(n, target_mb, model, max_tokens)
    log(f"input file: {n:,} requests, {len(data) / 1e6:.1f} MB")
    t0 = time.perf_counter()
    f = client.files.create(file=("big.jsonl", data), purpose="batch")
    upload_s = time.perf_counter() - t0
    log(f"uploaded in {upload_s:.2f} s ({len(data) / 1e6 / upload_s:.0f} MB/s): {f.id}")
    t1 = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    create_s = time.perf_counter() - t1
    first_status = b.status
    while b.status == "validating":
        time.sleep(0.2)
        b = client.batches.retrieve(b.id)
    accept_s = time.perf_counter() - t1
    log(f"batch {b.id}: create answered in {create_s * 1e3:.0f} ms ({first_status}), "
        f"{b.status} after {accept_s:.2f} s")
    if b.status != "in_progress":
        raise SystemExit(f"batch {b.status}: {b.errors}")
    t2 = time.perf_counter()
    done_at_start = b.request_counts.completed
    while time.perf_counter() - t2 < progress_s:
        time.sleep(0.5)
        b = client.batches.retrieve(b.id)
    progressed = b.request_counts.completed - done_at_start
    log(f"progress: {progressed} requests completed in {progress_s:.0f} s")
    t3 = time.perf_counter()
    c = client.batches.cancel(b.id)
    cancel_answer = c.status
    while c.status == "cancelling":
        time.sleep(0.2)
        c = client.batches.retrieve(b.id)
    cancel_s = time.perf_counter() - t3
    rc = c.request_counts
    error_lines = 0
    if c.error_file_id:
        error_lines = sum(1 for ln in client.files.content(c.error_file_id).text.splitlines() if ln)
    output_lines = 0
    if c.output_file_id:
        output_lines = sum(1 for ln in client.files.content(c.output_file_id).text.splitlines() if ln)
    log(f"cancel answered {cancel_answer}; {c.status} after {cancel_s:.2f} s: {rc.completed} completed, "
        f"{rc.failed} failed; output file {output_lines} lines, error file {error_lines} lines")
    # a batch made after the cancel must not wait behind the cancelled one's queued entries
    line = json.dumps({"custom_id": "after", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": "next"}], "max_tokens": 2}})
    t4 = time.perf_counter()
    nf = client.files.create(file=("next.jsonl", line.encode()), purpose="batch")
    nb = client.batches.create(input_file_id=nf.id, endpoint="/v1/chat/completions", completion_window="24h")
    while nb.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
        nb = client.batches.retrieve(nb.id)
    next_s = time.perf_counter() - t4
    log(f"a one-request batch made after the cancel: {nb.status} {next_s:.2f} s after it was made")
    return {
        "requests": n, "file_mb": round(len(data) / 1e6, 2), "upload_s": round(upload_s, 3),
        "create_ms": round(create_s * 1e3, 1), "create_status": first_status, "accept_s": round(accept_s, 3), "progress_window_s": progress_s,
        "progressed": progressed, "cancel_answer": cancel_answer, "final_status": c.status,
        "cancel_s": round(cancel_s, 3), "completed": rc.completed, "failed": rc.failed, "total": rc.total,
        "output_lines": output_lines, "error_lines": error_lines,
        "every_request_accounted": output_lines + error_lines == rc.total == n,
        "next_batch_status": nb.status, "next_batch_done_s": round(next_s, 3),
    }


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch-accept", help="a 50,000-request (~100 MB) OpenAI batch: upload, accept, cancel")
    p.add_argument("--base-url", default="", help="OpenAI API of a running cluster (default: start a sim one)")
    p.add_argument("--api-key", default="", help="API key (default: $DUOPOOL_API_KEY)")
    p.add_argument("--requests", type=int, default=50_000, help="lines in the input file [50000]")
    p.add_argument("--file-mb", type=float, default=100.0, help="size of the input file to build, MB [100]")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request [16]")
    p.add_argument("--progress-s", type=float, default=10.0, help="how long to watch it run before cancelling [10]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench"), help="output dir")
    p.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    key = a.api_key or os.environ.get("DUOPOOL_API_KEY", "") or "none"
    if a.base_url:
        result = run(a.base_url, key, a.requests, a.file_mb, a.max_tokens, a.progress_s)
    else:
        from duopool.common.redis_server import RedisServer
        from duopool.launcher import LocalCluster
        from duopool.topology import Topology

        with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
            cluster = LocalCluster(Topology(engine="sim"), pathlib.Path(tmp), redis_url=redis.url, router_port=0,
                                   extra_env={"OTEL_TRACES_EXPORTER": "none", "DUOPOOL_API_KEYS": ""})
            cluster.log = lambda m: None
            with cluster.start(timeout=120):
                result = run(cluster.http_url, key, a.requests, a.file_mb, a.max_tokens, a.progress_s)
        result["engine"] = "sim (SIMULATED workers)"
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "batch-accept.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if result["every_request_accounted"] else 1
