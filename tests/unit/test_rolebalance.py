"""Live P/D ratio from SLO pressure (duopool.core.rolebalance)."""

import pytest

from duopool.core.rolebalance import RoleBalanceConfig, RoleBalancer, RoleView


def views(pre: list[float | None], dec: list[float | None], online=None) -> list[RoleView]:
    online = online or {}
    return ([RoleView(f"p{i}", "prefill", p, online.get(f"p{i}", 0)) for i, p in enumerate(pre)]
            + [RoleView(f"d{i}", "decode", p, online.get(f"d{i}", 0)) for i, p in enumerate(dec)]
            + [RoleView("m0", "mixed", 9.0)])


def test_prefill_under_pressure_takes_the_least_busy_decode_worker():
    move = RoleBalancer().decide(views([1.2], [0.1, 0.2, 0.3], online={"d0": 3, "d1": 0, "d2": 1}))
    assert (move.worker_id, move.role) == ("d1", "prefill")
    assert "prefill pressure 1.20" in move.reason


def test_decode_under_pressure_takes_a_prefill_worker():
    move = RoleBalancer().decide(views([0.1, 0.3], [0.9]))
    assert (move.worker_id, move.role) == ("p0", "decode")


@pytest.mark.parametrize(("pre", "dec"), [
    ([1.5], [0.6]),  # the other side has no room (inside the hysteresis band)
    ([0.7], [0.1, 0.1]),  # nobody is under pressure
    ([2.0], [0.1]),  # never the last worker of a role
    ([None], [0.1, 0.1]),  # no observation of the prefill side yet
    ([2.0, 2.0], [None, None]),
])
def test_no_move_without_a_clear_imbalance(pre, dec):
    assert RoleBalancer().decide(views(pre, dec)) is None


def test_one_move_then_cooldown_ticks():
    b = RoleBalancer(RoleBalanceConfig(cooldown_ticks=2))
    w = views([1.5], [0.1, 0.1, 0.1])
    assert b.tick(w) is not None
    assert b.tick(w) is None and b.tick(w) is None
    assert b.tick(w) is not None


def test_config_is_validated():
    with pytest.raises(ValueError, match="low"):
        RoleBalanceConfig(high=0.5, low=0.9)
    with pytest.raises(ValueError, match="cooldown"):
        RoleBalanceConfig(cooldown_ticks=-1)
