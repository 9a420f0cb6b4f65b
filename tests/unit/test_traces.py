"""Trace loaders for the three formats."""

import json

import numpy as np
import pytest

from duopool.traces import Trace, load_arxiv, load_azure, load_mooncake, load_trace

pytestmark = pytest.mark.unit


@pytest.fixture
def azure(tmp_path):
    p = tmp_path / "az.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:50.9951690,396,109\n"
                 "2023-11-16 18:15:48.0000000,10,0\n")
    return p


def test_azure(azure):
    t = load_trace(azure)
    assert len(t) == 3
    assert t.arrival_s[0] == 0.0
    assert t.arrival_s.tolist() == pytest.approx([0.0, 1.31941, 4.314579], abs=1e-5)  # sorted by time
    assert t.input_tokens.tolist() == [374, 10, 396]
    assert t.output_tokens.tolist() == [44, 1, 109]  # 0 generated tokens clipped to 1


def test_arxiv(tmp_path):
    p = tmp_path / "ax.csv"
    p.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.8\n2015,156,2171,12.9\n")
    t = load_trace(p)
    assert t.input_tokens.tolist() == [3772, 2015]
    assert t.output_tokens.tolist() == [54, 156]
    assert (t.arrival_s == 0).all()
    assert load_arxiv(p).input_tokens.tolist() == [3772, 2015]


def test_mooncake(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in [
        {"timestamp": 0, "input_length": 40160, "output_length": 6, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 600, "output_length": 4, "hash_ids": [0, 9]},
    ]) + "\n")
    t = load_trace(p)
    assert t.arrival_s.tolist() == [0.0, 1.5]
    assert t.prefix_hashes == ((0, 1, 2), (0, 9))
    assert load_mooncake(p).input_tokens.tolist() == [40160, 600]


def test_bad_format(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(p)
    with pytest.raises(ValueError, match="expected columns"):
        load_azure(p)


def test_scale_window_concat(azure):
    t = load_trace(azure)
    s = t.scaled(2.0)
    assert s.arrival_s.tolist() == pytest.approx((t.arrival_s / 2).tolist())
    w = t.window(1.0, 10.0)
    assert len(w) == 2 and w.arrival_s[0] == pytest.approx(0.31941, abs=1e-5)
    c = Trace.concat([t, t], gap_s=1.0)
    assert len(c) == 6 and np.all(np.diff(c.arrival_s) >= 0)
    assert c.arrival_s[3] == pytest.approx(t.arrival_s[-1] + 1.0)
    with pytest.raises(ValueError):
        t.scaled(0)


def test_real_traces_if_present():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"
    az = root / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
    if not az.exists():
        pytest.skip("shared traces not present")
    t = load_azure(az)
    assert len(t) == 19366
    assert 3500 < t.duration_s < 3700
    assert 1000 < t.input_tokens.mean() < 1300


def _uniform(n=400, span=100.0):
    rng = np.random.default_rng(3)
    return Trace("u", np.sort(rng.uniform(0, span, n)) - 0.0, rng.integers(10, 2000, n), rng.integers(50, 400, n))


def test_with_outputs_resamples_in_range_deterministically():
    t = _uniform()
    v = t.with_outputs(5, 20, seed=1)
    assert v.output_tokens.min() >= 5 and v.output_tokens.max() <= 20
    assert set(v.output_tokens.tolist()) == set(range(5, 21))  # both ends reachable (400 draws of 16 values)
    assert v.arrival_s is t.arrival_s and v.input_tokens is t.input_tokens
    assert v.output_tokens.tolist() == t.with_outputs(5, 20, seed=1).output_tokens.tolist()
    assert v.output_tokens.tolist() != t.with_outputs(5, 20, seed=2).output_tokens.tolist()
    assert t.with_outputs(7, 7).output_tokens.tolist() == [7] * len(t)
    assert t.output_tokens.min() >= 50  # the original is untouched
    with pytest.raises(ValueError, match="'lo'"):
        t.with_outputs(0, 5)
    with pytest.raises(ValueError, match="'hi'"):
        t.with_outputs(10, 5)
    with pytest.raises(ValueError, match="'seed'"):
        t.with_outputs(1, 5, seed=-1)


def test_bursty_compresses_each_period_and_keeps_the_mean_rate():
    t = _uniform(n=2000, span=120.0)
    b = t.bursty(20.0, 5.0)
    assert len(b) == len(t) and np.all(np.diff(b.arrival_s) >= 0)
    k = np.floor(t.arrival_s / 20.0)
    assert np.all(np.floor(b.arrival_s / 20.0) == k)  # each arrival stays in its period ...
    assert np.all(b.arrival_s - k * 20.0 < 5.0 + 1e-9)  # ... inside its first 5 s
    assert b.arrival_s == pytest.approx(k * 20.0 + (t.arrival_s - k * 20.0) / 4.0)  # the linear map
    # same requests per period (mean rate unchanged), 4x the rate inside a burst
    assert np.bincount(k.astype(int)).tolist() == np.bincount(np.floor(b.arrival_s / 20).astype(int)).tolist()
    in_burst = np.sum(b.arrival_s < 5.0) / 5.0
    assert in_burst == pytest.approx(4 * np.sum(t.arrival_s < 20.0) / 20.0)
    # order kept: the lengths follow their arrivals
    assert b.input_tokens.tolist() == t.input_tokens.tolist()
    assert t.bursty(20.0, 20.0).arrival_s == pytest.approx(t.arrival_s)
    # rate scaling afterwards divides the period too
    s = b.scaled(2.0)
    assert np.all(s.arrival_s - np.floor(s.arrival_s / 10.0) * 10.0 < 2.5 + 1e-9)
    with pytest.raises(ValueError, match="'period_s'"):
        t.bursty(0.0, 1.0)
    with pytest.raises(ValueError, match="'on_s'"):
        t.bursty(10.0, 11.0)
    with pytest.raises(ValueError, match="'on_s'"):
        t.bursty(10.0, 0.0)


def test_cli_workload_variants_applied_before_rate_scale(tmp_path):
    import argparse

    from duopool.cli.sim import add_workload_args, load_workload, workload_info

    t = _uniform(n=300, span=60.0)
    az = tmp_path / "az.csv"
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"{a:.6f},{i},{o}\n" for a, i, o in zip(t.arrival_s, t.input_tokens, t.output_tokens, strict=True)))
    p = argparse.ArgumentParser()
    add_workload_args(p)
    args = p.parse_args(["--online", str(az), "--output-range", "5:20", "--bursts", "20:5",
                         "--workload-seed", "3", "--duration-s", "40"])
    on, _ = load_workload(args)
    assert len(on) == int(np.sum(t.arrival_s - t.arrival_s[0] < 40))  # the window first
    assert on.output_tokens.min() >= 5 and on.output_tokens.max() <= 20
    assert np.all(on.arrival_s - np.floor(on.arrival_s / 20) * 20 < 5 + 1e-6)
    assert workload_info(args)["output_range"] == [5, 20] and workload_info(args)["bursts"] == [20.0, 5.0]
    assert workload_info(args)["workload_seed"] == 3
    for flag, bad, msg in (("--output-range", "5", "--output-range"), ("--output-range", "9:3", "'hi'"),
                           ("--bursts", "10:x", "--bursts"), ("--bursts", "10:20", "'on_s'")):
        with pytest.raises(ValueError, match=msg):
            load_workload(p.parse_args(["--online", str(az), flag, bad]))
