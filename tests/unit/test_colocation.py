"""The live co-location rules (duopool.core.colocation): offline capacity, preemption and stepping back."""

import pytest

from duopool.core.colocation import ColocationLimits, WorkerLoad, must_yield, offline_capacity, preemptions

LIMITS = ColocationLimits(offline_per_worker=4, offline_with_online=1)


def test_capacity_shrinks_to_the_with_online_limit_once_online_work_is_in_flight():
    assert offline_capacity(WorkerLoad("w", online=0, offline=1), LIMITS) == 3
    assert offline_capacity(WorkerLoad("w", online=1, offline=0), LIMITS) == 1
    assert offline_capacity(WorkerLoad("w", online=2, offline=3), LIMITS) == 0


def test_preemptions_take_the_excess_only_where_online_work_is():
    loads = {"a": WorkerLoad("a", 1, 3), "b": WorkerLoad("b", 0, 4), "c": WorkerLoad("c", 1, 1)}
    assert preemptions(loads, LIMITS) == {"a": 2}


def test_a_request_between_phases_steps_back_under_the_same_rule():
    # It counts itself: with offline_with_online=1 it may go on alone next to online work, not as a second.
    assert not must_yield(WorkerLoad("w", online=1, offline=1), LIMITS)
    assert must_yield(WorkerLoad("w", online=1, offline=2), LIMITS)
    assert not must_yield(WorkerLoad("w", online=0, offline=4), LIMITS)
    assert must_yield(WorkerLoad("w", online=1, offline=1), ColocationLimits(4, 0))


@pytest.mark.parametrize("kw", [{"offline_per_worker": -1}, {"offline_per_worker": 2, "offline_with_online": 3}])
def test_limits_are_validated(kw):
    with pytest.raises(ValueError):
        ColocationLimits(**kw)
