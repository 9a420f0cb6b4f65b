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
