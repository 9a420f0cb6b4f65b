"""Live prefill/decode ratio: moves a worker between roles when one side's SLO is under pressure and the
other's has room (DOPD's ratio adjustment, driven by observed latency instead of the simulator's demand
forecast, which needs per-step batch state a live scheduler does not have).

Pure (no I/O, no clock): the scheduler feeds it, every ``role_balance_s``, each worker's role, SLO pressure
(its recent online TTFT / SLO as a prefill worker, TPOT / SLO as a decode worker — see
``duopool.core.colocation``) and in-flight counts, and applies the role change it returns through the
same desired-state path as ``Scheduler.SetWorkerRole``. One worker per tick at most, never the last of a
role, and ``cooldown_ticks`` ticks of rest after a change (a switched worker needs a few requests before
its pressure says anything about its new role).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RoleBalanceConfig:
    high: float = 0.8  # mean pressure of a role that needs another worker
    low: float = 0.5  # mean pressure of a role that can give one up
    cooldown_ticks: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError("low: must be in (0, high]")
        if self.cooldown_ticks < 0:
            raise ValueError("cooldown_ticks: must be >= 0")


@dataclass(frozen=True)
class RoleView:
    worker_id: str
    role: str  # prefill | decode | mixed (mixed workers serve both and are never moved)
    pressure: float | None  # None: no observation since its last role change
    online: int = 0
    offline: int = 0


@dataclass(frozen=True)
class RoleMove:
    worker_id: str
    role: str
    reason: str


def _mean_pressure(ws: Sequence[RoleView]) -> float | None:
    seen = [w.pressure for w in ws if w.pressure is not None]
    return sum(seen) / len(seen) if seen else None


class RoleBalancer:
    def __init__(self, cfg: RoleBalanceConfig | None = None) -> None:
        self.cfg = cfg or RoleBalanceConfig()
        self.rest = 0  # ticks left of cooldown

    def tick(self, workers: Sequence[RoleView]) -> RoleMove | None:
        if self.rest > 0:
            self.rest -= 1
            return None
        move = self.decide(workers)
        if move is not None:
            self.rest = self.cfg.cooldown_ticks
        return move

    def decide(self, workers: Sequence[RoleView]) -> RoleMove | None:
        pre = [w for w in workers if w.role == "prefill"]
        dec = [w for w in workers if w.role == "decode"]
        p_pre, p_dec = _mean_pressure(pre), _mean_pressure(dec)
        if p_pre is None or p_dec is None:
            return None
        hi, lo = self.cfg.high, self.cfg.low
        if p_pre >= hi and p_dec < lo and len(dec) > 1:
            src, to = dec, "prefill"
        elif p_dec >= hi and p_pre < lo and len(pre) > 1:
            src, to = pre, "decode"
        else:
            return None
        w = min(src, key=lambda v: (v.online, v.offline, v.worker_id))  # the cheapest to drain
        return RoleMove(w.worker_id, to, f"role balance: prefill pressure {p_pre:.2f}, decode {p_dec:.2f}")
