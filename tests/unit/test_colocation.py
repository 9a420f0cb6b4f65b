"""The live co-location rules (duopool.core.colocation): offline capacity, preemption and stepping back,
under both triggers."""

import pytest

from duopool.core.colocation import (
    ColocationLimits,
    WorkerLoad,
    must_yield,
    offline_capacity,
    preemptions,
    update_pressure,
)

ONLINE = ColocationLimits(offline_per_worker=4, offline_with_online=1, trigger="online")
SLO = ColocationLimits(offline_per_worker=4, offline_with_online=1, trigger="slo", slo_low=0.5, slo_high=0.8,
                       online_queue=3)


def test_online_trigger_capacity_shrinks_once_online_work_is_in_flight():
    assert offline_capacity(WorkerLoad("w", online=0, offline=1), ONLINE) == 3
    assert offline_capacity(WorkerLoad("w", online=1, offline=0), ONLINE) == 1
    assert offline_capacity(WorkerLoad("w", online=2, offline=3), ONLINE) == 0


def test_online_trigger_preempts_the_excess_only_where_online_work_is():
    loads = {"a": WorkerLoad("a", 1, 3), "b": WorkerLoad("b", 0, 4), "c": WorkerLoad("c", 1, 1)}
    assert preemptions(loads, ONLINE) == {"a": 2}


def test_slo_trigger_keeps_offline_work_while_slos_have_headroom():
    calm = WorkerLoad("w", online=2, offline=3, pressure=0.2)
    assert preemptions({"w": calm}, SLO) == {}
    assert offline_capacity(calm, SLO) == 1  # still filled up to offline_per_worker
    assert not must_yield(calm, SLO)


def test_slo_trigger_holds_offline_work_back_for_a_while_after_a_preemption():
    recent = WorkerLoad("w", online=1, offline=0, pressure=0.1, since_preempt_s=2.0)
    assert offline_capacity(recent, SLO) == 1  # offline_with_online only
    later = WorkerLoad("w", online=1, offline=0, pressure=0.1, since_preempt_s=6.0)
    assert offline_capacity(later, SLO) == 4
    idle = WorkerLoad("w", online=0, offline=0, pressure=0.1, since_preempt_s=0.5)
    assert offline_capacity(idle, SLO) == 4  # no online work there: the hold does not apply


def test_slo_trigger_hysteresis_band_stops_new_offline_work_without_preempting():
    band = WorkerLoad("w", online=1, offline=3, pressure=0.6)
    assert offline_capacity(band, SLO) == 0
    assert preemptions({"w": band}, SLO) == {}
    assert not must_yield(band, SLO)


def test_slo_trigger_preempts_at_the_high_mark_or_on_an_online_queue():
    hot = WorkerLoad("w", online=1, offline=3, pressure=0.8)
    assert preemptions({"w": hot}, SLO) == {"w": 2}
    assert must_yield(hot, SLO)
    queue = WorkerLoad("w", online=3, offline=2, pressure=0.0)  # a spike before any latency is observed
    assert preemptions({"w": queue}, SLO) == {"w": 1}
    assert offline_capacity(queue, SLO) == 0
    # Pressure left from earlier does not matter once the online work has drained.
    assert offline_capacity(WorkerLoad("w", online=0, offline=0, pressure=5.0), SLO) == 4


def test_a_request_between_phases_steps_back_under_the_same_rule():
    # It counts itself: with offline_with_online=1 it may go on alone next to online work, not as a second.
    assert not must_yield(WorkerLoad("w", online=1, offline=1), ONLINE)
    assert must_yield(WorkerLoad("w", online=1, offline=2), ONLINE)
    assert not must_yield(WorkerLoad("w", online=0, offline=4), ONLINE)
    assert must_yield(WorkerLoad("w", online=1, offline=1), ColocationLimits(4, 0, trigger="online"))


def test_pressure_is_a_moving_average_of_latency_over_slo():
    p = update_pressure(None, 50, 100)
    assert p == 0.5
    p = update_pressure(p, 150, 100, alpha=0.5)
    assert p == pytest.approx(1.0)
    assert update_pressure(None, 1e9, 1) == 10.0  # capped: one outlier does not pin the average


@pytest.mark.parametrize("kw", [{"offline_per_worker": -1}, {"offline_per_worker": 2, "offline_with_online": 3},
                                {"trigger": "sometimes"}, {"slo_low": 0.9, "slo_high": 0.8}, {"slo_low": 0},
                                {"online_queue": -1}, {"hold_s": -1}])
def test_limits_are_validated(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ColocationLimits(**kw)
