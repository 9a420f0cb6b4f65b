"""Simulator physics: KV memory is never over-committed, transfers queue on NICs, a stalled run fails loudly."""

import dataclasses

import numpy as np
import pytest

from duopool.core.perfmodel import PerfModel
from duopool.core.placement import PoolName, Role
from duopool.core.policies import PolicyConfig, SchedulingPolicy
from duopool.core.state import IDLE, Phase, StepPlan
from duopool.sim import SimConfig, Simulator
from duopool.sim.engine import SimulationStalled
from duopool.sim.metrics import summarize
from duopool.traces import Trace

pytestmark = pytest.mark.unit

ALL = ["pd-static", "online-priority", "hygen", "tropical", "ooco", "dopd", "ooco+dopd"]


def trace(arrivals, inp, out, name="t"):
    return Trace(name, np.asarray(arrivals, float), np.asarray(inp, np.int64), np.asarray(out, np.int64))


def small_memory_pm(tokens: int) -> PerfModel:
    """An H100 / Llama-3.1-8B whose engine may use only enough memory for ``tokens`` KV tokens."""
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    need = pm.weight_bytes_per_gpu + pm.activation_reserve_bytes + tokens * pm.kv_bytes_per_token
    small = dataclasses.replace(pm, mem_util=need / pm.hardware.mem_bytes)
    assert abs(small.kv_capacity_tokens() - tokens) <= 1
    return small


class CheckedSimulator(Simulator):
    """Checks the memory invariant at every step boundary, independently of the peak bookkeeping."""

    worst = 0.0

    def _start_step(self, inst):
        super()._start_step(inst)
        for i in self.cluster.instances:
            assert i.kv_reserved >= 0
            self.worst = max(self.worst, i.kv_used() / i.kv_capacity)
            assert i.kv_used() <= i.kv_capacity, f"instance {i.idx}: {i.kv_used()} > {i.kv_capacity}"
        if self.n_steps % 50 == 0:
            reservations_add_up(self)


@pytest.mark.parametrize("policy", ALL)
def test_kv_never_over_capacity_in_overload(policy):
    """Long prompts arriving far faster than 4 instances with 40 k KV tokens each can serve, next to a
    backlog of long offline requests: every allocation waits for memory or preempts offline work."""
    rng = np.random.default_rng(1)
    n = 120
    on = trace(np.sort(rng.uniform(0, 6, n)), rng.integers(2000, 16000, n), rng.integers(2, 300, n))
    off = trace(np.zeros(300), rng.integers(4000, 12000, 300), rng.integers(50, 500, 300), "backlog")
    pc = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    if policy == "pd-static":
        pc = dataclasses.replace(pc, static_split=(1, 2, 1))
    s = CheckedSimulator(SimConfig(policy=policy, instances=4, policy_cfg=pc), on, off,
                         perf=small_memory_pm(40_000))
    res = s.run()
    summary = summarize(res)
    assert all(r.phase == Phase.DONE for r in res.online)  # overload delays work, it does not lose it
    assert summary["kv"]["peak_fraction"] <= 1.0
    assert summary["kv"]["peak_fraction"] == pytest.approx(
        max(i.kv_peak for i in s.cluster.instances) / 40_000, abs=1e-4)
    assert s.worst > 0.5  # the scenario really pressed on memory
    assert summary["kv"]["online_mem_waits"] + summary["kv"]["transfer_mem_waits"] \
        + summary["kv"]["offline_preempted_for_memory"] > 0


def reservations_add_up(sim) -> None:
    """Every token an instance has reserved belongs to a request: one prefilling, arriving or waiting to join
    there (``kv_res``), or one whose source copy it still holds while the KV moves (``src_res``)."""
    held = [0] * len(sim.cluster.instances)
    for r in sim.online_reqs + sim.offline_reqs:
        if r.kv_res:
            held[r.inst] += r.kv_res
        if r.src_res:
            held[r.src] += r.src_res
    assert held == [i.kv_reserved for i in sim.cluster.instances]


@pytest.mark.parametrize("policy", ["ooco", "hygen", "dopd", "ooco+dopd"])
def test_reservations_add_up_and_return_to_zero(policy):
    rng = np.random.default_rng(2)
    on = trace(np.sort(rng.uniform(0, 3, 40)), rng.integers(500, 6000, 40), rng.integers(2, 100, 40))
    off = trace(np.zeros(30), rng.integers(1000, 5000, 30), rng.integers(10, 100, 30), "backlog")
    cfg = SimConfig(policy=policy, instances=4, policy_cfg=PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05))
    s = CheckedSimulator(cfg, on, off, perf=small_memory_pm(30_000))
    s.run()
    reservations_add_up(s)
    # offline only, to the end: nothing stays reserved
    s = CheckedSimulator(dataclasses.replace(cfg, offline_limit=40), None, off, perf=small_memory_pm(30_000))
    res = s.run()
    assert all(r.phase == Phase.DONE for r in res.offline)
    assert [i.kv_reserved for i in s.cluster.instances] == [0] * 4


def test_prompt_larger_than_memory_is_rejected_not_stalled():
    on = trace([0.0, 0.1], [50_000, 500], [10, 10])
    s = Simulator(SimConfig(policy="hygen", instances=2, policy_cfg=PolicyConfig(tpot_slo_s=0.05)), on, None,
                  perf=small_memory_pm(20_000))
    summary = summarize(s.run())
    assert summary["online"]["rejected"] == 1 and summary["online"]["completed"] == 1
    assert summary["online"]["slo_attainment"] == 0.5


def test_transfers_queue_on_the_receiving_nic():
    """Two prompts finishing prefill together on two prefill instances both send to the one decode
    instance: the second transfer waits for the first (FIFO on the receiver's NIC)."""
    pc = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, static_split=(2, 1, 0))
    together = trace([0.0, 0.0], [8000, 8000], [5, 5])
    apart = trace([0.0, 2.0], [8000, 8000], [5, 5])
    cfg = SimConfig(policy="pd-static", instances=3, policy_cfg=pc)
    a = summarize(Simulator(cfg, together, None).run())["kv"]
    b = summarize(Simulator(cfg, apart, None).run())["kv"]
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    assert a["transfers"] == b["transfers"] == 2
    assert b["nic_wait_s_mean"] == 0.0
    assert a["nic_wait_s_mean"] == pytest.approx(pm.kv_transfer_s(8001) / 2, rel=1e-6)
    assert a["transfer_s_mean"] == pytest.approx(pm.kv_transfer_s(8001), rel=1e-6)
    # the efficiency factor applies: slower than the NIC's line rate
    assert pm.kv_transfer_s(8001) > 8001 * pm.kv_bytes_per_token / pm.hardware.kv_link_bw


class _NeverRunsOnline(SchedulingPolicy):
    """A broken policy: it never schedules anything."""

    name = "never"

    def plan(self, inst, cluster, now):
        return IDLE


def test_watchdog_fails_loudly_when_nothing_runs():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    on = trace([0.0, 1.0], [1000, 1000], [10, 10])
    cfg = SimConfig(policy="pd-static", instances=2, watchdog_s=5.0,
                    policy_cfg=PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05))
    sim = Simulator(cfg, on, None, perf=pm, policy=_NeverRunsOnline(pm, cfg.policy_cfg))
    with pytest.raises(SimulationStalled, match="with work queued"):
        sim.run()
    assert 5.0 <= sim.now < 7.0  # failed soon after the watchdog period, not at the end of time


class _StarvesOneInstance(SchedulingPolicy):
    """Broken differently: instance 1 keeps running offline work, instance 0 never runs its online queue."""

    name = "starves"

    def layout(self, n):
        return [(Role.MIXED, PoolName.RELAXED, False)] * n

    def route(self, r, cluster, now):
        return 0

    def plan(self, inst, cluster, now):
        if inst.idx == 0:
            return IDLE
        chunks = self.offline_prefill_chunks(inst, cluster, 2048)
        return StepPlan(chunks=tuple(chunks), decode=inst.n_decoding > 0) if chunks or inst.n_decoding else IDLE


def test_watchdog_catches_one_stuck_instance_while_others_run():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    on = trace([0.0, 1.0], [1000, 1000], [10, 10])
    off = trace(np.zeros(50), [3000] * 50, [200] * 50, "backlog")
    cfg = SimConfig(policy="hygen", instances=2, watchdog_s=5.0,
                    policy_cfg=PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.05))
    sim = Simulator(cfg, on, off, perf=pm, policy=_StarvesOneInstance(pm, cfg.policy_cfg))
    with pytest.raises(SimulationStalled, match="instance 0 ran no step"):
        sim.run()
    assert sim.n_steps > 10  # the other instance kept running


def test_online_transfers_do_not_queue_behind_offline_ones():
    """The NIC queues are FIFO within a class; an online transfer goes ahead of queued offline traffic and
    pushes it back by its own duration."""
    s = Simulator(SimConfig(policy="hygen", instances=2), None, None)
    tx, rx = [0.0, 0.0], [0.0, 0.0]
    assert s._nic_slot(False, tx, rx, 1.0) == (0.0, 1.0)  # offline: NIC busy until 1.0
    assert s._nic_slot(False, tx, rx, 1.0) == (1.0, 2.0)  # the next offline one queues behind it
    assert s._nic_slot(True, tx, rx, 0.5) == (0.0, 0.5)  # online starts at once
    assert rx[1] == tx[1] == 2.5  # ... and delays the offline queue by its duration
    assert s._nic_slot(True, None, rx, 0.5) == (0.5, 1.0)  # online behind online (from host: receiver only)
    assert s._nic_slot(False, tx, rx, 1.0) == (3.0, 4.0)
