"""pd-static sizing rule, online work share, offline capacity and the practical ceiling."""

import numpy as np
import pytest

from duopool.core.perfmodel import PerfModel
from duopool.sim import sizing
from duopool.sim.sizing import (
    offline_capacity_tok_s,
    online_work_share,
    practical_ceiling,
    rule_static_split,
)
from duopool.traces import Trace

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pm():
    return PerfModel.load("H100-SXM", "llama-3.1-8b")


def steady(rate, span, prompt, output, seed=0, name="t"):
    """Poisson arrivals at ``rate`` for ``span`` seconds, fixed prompt and output lengths."""
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1 / rate, int(rate * span * 1.2)))
    arr = arr[arr < span]
    n = len(arr)
    return Trace(name, arr - arr[0], np.full(n, prompt, dtype=np.int64), np.full(n, output, dtype=np.int64))


# ---------------------------------------------------------------- online work share and the ceiling
def test_share_and_ceiling_hand_computed(pm):
    t = Trace("two", np.array([0.0, 10.0]), np.array([1000, 3000]), np.array([1, 101]))
    bsz = pm.saturation_batch()
    per_token = pm.chunked_step_time_s((), bsz, bsz * (3000 + 101 / 2)) / bsz
    work = pm.prefill_time_s(1000) + pm.prefill_time_s(3000) + 0 * per_token + 100 * per_token
    share = work / (10.0 * 4)
    assert online_work_share(t, pm, 4) == pytest.approx(share, rel=1e-12)
    assert 0.001 < share < 0.01  # a sane magnitude: ~0.1 s of prefill and 100 decode tokens over 40 s
    assert practical_ceiling(t, pm, 4, 2000.0) == pytest.approx(4 * 2000.0 * (1 - share), rel=1e-12)
    assert practical_ceiling(None, pm, 4, 2000.0) == 8000.0  # no online work: every instance is offline


def test_share_grows_linearly_with_rate_scale(pm):
    rng = np.random.default_rng(1)
    n = 500
    t = Trace("r", np.sort(rng.uniform(0, 600, n)), rng.integers(10, 4000, n), rng.integers(1, 600, n))
    base = online_work_share(t, pm, 8)
    assert base > 0
    for s in (2.0, 4.0):
        assert online_work_share(t.scaled(s), pm, 8) == pytest.approx(s * base, rel=1e-9)
    assert online_work_share(t, pm, 4) == pytest.approx(2 * base, rel=1e-12)  # half the instances
    assert practical_ceiling(t.scaled(1000.0), pm, 8, 1.0) == 0.0  # overload: the ceiling stops at 0


def test_share_errors(pm):
    assert online_work_share(None, pm, 8) == 0.0
    with pytest.raises(ValueError, match="positive span"):
        online_work_share(Trace("one", np.array([0.0]), np.array([10]), np.array([5])), pm, 8)
    with pytest.raises(ValueError, match="'instances'"):
        online_work_share(None, pm, 0)
    with pytest.raises(ValueError, match="'per_instance_tok_s'"):
        practical_ceiling(None, pm, 8, -1.0)


def test_offline_capacity_runs_the_simulator_once(monkeypatch):
    rng = np.random.default_rng(0)
    off = Trace("off-test", np.zeros(100), rng.integers(500, 3000, 100), rng.integers(20, 300, 100))
    cap = offline_capacity_tok_s(off, "H100-SXM", "llama-3.1-8b", 1, seed=0, duration_s=60.0)
    # one H100 decoding a backlog of 8B requests: hundreds to a few thousand tokens/s
    assert 300 < cap < 10_000
    calls = []
    monkeypatch.setattr(sizing, "Simulator", lambda *a, **k: calls.append(a))
    assert offline_capacity_tok_s(off, "H100-SXM", "llama-3.1-8b", 1, seed=0, duration_s=60.0) == cap
    assert not calls  # served from the cache
    with pytest.raises(ValueError, match="'duration_s'"):
        offline_capacity_tok_s(off, "H100-SXM", "llama-3.1-8b", 1, duration_s=0)
    with pytest.raises(ValueError, match="'offline'"):
        offline_capacity_tok_s(off.head(0), "H100-SXM", "llama-3.1-8b", 1)


# ---------------------------------------------------------------- the static split rule
def test_rule_heavy_prefill_gets_more_prefill(pm):
    t = steady(8.0, 300, prompt=8000, output=2)
    sz = rule_static_split(t, pm, 8, 1.0, 0.05)
    p, d, o = sz
    assert p + d + o == 8 and min(p, d) >= 1 and o >= 0
    assert p >= 3 and d == 1
    # P = ceil(peak bucket demand / 0.7), the demand being Σ prefill time / 30 s
    assert sz.peak_prefill_demand >= 8.0 * pm.prefill_time_s(8000) * 0.8
    assert p == int(np.ceil(sz.peak_prefill_demand / 0.7))
    assert not sz.cut and "P:D:O" in sz.explain()


def test_rule_heavy_decode_gets_more_decode(pm):
    t = steady(60.0, 300, prompt=200, output=1000)
    sz = rule_static_split(t, pm, 16, 1.0, 0.05)
    p, d, o = sz
    assert p + d + o == 16
    assert d > p and d >= 3 and p == 1
    assert sz.decode_feasible and sz.decode_step_s <= 0.5 * 0.05
    # the same load with a looser TPOT needs fewer decode instances
    assert rule_static_split(t, pm, 16, 1.0, 0.2).decode < d


def test_rule_light_load_and_cut(pm):
    light = steady(0.5, 300, prompt=500, output=100)
    assert tuple(rule_static_split(light, pm, 8, 1.0, 0.05)) == (1, 1, 6)
    assert tuple(rule_static_split(None, pm, 8, 1.0, 0.05)) == (1, 1, 6)
    assert tuple(rule_static_split(light, pm, 2, 1.0, 0.05)) == (1, 1, 0)
    heavy = steady(60.0, 300, prompt=6000, output=600)
    sz = rule_static_split(heavy, pm, 5, 1.0, 0.05)
    assert sz.cut and sz.offline == 0 and sz.prefill + sz.decode == 5 and min(sz.prefill, sz.decode) >= 1
    assert sz.prefill_needed + sz.decode_needed > 5
    with pytest.raises(ValueError, match="'instances'"):
        rule_static_split(light, pm, 1, 1.0, 0.05)
    with pytest.raises(ValueError, match="'tpot_slo_s'"):
        rule_static_split(light, pm, 8, 1.0, 0.0)


def test_rule_window_excludes_later_arrivals(pm):
    light = steady(1.0, 300, prompt=1000, output=100)
    burst = steady(40.0, 60, prompt=6000, output=500, seed=5)
    spliced = Trace.concat([light, burst], gap_s=10.0)  # the burst starts after 300 s
    assert spliced.arrival_s[len(light)] >= 300.0
    assert tuple(rule_static_split(spliced, pm, 8, 1.0, 0.05)) == tuple(rule_static_split(light, pm, 8, 1.0, 0.05))
    # ... and a window that reaches the burst does see it
    assert tuple(rule_static_split(spliced, pm, 8, 1.0, 0.05, window_s=400)) != \
        tuple(rule_static_split(light, pm, 8, 1.0, 0.05))
