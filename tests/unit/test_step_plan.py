"""The step plan for a real engine's queue (services/worker/engines/step_plan.py): HyGen's plan over
request objects shaped like vLLM's, with a latency predictor fitted to measured steps."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from duopool.worker.engines.step_plan import (
    MIN_SAMPLES,
    MeasuredPredictor,
    PlanStats,
    StatsBlock,
    StepPlanner,
    prefilling,
)

OFF = 10  # vLLM priority of offline requests


@dataclass(eq=False)
class FakeReq:
    """The attributes of vLLM's Request the planner reads."""

    request_id: str
    priority: int
    num_prompt_tokens: int
    max_tokens: int
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    arrival_time: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


def decoding(rid: str, priority: int, prompt: int, generated: int, t: float = 0.0) -> FakeReq:
    return FakeReq(rid, priority, prompt, 512, num_computed_tokens=prompt + generated - 1,
                   num_output_tokens=generated, arrival_time=t)


def true_ms(s_p: float, s_d: float, n_p: int, n_d: int) -> float:
    """The 'engine' the predictor learns: 4 ms per step, 0.02 ms per prefill token, 0.3 ms per decode."""
    return 4.0 + 0.02 * s_p + 0.0005 * s_d + 0.3 * n_d + 0.1 * n_p


def trained(n: int = 300, seed: int = 1) -> MeasuredPredictor:
    m = MeasuredPredictor()
    rng = random.Random(seed)
    for _ in range(n):
        chunks = [(rng.randint(1, 1024), 0) for _ in range(rng.randint(0, 3))]
        ctxs = [rng.randint(64, 2048) for _ in range(rng.randint(0, 40))]
        if not chunks and not ctxs:
            continue
        m.add_sample(chunks, ctxs, true_ms(sum(c for c, _ in chunks), sum(ctxs), len(chunks), len(ctxs)))
    return m


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def planner(pred: MeasuredPredictor | None = None, tpot_ms: float = 50.0) -> tuple[StepPlanner, Clock]:
    clock = Clock()
    p = StepPlanner("hygen", ttft_slo_ms=1000, tpot_slo_ms=tpot_ms, block_size=32, kv_capacity=200_000,
                    max_num_seqs=128, max_batched_tokens=2048, predictor=pred or trained(), clock=clock,
                    wall=clock)
    return p, clock


def test_predictor_fits_measured_steps_and_refits_as_they_come():
    m = MeasuredPredictor()
    rng = random.Random(0)
    for i in range(MIN_SAMPLES - 1):
        m.add_sample([(rng.randint(1, 512), 0)], [], true_ms(100, 0, 1, 0) + i * 1e-3)
    assert m.pred is None  # too few steps measured
    m = trained(400)
    assert m.pred is not None and m.fits >= 2
    assert m.pred.test_mape < 0.02
    assert m.pred.predict_ms(500, 10_000, 1, 20) == pytest.approx(true_ms(500, 10_000, 1, 20), rel=0.05)


def test_nothing_is_held_back_before_the_predictor_is_fitted():
    p, _ = planner(MeasuredPredictor())
    off = FakeReq("off", OFF, 600, 100)
    run = [decoding("on", 0, 100, 5), decoding("off2", OFF, 100, 5)]
    d = p.decide(run, [off], kv_used_tokens=300)
    assert not d.planned and d.token_budget is None and not d.evict
    assert {"off", "off2"} <= d.admit


def test_offline_prefill_fills_only_the_latency_budget():
    p, _ = planner()
    run = [decoding(f"on{i}", 0, 200, 10) for i in range(4)]
    backlog = [FakeReq(f"off{i}", OFF, 1500, 200, arrival_time=900.0 + i) for i in range(3)]
    d = p.decide(run, backlog, kv_used_tokens=1000)
    assert d.planned and not d.evict
    budget_ms = 0.8 * 50  # HyGen: hygen_budget_frac x TPOT SLO
    offline_tokens = d.token_budget - 4  # one token per decode
    assert offline_tokens > 0 and d.admit
    # the admitted offline prefill keeps the predicted step within the budget, and more would not
    assert true_ms(offline_tokens, 4 * 210, 1, 4) <= budget_ms * 1.05
    assert true_ms(offline_tokens + 200, 4 * 210, 1, 4) > budget_ms * 0.95


def test_offline_decodes_are_evicted_newest_first_for_an_online_prompt():
    p, clock = planner(tpot_ms=20.0)
    # 60 offline decodes: the decode part alone is over the 16 ms budget
    run = [decoding(f"off{i}", OFF, 300, 20, t=900.0 + i) for i in range(60)]
    online = FakeReq("new", 0, 800, 50, arrival_time=clock.t - 0.004)
    d = p.decide(run, [online], kv_used_tokens=60 * 352)
    assert d.evict, "no offline decode evicted for the online prompt"
    evicted = [r.request_id for r in d.evict]
    assert evicted == [f"off{i}" for i in range(59, 59 - len(evicted), -1)]  # the newest joined last
    assert p.preempted == len(evicted)
    p50, p99 = p.latency_percentiles()
    assert p50 == pytest.approx(4.0, abs=0.01) and p99 == pytest.approx(4.0, abs=0.01)
    assert "new" not in d.admit  # only offline ids are admitted; online runs first anyway


def test_a_continuing_offline_prefill_waits_while_a_new_online_prompt_is_scheduled():
    p, clock = planner()
    half = FakeReq("half", OFF, 2000, 100, num_computed_tokens=1000, arrival_time=900.0)
    assert prefilling(half)
    d = p.decide([half], [FakeReq("on", 0, 300, 20, arrival_time=clock.t)], kv_used_tokens=1024)
    assert "half" not in d.admit
    assert d.token_budget == 300  # the online prompt alone: the waiting chunk is not in the step's budget
    d = p.decide([half], [], kv_used_tokens=1024)  # no online prompt: it continues within the budget
    assert "half" in d.admit and 0 < d.token_budget <= 2048


def test_an_idle_engine_always_takes_offline_work():
    # a budget below the engine's fixed step cost (4 ms): the plan admits nothing, the engine still works
    p, _ = planner(tpot_ms=4.0)
    d = p.decide([], [FakeReq("off", OFF, 700, 100)], kv_used_tokens=0)
    assert d.admit == {"off"} and d.token_budget >= 700


def test_only_engine_capable_policies_are_accepted():
    with pytest.raises(ValueError, match="hygen"):
        StepPlanner("ooco", 1000, 50, 32, 1000, 8, 512)


def test_stats_block_round_trip(tmp_path):
    block = StatsBlock.create(tmp_path / "s")
    writer = StatsBlock.open(tmp_path / "s")
    st = PlanStats(steps=12, preempted=3, planned_steps=10, fitted=True, samples=40, mape=0.05,
                   latency_p50_ms=2.5, latency_p99_ms=9.0)
    writer.write(st, force=True)
    assert block.read() == st
    writer.write(PlanStats(steps=13), interval_s=60)  # throttled: not written
    assert block.read().steps == 12
    writer.close()
    block.close(unlink=True)
    assert not (tmp_path / "s").exists()
    assert math.isnan(PlanStats().mape)


def test_evicted_decodes_resume_by_the_plans_rule_not_as_new_work():
    p, clock = planner(tpot_ms=20.0)
    run = [decoding(f"off{i}", OFF, 300, 20, t=900.0 + i) for i in range(60)]
    d = p.decide(run, [FakeReq("new", 0, 800, 50, arrival_time=clock.t)], kv_used_tokens=60 * 352)
    evicted = d.evict
    assert len(evicted) > 2
    for r in evicted:  # the engine preempted them: waiting, recomputing their context when resumed
        r.num_computed_tokens = 0
    online = FakeReq("new", 0, 800, 50, num_computed_tokens=800, num_output_tokens=1, arrival_time=clock.t)
    # the next step has room: as new work they would all be admitted within the prefill room; as the plan's
    # swapped decodes they come back by its resume rule, two a step (the oldest first), their recompute in
    # the step's token budget
    clock.t += 0.02
    oldest_first = sorted(evicted, key=lambda r: r.arrival_time)
    d2 = p.decide([online], oldest_first, kv_used_tokens=1000)
    back = [r for r in oldest_first if r.request_id in d2.admit]
    assert [r.request_id for r in back] == [r.request_id for r in oldest_first[:2]]
    assert d2.token_budget >= sum(r.num_tokens for r in back) + 1
    # once running again they are ordinary decodes; the rest still wait to be resumed
    for r in back:
        r.num_computed_tokens = r.num_tokens - 1
    d3 = p.decide([online, *back], oldest_first[2:], kv_used_tokens=2000)
    assert len([r for r in oldest_first[2:] if r.request_id in d3.admit]) <= 2


def test_bias_correction_holds_the_budget_in_measured_time():
    """Steps that run slower than the fit predicts (the host got busier): the moving measured/predicted ratio
    rises and the plan admits less offline prefill, so measured steps come back within the budget."""
    m = trained(300)
    p, _ = planner(m)
    run = [decoding(f"on{i}", 0, 200, 10) for i in range(4)]
    backlog = [FakeReq(f"off{i}", OFF, 1500, 200, arrival_time=900.0 + i) for i in range(3)]
    before = p.decide(run, backlog, kv_used_tokens=1000).token_budget
    assert m.bias == pytest.approx(1.0, abs=0.05)
    rng = random.Random(5)
    for _ in range(200):  # the same shapes now take twice as long
        chunks = [(rng.randint(1, 1024), 0)]
        ctxs = [rng.randint(64, 2048) for _ in range(rng.randint(0, 40))]
        m.add_sample(chunks, ctxs, 2 * true_ms(chunks[0][0], sum(ctxs), 1, len(ctxs)))
    # the refits take in the slow steps too: fit and bias together predict the measured time
    assert m.bias > 1.05
    assert m.pred.predict_ms(500, 5000, 1, 20) * m.bias == pytest.approx(2 * true_ms(500, 5000, 1, 20), rel=0.25)
    after = p.decide(run, backlog, kv_used_tokens=1000).token_budget
    assert after < before
    offline_tokens = after - 4
    assert 2 * true_ms(offline_tokens, 4 * 210, 1, 4) <= 0.8 * 50 * 1.1  # measured time within the budget


def test_online_prompts_get_a_sequence_slot_when_offline_decodes_fill_the_engine():
    clock = Clock()
    p = StepPlanner("hygen", ttft_slo_ms=1000, tpot_slo_ms=1000, block_size=32, kv_capacity=10_000_000,
                    max_num_seqs=16, max_batched_tokens=2048, predictor=trained(), clock=clock, wall=clock)
    run = [decoding(f"off{i}", OFF, 100, 5, t=900.0 + i) for i in range(16)]  # every slot, within the budget
    online = [FakeReq(f"on{k}", 0, 100, 10, arrival_time=clock.t) for k in range(3)]
    d = p.decide(run, online, kv_used_tokens=16 * 140)
    assert [r.request_id for r in d.evict] == ["off15", "off14", "off13"]
    # offline admission itself stops short of the limit: slots stay free for online arrivals
    d = p.decide(run[:12], [FakeReq(f"new{k}", OFF, 100, 10, arrival_time=950.0 + k) for k in range(8)],
                 kv_used_tokens=12 * 140)
    assert len(d.admit & {f"new{k}" for k in range(8)}) == 16 - 16 // 8 - 12
