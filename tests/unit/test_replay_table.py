"""scripts/replay_table.py: medians and ranges of repeated replay summaries."""

import importlib.util
import json
import math
import pathlib

spec = importlib.util.spec_from_file_location("replay_table", pathlib.Path(__file__).parents[2] / "scripts" / "replay_table.py")
replay_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replay_table)


def _summary(path, slo, tok, plans):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({
        "online": {"slo_attainment": slo, "ttft_ms": {"p50": 10, "p99": 20}, "tpot_ms": {"p50": 5, "p99": 9}},
        "offline": {"backlogged_tok_s": tok, "backlog_ran_out_in_window": False},
        "preemptions": 0, "preemptions_in_engine": 7, "preemption_ms": {"p50": 0.0, "p99": 0.0, "samples": 0},
        "engine_plans": plans}))
    return path


def test_medians_ranges_and_missing_figures(tmp_path, capsys):
    a = _summary(tmp_path / "a", 0.9, 100.0, {"w0": {"preempt_latency_p50_ms": "NaN", "preempt_latency_p99_ms": 3},
                                              "w1": {"preempt_latency_p50_ms": 2.0, "preempt_latency_p99_ms": 8}})
    b = _summary(tmp_path / "b", 1.0, 300.0, {})
    c = _summary(tmp_path / "c", 0.8, 200.0, {})
    out = tmp_path / "t.json"
    assert replay_table.main([f"x={a},{b},{c}", "--out", str(out)]) == 0
    t = json.loads(out.read_text())["x"]
    assert t["slo_attainment"] == {"median": 0.9, "min": 0.8, "max": 1.0, "runs": 3}
    assert t["offline_backlogged_tok_s"]["median"] == 200.0
    assert t["in_engine_preemption_p99_ms"] == {"median": 8.0, "min": 8.0, "max": 8.0, "runs": 1}
    assert "| x | 90.0 (80.0–100.0) |" in capsys.readouterr().out
    assert math.isnan(replay_table.summarize([b])["in_engine_preemption_p50_ms"]["median"])
