"""``duopool compare`` (ceiling, best static split) and ``duopool sim --static-split``."""

import argparse
import json

import numpy as np
import pytest

from duopool.cli.compare import BEST, best_static_search, markdown_table

pytestmark = pytest.mark.unit


def write_workload(tmp_path, rate=12.0, n=720, seed=0):
    """~60 s of synthetic online arrivals (long prompts: one prefill instance cannot keep up at 12 req/s) as
    an Azure CSV, and an arXiv-format backlog."""
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1 / rate, n))
    inp, out = rng.integers(1000, 6000, n), rng.integers(20, 200, n)
    az = tmp_path / "az.csv"
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"{t:.4f},{i},{o}\n" for t, i, o in zip(arr, inp, out, strict=True)))
    oi, oo = rng.integers(500, 4000, 200), rng.integers(10, 500, 200)
    ax = tmp_path / "ax.csv"
    ax.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n" + "".join(
        f"{i},{o},{i + o},1\n" for i, o in zip(oi, oo, strict=True)))
    return az, ax


def fake_run(holds_if):
    """A stand-in for the simulator: a split holds iff ``holds_if(P, D)``; offline tok/s = 1000·O + P."""
    calls = []

    def run(jobs):
        out = []
        for _args, policy, s, split in jobs:
            assert policy == "pd-static"
            calls.append((s, split))
            p, d, o = split
            sm = {"online": {"slo_attainment": 1.0 if holds_if(p, d) else 0.5},
                  "offline": {"output_tokens_per_s": 1000.0 * o + p},
                  "config": {"policy_cfg": {"static_split": list(split)}}}
            out.append((BEST, s, sm, f"d/{s}/{p}-{d}-{o}"))
        return out

    return run, calls


def test_best_static_search_order_and_stop():
    args = argparse.Namespace(instances=5, slo_target=0.99)
    run, calls = fake_run(lambda p, d: p >= 2 and d >= 2)
    st = best_static_search(args, [1.0, 2.0], run=run)
    for s in (1.0, 2.0):
        assert st[s]["split"] == [2, 2, 1] and st[s]["holds"]
        tried = [tuple(t["split"]) for t in st[s]["tried"]]
        # O from 3 down, every P at each level, and nothing below the first level where a split held
        assert tried == [(1, 1, 3), (1, 2, 2), (2, 1, 2), (1, 3, 1), (2, 2, 1), (3, 1, 1)]
        assert [t["holds"] for t in st[s]["tried"]] == [False] * 4 + [True, False]
    assert len(calls) == 12
    # among several holding splits at the same O the highest offline tok/s wins (here: the larger P)
    run, _ = fake_run(lambda p, d: True)
    assert best_static_search(args, [1.0], run=run)[1.0]["split"] == [1, 1, 3]
    run, _ = fake_run(lambda p, d: p + d >= 4)
    assert best_static_search(args, [1.0], run=run)[1.0]["split"] == [3, 1, 1]
    # nothing holds: every split tried, no split, and the table says so
    run, calls = fake_run(lambda p, d: False)
    st = best_static_search(args, [1.0], run=run)
    assert st[1.0]["split"] is None and not st[1.0]["holds"] and len(st[1.0]["tried"]) == 1 + 2 + 3 + 4
    assert "no static split holds" in markdown_table([], 0.99, None, st, None)


def test_compare_best_static_and_ceiling(tmp_path):
    from duopool.cli.main import main

    az, ax = write_workload(tmp_path)
    out = tmp_path / "cmp"
    rc = main(["compare", "--policies", "pd-static,hygen", "--rate-scales", "1", "--online", str(az),
               "--offline", str(ax), "--instances", "4", "--ttft-slo-ms", "1000", "--tpot-slo-ms", "50",
               "--best-static", "--ceiling-duration-s", "120", "--out", str(out), "--quiet"])
    assert rc == 0
    table = (out / "table.md").read_text()
    for col in ("ceiling frac", "vs pd-static", "vs best static"):
        assert col in table
    res = json.loads((out / "results.json").read_text())
    rate = res["rates"][0]
    assert rate["rate_scale"] == 1.0 and 0.1 < rate["online_work_share"] < 0.9
    assert rate["ceiling_tok_s"] == pytest.approx(4 * rate["per_instance_tok_s"] * (1 - rate["online_work_share"]))
    best = rate["best_static"]
    assert best["holds"] and best["split"] is not None
    o_best = best["split"][2]
    tried = {tuple(t["split"]): t for t in best["tried"]}
    assert tried[tuple(best["split"])]["slo_attainment"] >= 0.99
    # no split with more offline-only instances holds, and every one of them was tried
    assert all(not t["holds"] for s, t in tried.items() if s[2] > o_best)
    assert {s for s in tried if s[2] > o_best} == {(p, 4 - o - p, o) for o in range(o_best + 1, 3)
                                                    for p in range(1, 4 - o)}
    assert o_best < 2  # this workload is too heavy for one prefill instance: 1:1:2 must fail
    assert f"pd-static best {':'.join(map(str, best['split']))}" in table
    runs = {r["policy"]: r for r in res["runs"]}
    assert set(runs) == {"pd-static", "hygen", BEST}
    hy = runs["hygen"]
    tok = hy["summary"]["offline"]["output_tokens_per_s"]
    assert hy["ceiling_frac"] == pytest.approx(tok / rate["ceiling_tok_s"])
    assert hy["vs_best_static"] == pytest.approx(tok / runs[BEST]["summary"]["offline"]["output_tokens_per_s"])
    # pd-static is the rule-sized one, and its split is recorded
    assert runs["pd-static"]["summary"]["static_split"]["mode"] == "auto"
    assert rate["pd_static_split"] == runs["pd-static"]["summary"]["config"]["policy_cfg"]["static_split"]
    assert (out / "offline_throughput_vs_load.png").exists()


def test_cli_sim_static_split(tmp_path, capsys):
    from duopool.cli.main import main
    from duopool.cli.sim import load_workload
    from duopool.core.perfmodel import PerfModel
    from duopool.sim.sizing import rule_static_split

    az, ax = write_workload(tmp_path, rate=6.0, n=240)
    base = ["sim", "--policy", "pd-static", "--online", str(az), "--offline", str(ax), "--instances", "4",
            "--ttft-slo-ms", "1000", "--tpot-slo-ms", "50", "--quiet", "--rate-scale", "2"]
    out = tmp_path / "auto"
    assert main(base + ["--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    on, _ = load_workload(argparse.Namespace(online=[str(az)], offline=None, start_s=0.0, duration_s=None,
                                             max_input=None))
    want = rule_static_split(on.scaled(2.0), PerfModel.load("H100-SXM", "llama-3.1-8b"), 4, 1.0, 0.05)
    assert s["config"]["policy_cfg"]["static_split"] == list(want)
    assert s["static_split"]["sizing"]["peak_prefill_demand"] == pytest.approx(want.peak_prefill_demand)
    assert "pd-static split: " + ":".join(map(str, want)) in capsys.readouterr().out
    assert main(base + ["--static-split", "1:2:1", "--out", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "summary.json").read_text())["config"]["policy_cfg"]["static_split"] == [1, 2, 1]
    assert main(base + ["--static-split", "fractions", "--out", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["config"]["policy_cfg"]["static_split"] is None
    for bad in ("1:1:1", "0:0:4", "1:0:3", "a:b:c", "1:2"):
        assert main(base + ["--static-split", bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--static-split 1:1:1 adds up to 3" in err and "leaves no instance for the online trace" in err


def test_compare_rejects_bad_flags_before_running(tmp_path, capsys):
    from duopool.cli.main import main

    az, ax = write_workload(tmp_path, rate=2.0, n=20)
    base = ["compare", "--policies", "ooco", "--rate-scales", "1", "--online", str(az), "--offline", str(ax),
            "--instances", "4", "--quiet"]
    assert main(base + ["--static-split", "1:1:1", "--out", str(tmp_path / "a")]) == 2
    assert main(base + ["--bursts", "10", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    err = capsys.readouterr().err
    assert "--static-split 1:1:1" in err and "--bursts must be PERIOD_S:ON_S" in err
