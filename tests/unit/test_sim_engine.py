"""Simulator: determinism, summary schema, the CLI."""

import json

import numpy as np
import pytest

from duopool.core.policies import PolicyConfig
from duopool.sim import SimConfig, run_sim
from duopool.sim.metrics import SUMMARY_KEYS, get_path
from duopool.traces import Trace

pytestmark = pytest.mark.unit


def workload(seed=0, n=60):
    rng = np.random.default_rng(seed)
    on = Trace("on", np.cumsum(rng.exponential(0.1, n)), rng.integers(100, 3000, n), rng.integers(2, 300, n))
    off = Trace("off", np.zeros(200), rng.integers(500, 4000, 200), rng.integers(10, 500, 200))
    return on, off


def cfg(policy="ooco", seed=0):
    return SimConfig(policy=policy, instances=4, seed=seed, policy_cfg=PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05))


@pytest.mark.parametrize("policy", ["ooco", "hygen", "dopd"])
def test_deterministic_for_a_seed(policy):
    on, off = workload()
    _, a = run_sim(cfg(policy), on, off)
    _, b = run_sim(cfg(policy), on, off)
    for s in (a, b):
        s.pop("sim")
    assert a == b
    _, c = run_sim(cfg(policy, seed=7), on, off)  # the seed orders the offline backlog
    c.pop("sim")
    assert c["offline"] != a["offline"]


def test_summary_schema():
    on, off = workload()
    _, s = run_sim(cfg("pd-static"), on, off)
    for k in SUMMARY_KEYS:
        get_path(s, k)  # raises KeyError when missing
    assert s["policy"] == "pd-static" and s["simulated"] is True
    assert s["online"]["requests"] == 60
    assert 0.0 <= s["online"]["slo_attainment"] <= 1.0
    assert s["online"]["ttft_ms"]["p50"] <= s["online"]["ttft_ms"]["p90"] <= s["online"]["ttft_ms"]["p99"]
    assert s["offline"]["output_tokens_per_s"] > 0
    assert s["goodput_requests_per_s"] <= s["online"]["requests"] / s["duration_s"] + 1e-9
    json.dumps(s)


def test_slo_attainment_counts_both_slos():
    on, off = workload()
    loose = SimConfig(policy="ooco", instances=4, policy_cfg=PolicyConfig(ttft_slo_s=100, tpot_slo_s=10))
    tight = SimConfig(policy="ooco", instances=4, policy_cfg=PolicyConfig(ttft_slo_s=0.001, tpot_slo_s=10))
    assert run_sim(loose, on, off)[1]["online"]["slo_attainment"] == 1.0
    assert run_sim(tight, on, off)[1]["online"]["slo_attainment"] < 0.1


def test_more_load_more_latency():
    on, _ = workload(n=200)
    c = SimConfig(policy="pd-static", instances=3, policy_cfg=PolicyConfig(offline_share=0.34))
    _, slow = run_sim(c, on, None)
    _, fast = run_sim(c, on.scaled(20.0), None)
    assert fast["online"]["ttft_ms"]["p90"] > slow["online"]["ttft_ms"]["p90"]


def test_cli_sim_writes_summary(tmp_path):
    from duopool.cli.main import main

    on, off = workload()
    az = tmp_path / "az.csv"
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"{t:.4f},{i},{o}\n" for t, i, o in zip(on.arrival_s, on.input_tokens, on.output_tokens, strict=True)))
    ax = tmp_path / "ax.csv"
    ax.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n" + "".join(
        f"{i},{o},{i + o},1\n" for i, o in zip(off.input_tokens, off.output_tokens, strict=True)))
    out = tmp_path / "out"
    rc = main(["sim", "--policy", "ooco", "--online", str(az), "--offline", str(ax), "--instances", "4",
               "--ttft-slo-ms", "1000", "--tpot-slo-ms", "50", "--rate-scale", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["policy"] == "ooco" and s["rate_scale"] == 2.0 and s["online"]["requests"] == 60
    lat = json.loads((out / "latencies.json").read_text())
    assert len(lat["ttft_ms"]) == 60
    assert main(["sim", "--policy", "nope", "--online", str(az), "--out", str(out), "--quiet"]) == 2
