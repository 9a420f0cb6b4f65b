"""The decision core (duopool.core.brain) in live mode: events in, effects out, on a mirror of the cluster."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from duopool.common.config import SchedulerConfig
from duopool.common.registry import WorkerRecord
from duopool.core.brain import (
    ENGINE_QUEUE,
    Arrived,
    Brain,
    Finished,
    FirstToken,
    Hold,
    Move,
    Place,
    Preempt,
    Reject,
    SetRole,
    Tick,
    WorkerGone,
    WorkerReport,
)
from duopool.core.perfmodel import PerfModel
from duopool.core.placement import PoolName, RequestClass, Role
from duopool.core.policies import PolicyConfig, get_policy
from duopool.core.state import OFFLINE, ONLINE, Phase, Req
from duopool.scheduler.brain_driver import LAYOUT_SETTLE_S, BrainDriver, build_brain, worker_report
from duopool.sim import SimConfig, Simulator
from duopool.traces import Trace
from duopool.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.unit

PM = PerfModel.load("H100-SXM", "llama-3.1-8b")
P, D, M = Role.PREFILL, Role.DECODE, Role.MIXED
R, S = PoolName.RELAXED, PoolName.STRICT
PD2 = [("p0", P, R), ("p1", P, R), ("d0", D, S), ("d1", D, S)]


def make_brain(policy="ooco", tpot=0.05, pc=None, **kw):
    cfg = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=tpot, **(pc or {}))
    return Brain(get_policy(policy, PM, cfg), **kw)


def join(brain, workers, now=0.0):
    for wid, role, pool in workers:
        brain.handle(WorkerReport(wid, role, pool), now)


def online(rid, prompt=1000, out=100, **kw):
    return Arrived(rid, RequestClass.ONLINE, prompt, out, **kw)


def offline(rid, prompt=3000, out=500, **kw):
    return Arrived(rid, RequestClass.OFFLINE, prompt, out, **kw)


def inst(brain, name):
    return brain.cluster.instances[brain.index[name]]


def assert_empty(brain):
    assert not brain.reqs and not brain.meta
    for i in brain.cluster.instances:
        assert not i.waiting and not i.waiting_off and i.queued_prefill_tokens == 0
        assert i.n_dec == [0, 0] and not i.decoding and i.incoming == 0
        assert i.kv_reserved == 0 and i.kv_used() == 0


def offline_decodes_on_strict(brain, n=12):
    """Offline decodes on strict worker d0 through events: they start on p0, d0 pulls some (``Move``), and the
    pulled ones are offered again under their work-item key and resume on d0. Returns the ids on d0."""
    for i in range(n):
        brain.handle(offline(f"o{i}", key=f"k{i}"), 0.0)
        brain.handle(FirstToken(f"o{i}"), 0.0)
    moves = [e for e in brain.handle(Tick(), 1.0) if isinstance(e, Move)]
    assert moves and all(m.dst == "d0" for m in moves)
    for m in moves:
        (placed,) = brain.handle(offline(m.request_id, key="k" + m.request_id[1:]), 1.0)
        assert (placed.prefill, placed.decode) == ("d0", "d0")
        brain.handle(FirstToken(m.request_id), 1.0)
    return [m.request_id for m in moves]


# ------------------------------------------------------------------------------------------- route
def test_online_route_prefill_then_decode_and_least_queued():
    brain = make_brain()
    join(brain, PD2)
    (a,) = brain.handle(online("a"), 0.0)
    assert isinstance(a, Place)
    assert inst(brain, a.prefill).role == P and inst(brain, a.decode).role == D
    (b,) = brain.handle(online("b"), 0.0)
    # "a" is queued on its prefill worker: the other one has fewer queued prompt tokens
    assert b.prefill != a.prefill and inst(brain, b.prefill).role == P
    assert inst(brain, a.prefill).queued_prefill_tokens == 1000


def test_route_honours_exclude():
    brain = make_brain()
    join(brain, PD2)
    for k in range(6):
        (e,) = brain.handle(online(f"x{k}", exclude=frozenset({"p0", "d1"})), 0.0)
        assert isinstance(e, Place) and e.prefill != "p0" and e.decode != "d1"
    # every prefill worker excluded: another worker prefills it
    (e,) = brain.handle(online("y", exclude=frozenset({"p0", "p1"})), 0.0)
    assert isinstance(e, Place) and e.prefill not in {"p0", "p1"}
    (e,) = brain.handle(online("z", exclude=frozenset(brain.names)), 0.0)
    assert isinstance(e, Reject) and "z" not in brain.reqs


def test_route_excluded_falls_back_to_an_offline_only_worker():
    # pd-static: the online workers all excluded, only the offline-only one is left; the brain's fallback
    # ("the least queued other", offline-only ones when nothing else is left) must place it there, not raise
    brain = make_brain("pd-static")
    join(brain, [(f"w{k}", M, R) for k in range(4)])
    brain.handle(Tick(), 0.0)
    off_only = [n for n in brain.names if inst(brain, n).offline_only]
    assert len(off_only) == 1
    ex = frozenset(brain.names) - set(off_only)
    (e,) = brain.handle(online("on", exclude=ex), 0.0)
    assert isinstance(e, Place) and e.prefill == off_only[0]


def test_no_workers_rejects():
    brain = make_brain()
    for ev in (online("a"), offline("b")):
        (e,) = brain.handle(ev, 0.0)
        assert isinstance(e, Reject) and e.request_id == ev.request_id and e.reason
    assert not brain.reqs


# ------------------------------------------------------------------------------------------- mirror
def test_first_token_moves_request_to_decode_batch_and_finished_empties_mirror():
    brain = make_brain()
    join(brain, PD2)
    (pl,) = brain.handle(online("a", prompt=1200, out=50), 0.0)
    src, dst = inst(brain, pl.prefill), inst(brain, pl.decode)
    r = brain.reqs["a"]
    assert list(src.waiting) == [r] and src.queued_prefill_tokens == 1200 and src.kv_reserved > 0
    assert dst.incoming == 1 and dst.n_dec == [0, 0]
    assert brain.handle(FirstToken("a"), 0.2) == []
    assert not src.waiting and src.queued_prefill_tokens == 0 and src.kv_reserved == 0
    assert dst.n_dec[ONLINE] == 1 and dst.incoming == 0 and r.phase == Phase.DECODING and r.inst == dst.idx
    assert brain.handle(FirstToken("a"), 0.3) == []  # a repeated first token changes nothing
    assert dst.n_dec[ONLINE] == 1
    brain.handle(Finished("a"), 1.0)
    assert_empty(brain)


def test_finished_before_first_token_leaves_no_trace():
    brain = make_brain()
    join(brain, PD2)
    brain.handle(online("a"), 0.0)
    brain.handle(offline("o", prompt=500, out=50), 0.0)
    brain.handle(Finished("a"), 0.1)  # e.g. the client went away while it was queued
    brain.handle(Finished("o"), 0.1)
    brain.handle(Finished("unknown"), 0.2)
    assert_empty(brain)


def test_single_token_request_leaves_no_trace():
    brain = make_brain()
    join(brain, PD2)
    (pl,) = brain.handle(online("b", out=1), 0.0)
    assert inst(brain, pl.decode).incoming == 1
    brain.handle(FirstToken("b"), 0.1)  # its only token: done, it never decodes
    assert_empty(brain)


# ------------------------------------------------------------------------------------------- offline
@pytest.mark.parametrize("kv_capacity", [0, 10_000])
def test_offline_admission_until_plans_stop_admitting(kv_capacity):
    brain = make_brain()
    for wid, role, pool in PD2:
        brain.handle(WorkerReport(wid, role, pool, kv_capacity=kv_capacity), 0.0)
    cfg, pol = brain.policy.cfg, brain.policy
    placed, held = [], None
    for k in range(200):
        (e,) = brain.handle(offline(f"o{k}"), 0.0)
        if isinstance(e, Hold):
            held = e
            break
        assert isinstance(e, Place) and e.prefill == e.decode
        assert inst(brain, e.prefill).role == P and inst(brain, e.prefill).pool == R
        placed.append(e)
    assert held is not None and held.reason and held.request_id not in brain.reqs
    assert placed
    need = 3000 + 500 + 16
    for name in ("p0", "p1"):
        i = inst(brain, name)
        # sequence, saturation, KV and token budgets of one relaxed instance's step
        limit = min(cfg.max_num_seqs, pol.sat_batch, i.kv_capacity // need,
                    -(-cfg.max_batched_tokens // min(3000, cfg.offline_chunk_tokens)))
        n = sum(p.prefill == name for p in placed)
        assert 1 <= n <= limit
        assert len(i.waiting_off) == n and i.kv_reserved == n * need and i.kv_used() <= i.kv_capacity
    assert all(inst(brain, n).kv_reserved == 0 for n in ("d0", "d1"))


def test_clock_origin_does_not_change_offline_admission():
    # the live driver passes the wall clock (~1.7e9 s): a request offered now must not look starving
    def run(t0):
        brain = make_brain("hygen", pc={"hygen_decode_share": 0.5})
        brain.handle(WorkerReport("m0", M, R), t0)
        for j in range(40):  # enough online decodes that the decode part is over half the budget
            brain.handle(online(f"on{j}", prompt=4000, out=500), t0)
            brain.handle(FirstToken(f"on{j}"), t0)
        return brain.handle(offline("off", prompt=1000, out=100), t0 + 1.0)

    at_zero = run(0.0)
    assert isinstance(at_zero[0], Hold)
    assert run(1.7e9) == at_zero


def test_engines_that_run_the_plans_get_a_stocked_queue_and_no_eviction_rpcs():
    """A worker whose engine forms its steps by the policy's plan itself (``step_plans``): the brain keeps
    ENGINE_QUEUE offline requests waiting there (the engine's plan admits from them at each step), on the
    instances whose plan takes offline work at all (not a strict decode instance), and sends no Preempt
    for it: the engine evicts at its own step boundary."""
    brain = make_brain("ooco", tpot=0.02)
    for wid, role, pool in [("p0", P, R), ("d0", D, S)]:
        brain.handle(WorkerReport(wid, role, pool, step_plans="ooco"), 0.0)
    placed = []
    for k in range(40):
        (e,) = brain.handle(offline(f"o{k}", prompt=3000, out=50), 0.0)
        if isinstance(e, Hold):
            break
        placed.append(e)
    assert len(placed) == ENGINE_QUEUE and {(e.prefill, e.decode) for e in placed} == {("p0", "p0")}
    for e in placed[:3]:  # prefill done: they decode on p0; the queue has room for three more
        brain.handle(FirstToken(e.request_id), 0.1)
    more = [brain.handle(offline(f"m{k}", prompt=3000, out=50), 0.2)[0] for k in range(4)]
    assert [isinstance(e, Place) for e in more] == [True, True, True, False]
    # online decodes joining d0 would preempt its offline decodes; none are there, and on p0 (engine plans)
    # the brain's plan-based eviction is left to the engine
    for j in range(30):
        brain.handle(online(f"on{j}", prompt=8000, out=200), 1.0)
        assert not [x for x in brain.handle(FirstToken(f"on{j}"), 1.0) if isinstance(x, Preempt)]
    assert not [x for x in brain.handle(Tick(), 30.0) if isinstance(x, Preempt)]


def test_engines_planning_with_their_own_predictor_are_stocked_whatever_the_brains_model_says():
    """A real engine runs the plan with a latency predictor fitted to its own steps: the brain's roofline
    (an imitated GPU) says nothing about its budget, so the brain keeps its queue stocked, KV permitting,
    where its own plan for that instance would admit nothing (a TPOT below the modelled step's fixed cost)."""
    for own, expect in ((False, 0), (True, ENGINE_QUEUE)):
        brain = make_brain("hygen", tpot=0.001)
        brain.handle(WorkerReport("m0", M, R, step_plans="hygen", own_predictor=own, kv_capacity=200_000), 0.0)
        placed = [e for k in range(20) for e in brain.handle(offline(f"o{k}", prompt=500, out=50), 0.0)
                  if isinstance(e, Place)]
        assert len(placed) == expect, own
    # KV still bounds it: nothing is queued that the engine's memory cannot hold
    brain = make_brain("hygen", tpot=0.001)
    brain.handle(WorkerReport("m0", M, R, step_plans="hygen", own_predictor=True, kv_capacity=2000), 0.0)
    placed = [e for k in range(20) for e in brain.handle(offline(f"o{k}", prompt=500, out=50), 0.0)
              if isinstance(e, Place)]
    assert 1 <= len(placed) < 4


def test_without_engine_plans_the_same_workers_get_eviction_rpcs():
    brain = make_brain(tpot=0.02)
    join(brain, [("p0", P, R), ("d0", D, S)])
    offline_decodes_on_strict(brain)
    brain.handle(online("on", prompt=1000, out=20), 2.0)
    brain.handle(FirstToken("on"), 2.0)
    assert [p.worker for p in brain.handle(Tick(), 10.0) if isinstance(p, Preempt)] == ["d0"]


# ------------------------------------------------------------------------------------------- eviction
def test_online_decodes_joining_preempt_offline_decodes_on_strict_worker():
    # a tight TPOT (step target 18 ms) so that a handful of online decodes push the step over it
    brain = make_brain(tpot=0.02)
    join(brain, [("p0", P, R), ("d0", D, S)])
    on_d0 = offline_decodes_on_strict(brain)
    d0 = inst(brain, "d0")
    assert d0.n_dec[OFFLINE] == len(on_d0)
    pre = []
    for j in range(64):
        (pl,) = brain.handle(online(f"on{j}", prompt=8000, out=200), 2.0)
        assert pl.decode == "d0"
        pre = [e for e in brain.handle(FirstToken(f"on{j}"), 2.0) if isinstance(e, Preempt)]
        if pre:
            break
    assert len(pre) == 1
    (p,) = pre
    assert p.worker == "d0" and p.reason and p.request_ids
    assert set(p.request_ids) <= set(on_d0)
    assert not set(p.request_ids) & set(brain.reqs)  # preempted requests leave the mirror
    assert d0.n_dec[OFFLINE] == len(on_d0) - len(p.request_ids)
    assert brain.policy.decode_time(d0) <= brain.policy.online_step_target(d0, 2.0)


def test_tick_preempts_offline_decodes_next_to_an_online_request_behind_its_deadline():
    brain = make_brain(tpot=0.02)
    join(brain, [("p0", P, R), ("d0", D, S)])
    on_d0 = offline_decodes_on_strict(brain)
    brain.handle(online("on", prompt=1000, out=20), 2.0)
    assert brain.handle(FirstToken("on"), 2.0) == []
    # 8 s later the engine reported no step: the online request is past its deadline
    pre = [e for e in brain.handle(Tick(), 10.0) if isinstance(e, Preempt)]
    assert [p.worker for p in pre] == ["d0"]
    assert sorted(pre[0].request_ids) == sorted(on_d0) and pre[0].reason.startswith("tick")
    assert inst(brain, "d0").n_dec == [1, 0]


# ------------------------------------------------------------------------------------------- layout
def test_pd_static_tells_engines_that_plan_their_steps_which_worker_is_the_offline_share():
    brain = make_brain("pd-static")
    for k in range(4):
        brain.handle(WorkerReport(f"w{k}", P, R, step_plans="pd-static"), 0.0)
    out = brain.handle(Tick(), 0.0)
    share = [e for e in out if isinstance(e, SetRole) and e.offline_only]
    assert len(share) == 1 and share[0].role == M
    wid = share[0].worker
    # its heartbeat does not say so yet (or it restarted): told again; once it says so, nothing more
    assert [e.offline_only for e in brain.handle(WorkerReport(wid, M, R, step_plans="pd-static"), 1.0)] == [True]
    assert brain.handle(WorkerReport(wid, M, R, step_plans="pd-static", offline_only=True), 2.0) == []
    # a worker without step plans is not told again (its engine does not read the flag)
    plain = make_brain("pd-static")
    for k in range(4):
        plain.handle(WorkerReport(f"w{k}", P, R), 0.0)
    (e,) = [e for e in plain.handle(Tick(), 0.0) if e.offline_only]
    assert plain.handle(WorkerReport(e.worker, M, R), 1.0) == []


def test_hygen_layout_sets_every_worker_mixed_once():
    brain = make_brain("hygen")
    join(brain, [(f"w{k}", P, R) for k in range(4)])
    out = brain.handle(Tick(), 0.0)
    assert sorted(e.worker for e in out) == ["w0", "w1", "w2", "w3"]
    assert all(isinstance(e, SetRole) and (e.role, e.pool, e.reason) == (M, R, "policy layout") for e in out)
    assert all(i.role == M for i in brain.cluster.instances)
    assert brain.handle(Tick(), 0.1) == []


def test_pd_static_layout_keeps_fitting_worker_and_isolates_offline_share():
    brain = make_brain("pd-static")
    join(brain, [(f"w{k}", M, R) for k in range(4)])
    out = brain.handle(Tick(), 0.0)
    want = Counter((r, p, off) for r, p, off in brain.policy.layout(4))
    assert Counter((i.role, i.pool, i.offline_only) for i in brain.cluster.instances) == want
    # one worker already fits a slot (the mixed offline-only one): no restart for it
    assert len(out) == 3 and all(e.reason == "policy layout" for e in out)
    off_only = next(n for n in brain.names if inst(brain, n).offline_only)
    assert off_only not in {e.worker for e in out}
    (on,) = brain.handle(online("on"), 0.1)
    (off,) = brain.handle(offline("off", prompt=1000), 0.1)
    assert off_only not in (on.prefill, on.decode)
    assert (off.prefill, off.decode) == (off_only, off_only)


def test_layout_waits_for_the_workers_to_settle():
    brain = make_brain("hygen", settle_s=3.0)
    for k in range(4):
        brain.handle(WorkerReport(f"w{k}", P, R), float(k) * 0.5)  # the last joins at 1.5 s
        assert brain.handle(Tick(), float(k) * 0.5 + 0.1) == []
    assert brain.handle(Tick(), 4.4) == []
    assert brain.handle(WorkerReport("w0", P, R), 4.45) == []  # a known worker's heartbeat changes nothing
    assert len(brain.handle(Tick(), 4.5)) == 4
    assert brain.handle(Tick(), 5.0) == []


# ------------------------------------------------------------------------------------------- workers
def test_worker_gone_forgets_its_requests_and_reindexes():
    brain = make_brain()
    join(brain, PD2)
    brain.handle(WorkerReport("d1", D, S, steps=10), 0.0)
    (a,) = brain.handle(online("a"), 0.0)
    (b,) = brain.handle(online("b"), 0.0)
    brain.handle(offline("o", prompt=500, out=50), 0.0)
    gone = a.prefill
    assert brain.handle(WorkerGone(gone), 1.0) == []
    assert "a" not in brain.reqs and "b" in brain.reqs
    assert gone not in brain.names and gone not in brain.index
    assert [i.idx for i in brain.cluster.instances] == list(range(len(brain.names))) == list(range(3))
    assert brain.index == {n: k for k, n in enumerate(brain.names)}
    assert brain.reqs["b"].inst == brain.index[b.prefill] and brain.meta["b"].decode == brain.index[b.decode]
    assert inst(brain, a.decode).incoming == (1 if a.decode == b.decode else 0)
    assert brain.reported_steps == {brain.index["d1"]: 10}
    brain.handle(FirstToken("b"), 1.5)
    placed = Counter()
    for k in range(20):
        for ev in (offline(f"f{k}", prompt=500, out=50), online(f"n{k}")):
            for e in brain.handle(ev, 2.0):
                if isinstance(e, Place):
                    assert gone not in (e.prefill, e.decode)
                    assert e.prefill in brain.index and e.decode in brain.index
                    placed[ev.request_class] += 1
        brain.handle(FirstToken(f"n{k}"), 2.0)  # so the relaxed worker left takes offline work again
    assert placed[RequestClass.ONLINE] == 20 and placed[RequestClass.OFFLINE] > 0
    assert brain.handle(WorkerGone(gone), 3.0) == []  # twice: nothing


def test_worker_steps_advance_the_decode_batch():
    brain = make_brain()
    join(brain, PD2)
    brain.handle(WorkerReport("d0", D, S, steps=100), 0.0)  # the first count is a baseline
    (pl,) = brain.handle(online("a", exclude=frozenset({"d1"})), 0.0)
    assert pl.decode == "d0"
    brain.handle(FirstToken("a"), 0.1)
    d0, r = inst(brain, "d0"), brain.reqs["a"]
    assert d0.gen_of(r) == 1
    brain.handle(WorkerReport("d0", D, S, steps=130), 0.5)
    assert d0.gen_of(r) == 31
    brain.handle(WorkerReport("d0", D, S, steps=5), 0.6)  # the engine restarted: its 5 steps count
    assert d0.gen_of(r) == 36


# ------------------------------------------------------------------------------------------- why / counts
def test_why_and_counts():
    brain = make_brain(tpot=0.02)
    join(brain, [("p0", P, R), ("d0", D, S)])
    seen = []
    orig = brain.handle

    def handle(ev, now):
        out = orig(ev, now)
        seen.extend(out)
        return out

    brain.handle = handle
    offline_decodes_on_strict(brain)
    for j in range(64):
        brain.handle(online(f"on{j}", prompt=8000, out=200), 2.0)
        if any(isinstance(e, Preempt) for e in brain.handle(FirstToken(f"on{j}"), 2.0)):
            break
    pre = next(e for e in seen if isinstance(e, Preempt))
    rid = pre.request_ids[0]
    log = [what for _, what in brain.why(rid)]
    assert log[0].startswith("placed: prefill p0, decode p0")
    assert any(w.startswith("moved p0 -> d0") for w in log)
    assert log[-1] == f"preempted on d0 ({pre.reason})"
    assert any(w.startswith("placed: prefill d0, decode d0") for w in log[1:-1])
    times = [t for t, _ in brain.why(rid)]
    assert times == sorted(times)
    assert brain.why("never-seen") == []
    assert brain.counts() == {f"{k}:{r}": n for (k, r), n in Counter((e.kind, e.reason) for e in seen).items()}
    assert brain.counts()[f"preempt:{pre.reason}"] >= 1


def test_log_requests_zero_keeps_counts_only():
    brain = make_brain(log_requests=0)
    join(brain, PD2)
    brain.handle(online("a"), 0.0)
    brain.handle(online("b"), 0.0)
    assert brain.why("a") == []
    assert sum(n for k, n in brain.counts().items() if k.startswith("place:")) == 2


# ------------------------------------------------------------------------------------------- moves
@pytest.mark.parametrize("moves", [True, False])
def test_moves_flag(moves):
    brain = make_brain(moves=moves)
    join(brain, PD2)
    for k in range(8):
        brain.handle(offline(f"o{k}", key=f"k{k}"), 0.0)
        brain.handle(FirstToken(f"o{k}"), 0.1)
    out = []
    for t in (1.0, 2.0, 3.0):
        out += brain.handle(Tick(), t)
    n_moves = sum(isinstance(e, Move) for e in out)
    if moves:
        assert n_moves > 0 and not brain.pinned.keys() - {f"k{k}" for k in range(8)}
    else:
        assert n_moves == 0 and not brain.pinned
        assert all(f"o{k}" in brain.reqs for k in range(8))  # they keep decoding where they are


def moves_of_eight_offline_decodes():
    """A moving ooco brain on PD2 with eight offline decodes on its relaxed instances, and the moves its first
    tick makes (strict instances pulling them)."""
    brain = make_brain(moves=True)
    join(brain, PD2)
    for k in range(8):
        brain.handle(offline(f"o{k}", key=f"k{k}"), 0.0)
        brain.handle(FirstToken(f"o{k}"), 0.1)
    return brain, [e for e in brain.handle(Tick(), 1.0) if isinstance(e, Move)]


def test_a_move_is_counted_on_its_puller_until_its_resume_arrives_or_lapses():
    """A Move reserves the request's context and what it has left on the puller and counts it incoming (else
    the next tick would pull again into the same room); the resume placed under its key takes it over; a
    move whose request ended before it stopped, or whose resume never came, gives the room back."""
    from duopool.core.brain import MOVE_TIMEOUT_S

    brain, moves = moves_of_eight_offline_decodes()
    assert moves
    by_dst = Counter(m.dst for m in moves)
    for name, n in by_dst.items():
        assert inst(brain, name).incoming == n
        assert inst(brain, name).kv_reserved >= n * 3000  # each at least its prompt's context
        assert inst(brain, name).incoming_known == n and inst(brain, name).incoming_ctx >= n * 3000
    # the next tick sees the room taken: it pulls none of the requests already moving
    again = [e for e in brain.handle(Tick(), 1.05) if isinstance(e, Move)]
    assert not {m.request_id for m in again} & {m.request_id for m in moves}
    first, rest = moves[0], moves[1:]
    puller = inst(brain, first.dst)
    before = (puller.incoming, puller.kv_reserved)
    (placed,) = brain.handle(offline("resume-" + first.request_id, prompt=3100, out=400,
                                     key="k" + first.request_id[1:]), 1.1)
    assert (placed.prefill, placed.decode) == (first.dst, first.dst)
    assert puller.incoming == before[0] - 1  # the resume is queued there now, with its own reservation
    assert "k" + first.request_id[1:] not in brain.moving
    # a moved request that finished at its source before the preemption reached it: room back, no pin
    ended = rest[0]
    brain.handle(Finished(ended.request_id), 1.2)
    assert "k" + ended.request_id[1:] not in brain.moving and "k" + ended.request_id[1:] not in brain.pinned
    # the others never resume: their reservations lapse
    brain.handle(Tick(), 1.0 + MOVE_TIMEOUT_S + 1)
    left = {m.request_id for m in rest[1:]} | {m.request_id for m in again}
    assert not any(m.request_id in left for m in brain.moving.values())
    for k in range(8):
        brain.handle(Finished(f"o{k}"), 40.0)
    brain.handle(Finished("resume-" + first.request_id), 40.0)
    for m in again:
        brain.handle(Finished(m.request_id), 40.0)
    brain.handle(Tick(), 40.0 + MOVE_TIMEOUT_S + 1)
    assert not brain.moving
    assert all(i.incoming == 0 and i.kv_reserved == 0 and i.incoming_known == 0 and i.incoming_ctx == 0
               for i in brain.cluster.instances)


def test_a_move_whose_preemption_stops_nothing_gives_the_pullers_room_back_at_once():
    import asyncio

    from duopool.v1 import worker_pb2

    brain, moves = moves_of_eight_offline_decodes()
    assert len(moves) >= 2
    stopped_one = moves[0].request_id

    class Stub:
        async def Preempt(self, req, timeout=None):  # the worker stopped only the first (the others had ended)
            return worker_pb2.PreemptResponse(request_ids=[r for r in req.request_ids if r == stopped_one])

    recs = [SimpleNamespace(worker_id=m.src, address=m.src) for m in moves]
    service = SimpleNamespace(_workers=recs, channels=SimpleNamespace(stub=lambda addr, cls: Stub()),
                              note_preempted=lambda *a: None)
    driver = BrainDriver(service, brain, clock=lambda: 1.0)

    async def main():
        driver.apply(moves)
        await asyncio.sleep(0)
        await driver._tasks.wait()

    asyncio.run(main())
    # the stopped one still waits for its resume on the puller; the rest gave their room back
    assert [m.request_id for m in brain.moving.values()] == [stopped_one]
    puller = inst(brain, moves[0].dst)
    assert puller.incoming_known == 1 and sum(i.incoming_known for i in brain.cluster.instances) == 1


def test_without_moves_strict_instances_pull_at_the_first_token():
    """Running decodes' KV cannot move live: OOCO's strict instances take their pulls at the prefill →
    decode transfer instead — an offline request prefilled on a relaxed instance decodes on a strict one
    while that one's plan would pull it (KV and step-time margins), in place once it would not."""
    brain = make_brain(moves=False)
    join(brain, PD2)
    places = [brain.handle(offline(f"o{k}", prompt=3000, out=500), 0.0)[0] for k in range(40)]
    places = [p for p in places if isinstance(p, Place)]
    pulled = [p for p in places if p.decode in ("d0", "d1")]
    assert pulled and all(p.prefill in ("p0", "p1") for p in places)
    assert all("pulled by a strict instance" in p.reason for p in pulled)
    # a pulled request's prompt only is held on its prefill instance (its decode's KV goes to the puller)
    assert inst(brain, pulled[0].prefill).kv_reserved == sum(3000 + 1 + 16 for p in places
                                                              if p.prefill == pulled[0].prefill)
    assert inst(brain, pulled[0].decode).incoming == sum(p.decode == pulled[0].decode for p in places)
    # an online decode batch over the step target on both strict instances: they would pull nothing
    fresh = make_brain(tpot=0.02, moves=False)  # step target 18 ms
    join(fresh, PD2)
    probe = Req(10**6, OFFLINE, 0.0, 3000, 500)
    assert fresh._pull_at_first_token(probe, 0.0, frozenset()) is not None
    for j in range(80):
        fresh.handle(online(f"on{j}", prompt=8000, out=300), 1.0)
        fresh.handle(FirstToken(f"on{j}"), 1.0)
    assert fresh._pull_at_first_token(probe, 5.0, frozenset()) is None
    assert probe not in fresh.cluster.resume


def test_a_parked_decode_is_pulled_by_a_decode_instances_plan_as_the_simulator_pulls_swapped_decodes():
    """online-priority: a preempted decode with parked KV resumes where a decode instance's plan pulls it
    (``resume_pulls``), not through a prefill instance's admission like new work; with no slot for it, it
    is held, and after RESUME_WAIT_S it is admitted like new work."""
    from duopool.core.brain import RESUME_WAIT_S

    brain = make_brain("online-priority", pc={"max_num_seqs": 2})
    join(brain, PD2)
    (new,) = brain.handle(offline("n", prompt=3000, out=500, key="j/0"), 0.0)
    assert isinstance(new, Place) and new.prefill in ("p0", "p1")
    brain.handle(Finished("n"), 0.0)
    (res,) = brain.handle(offline("r", prompt=3200, out=300, key="j/1", parked=True), 0.0)
    assert isinstance(res, Place) and res.prefill == res.decode and res.decode in ("d0", "d1"), res
    assert "parked decode pulled by decode instance" in res.reason
    brain.handle(Finished("r"), 0.0)
    for k in range(4):  # both decode instances' slots taken by online decodes
        brain.handle(online(f"on{k}", prompt=500, out=400), 0.0)
        brain.handle(FirstToken(f"on{k}"), 0.0)
    assert all(inst(brain, d).n_seqs == 2 for d in ("d0", "d1"))
    (held,) = brain.handle(offline("r2", prompt=3200, out=300, key="j/2", parked=True), 1.0)
    assert isinstance(held, Hold) and "parked decode" in held.reason
    (later,) = brain.handle(offline("r3", prompt=3200, out=300, key="j/2", parked=True), 1.0 + RESUME_WAIT_S)
    assert isinstance(later, Hold) and "parked decode" not in later.reason  # the new-work path decided
    freed = brain.names[brain.meta["on0"].decode]
    brain.handle(Finished("on0"), 2.0 + RESUME_WAIT_S)  # a slot frees on one decode instance: it pulls
    (again,) = brain.handle(offline("r4", prompt=3200, out=300, key="j/3", parked=True), 2.0 + RESUME_WAIT_S)
    assert isinstance(again, Place) and again.decode == again.prefill == freed


# ------------------------------------------------------------------------------------------- drivers
SCENARIO = [
    ("worker", "p0", "prefill", "relaxed", 0, 300_000),
    ("worker", "p1", "prefill", "relaxed", 0, 0),
    ("worker", "d0", "decode", "strict", 0, 300_000),
    ("worker", "d1", "mixed", "relaxed", 7, 200_000),  # the layout turns it into a decode worker
    ("place", "o1", False, 3000, 400, ()),
    ("place", "o2", False, 2500, 300, ("p1",)),
    ("place", "a", True, 1500, 80, ()),
    ("place", "b", True, 0, 0, ("p0",)),  # no tokenized prompt, no max_tokens: the defaults
    ("first", "a"),
    ("first", "o1"),
    ("first", "b"),
    ("tick",),
    ("worker", "d0", "decode", "strict", 40, 300_000),
    ("place", "c", True, 6000, 20, ()),
    ("first", "c"),
    ("done", "a"),
    ("place", "o3", False, 3000, 400, ()),
    ("tick",),
    ("gone", "p1"),
    ("place", "d", True, 900, 64, ("d0",)),
    ("first", "d"),
] + [("place", f"o{k}", False, 3000, 500, ()) for k in range(4, 16)] + [("tick",)]


def direct_event(step):
    """The event as the simulator-side caller builds it."""
    kind, *f = step
    if kind == "worker":
        wid, role, pool, steps, cap = f
        return WorkerReport(wid, Role(role), PoolName(pool), kv_capacity=cap, steps=steps)
    if kind == "place":
        rid, is_online, prompt, max_tokens, exclude = f
        cls = RequestClass.ONLINE if is_online else RequestClass.OFFLINE
        return Arrived(rid, cls, prompt, max_tokens, frozenset(exclude), key=rid)
    return {"first": lambda: FirstToken(f[0]), "done": lambda: Finished(f[0]), "gone": lambda: WorkerGone(f[0]),
            "tick": Tick}[kind]()


def service_event(step):
    """The same event the way the scheduler service gets it: a Redis worker record, a PlaceRequest on the wire."""
    kind, *f = step
    if kind == "worker":
        wid, role, pool, steps, cap = f
        rec = WorkerRecord(worker_id=wid, address=f"{wid}:1", role=role, pool=pool, engine="sim", model="m",
                           max_model_len=8192, block_size=16, host="h", steps=steps, kv_capacity=cap)
        return worker_report(WorkerRecord.from_hash(rec.to_hash()))
    if kind == "place":
        rid, is_online, prompt, max_tokens, exclude = f
        msg = scheduler_pb2.PlaceRequest(request_id=rid, request_class=common_pb2.ONLINE if is_online
                                         else common_pb2.OFFLINE, prompt_tokens=prompt, max_tokens=max_tokens,
                                         exclude_workers=list(exclude))
        pb = scheduler_pb2.PlaceRequest.FromString(msg.SerializeToString())
        cls = RequestClass.ONLINE if pb.request_class == common_pb2.ONLINE else RequestClass.OFFLINE
        return Arrived(pb.request_id, cls, pb.prompt_tokens, pb.max_tokens, frozenset(pb.exclude_workers),
                       key=pb.request_id)
    return direct_event(step)


def test_service_driver_and_direct_events_give_the_same_effects():
    cfg = SchedulerConfig(policy="ooco", ttft_slo_ms=1000.0, tpot_slo_ms=20.0)
    direct = Brain(get_policy("ooco", PM, PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.02)), moves=True,
                   settle_s=LAYOUT_SETTLE_S)
    clock = [0.0]
    driver = BrainDriver(SimpleNamespace(_workers=[]), build_brain(cfg), clock=lambda: clock[0])
    kinds = Counter()
    for k, step in enumerate(SCENARIO):
        clock[0] = 0.25 * k
        a = direct.handle(direct_event(step), clock[0])
        b = driver.handle(service_event(step))
        assert a == b, f"step {k} {step}: {a} != {b}"
        kinds.update(e.kind for e in a)
    assert kinds["place"] >= 6 and kinds["hold"] >= 1 and kinds["set_role"] >= 1  # a non-trivial scenario
    assert direct.names == driver.brain.names
    assert [i.kv_capacity for i in direct.cluster.instances] == [i.kv_capacity for i in driver.brain.cluster.instances]
    assert direct.counts() == driver.counts()


def test_worker_report_converts_a_record():
    rec = WorkerRecord(worker_id="w", address="w:1", role="decode", pool="strict", engine="sim", model="m",
                       max_model_len=8192, block_size=16, host="h", running=3, waiting=2, kv_usage=0.5,
                       steps=11, step_ms=4.5, kv_capacity=1234, step_plans="hygen")
    assert worker_report(rec) == WorkerReport("w", D, S, running=3, waiting=2, kv_usage=0.5, kv_capacity=1234,
                                              steps=11, step_ms=4.5, step_plans="hygen")
    # a real engine's plans use its own measured predictor
    vllm = WorkerRecord(**{**rec.__dict__, "engine": "vllm"})
    assert worker_report(vllm).own_predictor and not worker_report(rec).own_predictor


# ------------------------------------------------------------------------------------------- simulator
def test_simulator_runs_on_the_brain():
    def trace(arr, inp, out, name):
        return Trace(name, np.asarray(arr, float), np.asarray(inp, np.int64), np.asarray(out, np.int64))

    on = trace([0.0, 0.1, 0.2], [500, 600, 700], [10, 10, 10], "on")
    off = trace([0.0] * 4, [1000] * 4, [20] * 4, "off")
    pc = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    sim = Simulator(SimConfig(policy="ooco", instances=4, policy_cfg=pc, offline_limit=4), on, off)
    assert sim.brain.cluster is sim.cluster and sim.brain.policy is sim.policy and not sim.brain.live
    res = sim.run()
    assert all(r.phase == Phase.DONE for r in res.online)


def test_offline_moves_setting_builds_a_moving_brain_and_a_move_is_a_named_preemption_at_the_source():
    import asyncio

    from duopool.core.brain import Move

    assert build_brain(SchedulerConfig(policy="ooco")).moves  # the default
    assert not build_brain(SchedulerConfig(policy="ooco", offline_moves="off")).moves
    driver = BrainDriver(SimpleNamespace(_workers=[]), build_brain(SchedulerConfig(policy="ooco")))
    stopped = []

    async def preempt(e, why="brain"):
        stopped.append((e.worker, e.request_ids, why))

    driver._preempt = preempt

    async def main():
        driver.apply([Move("r1", "relaxed-0", "strict-0", "pull: KV and step-time margin")])
        await asyncio.sleep(0)
        await driver._tasks.wait()

    asyncio.run(main())
    assert stopped == [("relaxed-0", ("r1",), "move")]
