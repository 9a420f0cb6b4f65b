import pytest

from duopool.core.placement import (
    PlacementRequest,
    PoolName,
    RequestClass,
    Role,
    WorkerView,
    get_placement_policy,
    placement_policy_names,
)

pytestmark = pytest.mark.unit


def w(wid, role, **kw):
    pool = PoolName.STRICT if role == Role.DECODE else PoolName.RELAXED
    return WorkerView(worker_id=wid, role=role, pool=pool, **kw)


REQ = PlacementRequest("r1", RequestClass.ONLINE, prompt_tokens=100, max_tokens=10)


def test_least_loaded_picks_least_loaded_prefill_and_decode():
    policy = get_placement_policy("least-loaded")
    workers = [w("p0", Role.PREFILL, inflight=3), w("p1", Role.PREFILL, inflight=1),
               w("d0", Role.DECODE, running=4), w("d1", Role.DECODE, running=2, kv_usage=0.1)]
    d = policy.place(REQ, workers, now=0.0)
    assert (d.prefill_worker_id, d.decode_worker_id) == ("p1", "d1")
    assert d.policy == "least-loaded"


def test_excluded_workers_are_never_chosen_and_none_when_nothing_left():
    policy = get_placement_policy("least-loaded")
    workers = [w("p0", Role.PREFILL), w("p1", Role.PREFILL, inflight=5), w("d0", Role.DECODE)]
    req = PlacementRequest("r", RequestClass.ONLINE, exclude=frozenset({"p0"}))
    assert policy.place(req, workers, 0.0).prefill_worker_id == "p1"
    req = PlacementRequest("r", RequestClass.ONLINE, exclude=frozenset({"p0", "p1"}))
    assert policy.place(req, workers, 0.0) is None
    assert policy.place(REQ, [w("d0", Role.DECODE)], 0.0) is None


def test_a_mixed_worker_decodes_what_it_prefilled():
    policy = get_placement_policy("least-loaded")
    d = policy.place(REQ, [w("m0", Role.MIXED), w("m1", Role.MIXED, inflight=2)], 0.0)
    assert d.prefill_worker_id == d.decode_worker_id == "m0"  # its KV stays where it is
    d = policy.place(REQ, [w("m0", Role.MIXED, inflight=3), w("m1", Role.MIXED, inflight=2)], 0.0)
    assert d.prefill_worker_id == d.decode_worker_id == "m1"
    d = policy.place(REQ, [w("m0", Role.MIXED)], 0.0)
    assert d.prefill_worker_id == d.decode_worker_id == "m0"
    # prefilled on a prefill worker: decoded elsewhere, a mixed worker being a decode candidate
    d = policy.place(REQ, [w("p0", Role.PREFILL), w("m0", Role.MIXED, inflight=2), w("d0", Role.DECODE, inflight=3)],
                     0.0)
    assert (d.prefill_worker_id, d.decode_worker_id) == ("p0", "m0")


def test_ties_are_deterministic():
    policy = get_placement_policy("least-loaded")
    workers = [w("p1", Role.PREFILL), w("p0", Role.PREFILL), w("d0", Role.DECODE)]
    assert {policy.place(REQ, workers, t).prefill_worker_id for t in range(5)} == {"p0"}


def test_unknown_policy_names_the_known_ones():
    assert "least-loaded" in placement_policy_names()
    with pytest.raises(ValueError, match="least-loaded"):
        get_placement_policy("nope")
