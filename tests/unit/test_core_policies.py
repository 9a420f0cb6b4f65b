"""Policies on small scripted scenarios (driven through the simulator's event loop)."""

import numpy as np
import pytest

from duopool.core.perfmodel import PerfModel
from duopool.core.placement import (
    PoolName,
    Role,
    get_placement_policy,
    placement_policy_names,
)
from duopool.core.policies import PolicyConfig, get_policy, policy_names
from duopool.core.state import OFFLINE, ONLINE, Phase
from duopool.sim import SimConfig, Simulator
from duopool.traces import Trace

pytestmark = pytest.mark.unit

ALL = ["pd-static", "online-priority", "hygen", "tropical", "ooco", "dopd", "ooco+dopd"]


def trace(arrivals, inp, out, name="t"):
    return Trace(name, np.asarray(arrivals, float), np.asarray(inp, np.int64), np.asarray(out, np.int64))


def backlog(n=50, inp=3000, out=200):
    return trace([0.0] * n, [inp] * n, [out] * n, "backlog")


def sim(policy, online, offline, n=4, **kw):
    pc = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, **kw.pop("pc", {}))
    return Simulator(SimConfig(policy=policy, instances=n, policy_cfg=pc, **kw), online, offline)


def test_all_policies_registered_and_none_keeps_a_separate_live_rule():
    assert set(ALL) <= set(policy_names())
    # the research policies run through the decision core live, never through the least-loaded rule
    assert not set(ALL) & set(placement_policy_names())
    assert "least-loaded" in placement_policy_names()
    for name in ALL:
        with pytest.raises(ValueError):
            get_placement_policy(name)


def test_layouts():
    pm = PerfModel.load()
    assert [r for r, _, _ in get_policy("ooco", pm).layout(8)].count(Role.PREFILL) == 4
    lay = get_policy("pd-static", pm, PolicyConfig(offline_share=0.25)).layout(8)
    assert sum(off for *_, off in lay) == 2
    assert all(r == Role.MIXED for r, _, _ in get_policy("hygen", pm).layout(4))


@pytest.mark.parametrize("policy", ALL)
def test_every_request_finishes(policy):
    on = trace(np.arange(20) * 0.2, [500 + 100 * (i % 5) for i in range(20)], [30] * 20)
    s = sim(policy, on, backlog(30), n=4)
    res = s.run()
    assert all(r.phase == Phase.DONE for r in res.online)
    for r in res.online:
        assert r.first_token_t >= r.arrival and r.finish_t >= r.first_token_t
    assert res.offline_tokens > 0  # offline work made progress next to online traffic
    for inst in s.cluster.instances:  # accounting returns to a consistent state
        assert inst.kv_reserved >= 0 and inst.n_dec[0] >= 0 and inst.n_dec[1] >= 0


def test_ooco_fast_preemption_of_offline_prefill():
    """An online arrival on a relaxed instance running an offline prefill step starts within a layer."""
    on = trace([0.5], [2000], [5])
    s = sim("ooco", on, backlog(40, inp=4000), n=2)
    res = s.run()
    r = res.online[0]
    pm = s.pm
    layer = pm.step_time_s([8192]) / pm.model.num_hidden_layers
    ttft = r.first_token_t - r.arrival
    assert ttft <= layer + pm.step_time_s([2000]) + 1e-6
    assert sum(o.preemptions for o in res.offline) >= 1


def test_online_priority_waits_for_offline_step():
    """No fast preemption: the same arrival waits for the running offline step."""
    on = trace([0.5], [2000], [5])
    a = sim("ooco", on, backlog(40, inp=4000), n=2).run().online[0]
    b = sim("online-priority", on, backlog(40, inp=4000), n=2).run().online[0]
    assert (b.first_token_t - b.arrival) > (a.first_token_t - a.arrival)


def test_ooco_strict_instance_evicts_offline_when_online_needs_step_budget():
    """Online spike: strict instances must push offline decodes out so the step fits the TPOT target."""
    pm = PerfModel.load()
    on = trace(np.full(60, 20.0) + np.arange(60) * 0.001, [3000] * 60, [400] * 60)
    s = sim("ooco", on, backlog(600, inp=3000, out=2000), n=2)
    res = s.run()
    assert sum(o.preemptions for o in res.offline) > 0
    target = s.policy.step_target()
    strict = [i for i in s.cluster.instances if i.pool == PoolName.STRICT]
    assert strict
    # every online request met the TPOT SLO despite the offline load the strict pool had pulled
    tpots = [(r.finish_t - r.first_token_t) / (r.output - 1) for r in res.online]
    assert max(tpots) <= 0.05 + 1e-3, max(tpots)
    assert target <= 0.05
    del pm


def test_ooco_pull_moves_offline_decode_to_strict_pool():
    s = sim("ooco", None, backlog(20, inp=1000, out=3000), n=2, offline_limit=20, max_time_s=5.0)
    s.run()
    strict = [i for i in s.cluster.instances if i.pool == PoolName.STRICT][0]
    assert strict.n_dec[OFFLINE] > 0 and strict.n_dec[ONLINE] == 0


def test_hygen_step_stays_within_budget():
    on = trace(np.arange(40) * 0.05, [800] * 40, [50] * 40)
    s = sim("hygen", on, backlog(100), n=2)
    res = s.run()
    tpots = [(r.finish_t - r.first_token_t) / (r.output - 1) for r in res.online]
    assert np.percentile(tpots, 99) <= 0.05
    assert res.offline_tokens > 0


def test_no_offline_request_starves():
    """A finite backlog next to steady online load: every offline request completes."""
    for policy in ("hygen", "ooco", "online-priority"):
        on = trace(np.arange(300) * 0.1, [600] * 300, [100] * 300)
        s = sim(policy, on, backlog(60, inp=2000, out=300), n=2, offline_limit=60)
        res = s.run()
        if not all(r.phase == Phase.DONE for r in res.offline):  # online ended first: run the rest
            s2 = sim(policy, None, backlog(60, inp=2000, out=300), n=2, offline_limit=60)
            res = s2.run()
        assert all(r.phase == Phase.DONE for r in res.offline), policy


def test_tropical_multiplexes_short_prompts_on_decode_instances():
    on = trace(np.arange(10) * 0.3, [100] * 10, [20] * 10)
    s = sim("tropical", on, None, n=2)
    res = s.run()
    decode_idx = [i.idx for i in s.cluster.instances if i.role == Role.DECODE]
    # short prompts never need a KV transfer: TTFT is one small prefill step
    for r in res.online:
        assert r.first_token_t - r.arrival < 0.05
    assert decode_idx


def _cluster_with_decodes(n_dec_per_instance):
    from duopool.core.state import Cluster, Instance, Req

    insts = [Instance(i, Role.PREFILL if i < 4 else Role.DECODE, PoolName.RELAXED if i < 4 else PoolName.STRICT,
                      400_000) for i in range(8)]
    rid = 0
    for inst in insts[4:]:
        for _ in range(n_dec_per_instance):
            r = Req(rid, ONLINE, 0.0, 2000, 500, generated=1, first_token_t=0.0)
            rid += 1
            inst.add_decode(r)
    return Cluster(insts)


@pytest.mark.parametrize("policy", ["dopd", "ooco+dopd"])
def test_dopd_ratio_follows_forecast_prefill_demand(policy):
    pol = get_policy(policy, PerfModel.load(), PolicyConfig(tpot_slo_s=0.05, dopd_tick_s=10))
    c = _cluster_with_decodes(200)  # 800 online decodes: several decode instances needed
    c.arrived_prefill_s = 0.5  # 0.05 s of prefill work per second: little prefill demand
    acts = pol.tick(c, 10.0)
    assert acts and all(a.role == Role.DECODE for a in acts)  # gives a prefill instance back to decode
    c2 = _cluster_with_decodes(10)  # the decode batch drains ...
    c2.arrived_prefill_s = c.arrived_prefill_s + 60.0  # ... and 6 s of prefill work per second arrive
    acts = pol.tick(c2, 20.0)
    assert acts and all(a.role == Role.PREFILL for a in acts)
    assert len(acts) <= 2  # at most two role changes per tick


@pytest.mark.parametrize("policy", ["dopd", "ooco+dopd"])
def test_dopd_shares_instances_when_both_sides_are_short(policy):
    """Prefill demand for ~10 instances and a decode batch for many more on 8: the split follows the two
    needs in proportion instead of handing everything to prefill (which broke TPOT on long-context work)."""
    pol = get_policy(policy, PerfModel.load(), PolicyConfig(tpot_slo_s=0.05, dopd_tick_s=10))
    c = _cluster_with_decodes(200)
    c.arrived_prefill_s = 60.0
    need_d = pol.ctrl.decode_instances_needed(c)
    assert need_d > 4
    acts = pol.tick(c, 10.0)
    n_pre = 4 + sum(a.role == Role.PREFILL for a in acts) - sum(a.role == Role.DECODE for a in acts)
    need_p = 10  # ceil(6 s/s / 0.6)
    assert n_pre <= max(4, round(8 * need_p / (need_p + need_d)))


def test_dopd_reassigns_roles_in_the_simulator():
    short = trace(np.arange(200) * 0.25, [200] * 200, [200] * 200)
    long = trace(np.arange(200) * 0.25, [12000] * 200, [20] * 200)
    on = Trace.concat([short, long], gap_s=0.25)
    s = sim("dopd", on, None, n=8, pc={"dopd_tick_s": 5.0})
    res = s.run()
    assert len(res.role_history) > 1
    assert all(r.phase == Phase.DONE for r in res.online)
    for _, roles in res.role_history:
        assert "prefill" in roles and "decode" in roles


HOLDING = ["hygen", "ooco", "ooco+dopd", "dopd"]


@pytest.mark.parametrize("policy", HOLDING)
def test_short_outputs_meet_tpot_next_to_offline_work(policy):
    """Code-completion-like online work (5-8 output tokens, bursts) next to a long offline backlog: the KV
    transfer and the wait to join a batch land in a short request's TPOT, so the step target must shrink
    for it (deadline-based) instead of running at 0.9 x TPOT."""
    rng = np.random.default_rng(3)
    n = 150
    arrivals = np.sort(np.concatenate([rng.uniform(k * 10, k * 10 + 2, 25) for k in range(6)]))  # 2 s bursts
    on = trace(arrivals, rng.integers(200, 3000, n), rng.integers(5, 9, n))
    res = sim(policy, on, backlog(400, inp=2500, out=300), n=4).run()
    tpot_slo = 0.05
    ok = [r.phase == Phase.DONE and (r.finish_t - r.first_token_t) / (r.output - 1) <= tpot_slo for r in res.online]
    assert sum(ok) / n >= 0.99, f"{policy}: {sum(ok)}/{n} short requests met TPOT"
    assert res.offline_tokens > 0


@pytest.mark.parametrize("policy", ["ooco", "dopd"])
def test_long_prompt_short_output_decodes_where_it_was_prefilled(policy):
    """A 16 k prompt's KV takes ~60 ms to move: more than a 3-token answer's whole TPOT budget. It decodes on
    its prefill instance; a short prompt with a long answer still moves to a decode instance."""
    on = trace([0.0, 0.5], [16000, 500], [3, 200])
    s = sim(policy, on, backlog(50), n=4)
    res = s.run()
    assert s.policy.transfer_breaks_tpot(res.online[0]) and not s.policy.transfer_breaks_tpot(res.online[1])
    assert res.kv["online_transfers"] == 1  # only the second request moved
    long_req = res.online[0]
    assert (long_req.finish_t - long_req.first_token_t) / 2 <= 0.05


def test_online_step_target_follows_the_tightest_deadline():
    pm = PerfModel.load()
    pol = get_policy("ooco", pm, PolicyConfig(tpot_slo_s=0.05))
    s = sim("ooco", trace([0.0], [1000], [300]), None, n=2)
    inst = s.cluster.instances[1]
    assert pol.online_step_target(inst, 0.0) == pytest.approx(0.9 * 0.05)  # nothing online: step margin
    from duopool.core.state import Req
    r = Req(1, ONLINE, 0.0, 1000, 5)
    r.first_token_t, r.generated = 0.0, 1
    inst.add_decode(r, 0.05)
    # 4 tokens to go by 0.95 x 50 ms x 4 after the first token; 30 ms already spent on transfer and join
    assert pol.online_step_target(inst, 0.03) == pytest.approx((0.95 * 0.05 * 4 - 0.03) / 4)


@pytest.mark.parametrize("policy", ["ooco", "dopd"])
def test_burst_overflows_to_decode_instances(policy):
    """40 long prompts at once: the two prefill instances would reach the last ones after ~1 s, so decode
    instances take some (in chunks inside their step target) and every first token comes sooner."""
    on = trace(np.zeros(40), [4000] * 40, [20] * 40)
    pm = PerfModel.load()
    ttfts = []
    for frac in (0.0, 0.5):  # 0: overflow off
        pol = get_policy(policy, pm, PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05))
        pol.overflow_frac = frac
        res = Simulator(SimConfig(policy=policy, instances=4, policy_cfg=pol.cfg), on, backlog(20), perf=pm,
                        policy=pol).run()
        assert all(r.phase == Phase.DONE for r in res.online)
        ttfts.append(max(r.first_token_t - r.arrival for r in res.online))
    assert ttfts[1] < 0.8 * ttfts[0], ttfts
