"""`duopool bench replay` end to end on a small SIMULATED cluster: online requests from a trace file, the
offline backlog as several batch jobs (as a large backlog is submitted), the research policy's step plans
inside the engines, and the summary's offline figures (tokens as generated, none lost or answered twice)."""

import argparse
import json

import pytest

from duopool.bench import replay

pytestmark = pytest.mark.integration


def _trace(path, rows):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"2023-11-16 18:15:{s:06.3f},{p},{o}\n" for s, p, o in rows))
    return path


def test_replay_with_step_plans_and_a_backlog_in_several_jobs(tmp_path, monkeypatch):
    online = _trace(tmp_path / "online.csv", [(1.0 + 0.5 * k, 200 + 10 * k, 20) for k in range(8)])
    offline = _trace(tmp_path / "offline.csv", [(0.0, 300 + 7 * k, 30 + k) for k in range(25)])
    monkeypatch.setattr(replay, "JOB_ITEMS", 10)  # 25 requests: three jobs
    parser = argparse.ArgumentParser()
    replay.register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--online", str(online), "--offline", str(offline), "--offline-requests",
                              "25", "--prefill", "1", "--decode", "1", "--duration", "5", "--policy", "hygen",
                              "--drain-timeout", "60", "--tpot-slo-ms", "50", "--out", str(tmp_path / "out")])
    assert replay.run(args) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["online"]["requests"] == 8 and s["online"]["failed"] == 0
    off = s["offline"]
    assert off["requests"] == 25 and off["drained"] and off["lost"] == 0 and off["duplicated"] == 0
    # tokens as generated since the backlog was submitted: at least those of the requests finished by the end
    # of the window (a request may have started while the jobs were being submitted)
    assert off["generated_tokens_since_submit"] >= off["output_tokens_per_s"] * s["window_s"] - 1 > 0
    assert 0 < off["generated_tokens"] <= off["generated_tokens_since_submit"]
    assert off["backlogged_tok_s"] > 0
    assert any(k.startswith("place:mixed instance") for k in s["decisions_in_window"])
    assert s["preemptions_in_engine"] >= 0
    assert s["park_kv"] == "on"
    cpu = s["cpu"]  # every cluster process and the client, measured over the window
    assert {"router", "scheduler", "kvtransfer", "replay-client"} <= set(cpu["seconds"]), cpu
    assert all(v >= 0 for v in cpu["seconds"].values()) and cpu["seconds"]["replay-client"] > 0
    assert 0 < cpu["total_share_of_host"] <= 1.5
    # every preempted offline request that resumed did so once, from parked KV or recomputing with a reason
    pre = s["preemption"]
    assert pre["recomputed"] == sum(pre["recomputed_by_reason"].values())
    assert pre["tokens_not_recomputed"] >= 16 * pre["parked"]


def test_ooco_moves_running_offline_decodes_to_the_puller_without_a_requeue(tmp_path):
    """``--offline-moves on``: OOCO's strict worker pulls running offline decodes from the relaxed one; each
    stops there with its KV parked and the dispatcher hands it straight to the puller (a move, not a
    re-queue), which decodes on from the parked KV: every request still finishes exactly once."""
    online = _trace(tmp_path / "online.csv", [(1.0 + 1.0 * k, 200, 20) for k in range(4)])
    offline = _trace(tmp_path / "offline.csv", [(0.0, 400 + 11 * k, 300 + 5 * k) for k in range(30)])
    parser = argparse.ArgumentParser()
    replay.register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--online", str(online), "--offline", str(offline), "--offline-requests",
                              "30", "--prefill", "1", "--decode", "1", "--duration", "5", "--policy", "ooco",
                              "--offline-moves", "on", "--drain-timeout", "90", "--tpot-slo-ms", "50",
                              "--out", str(tmp_path / "out")])
    assert replay.run(args) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["online"]["requests"] == 4 and s["online"]["failed"] == 0
    off = s["offline"]
    assert off["requests"] == 30 and off["drained"] and off["lost"] == 0 and off["duplicated"] == 0
    moved = s["preemption"]["moved"]
    assert moved > 0, s["decisions_in_window"]
    assert any(k.startswith("move:pull") for k in s["decisions_in_window"])
    # a move resumes from the parked KV: its context is loaded, not recomputed
    assert s["preemption"]["parked"] >= moved
