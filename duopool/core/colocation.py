"""Live online/offline co-location rules: how much offline work a worker may hold, and when to preempt.

Pure (no I/O, no clock): the scheduler service feeds it, per worker, the in-flight online and offline
requests it placed and the worker's *SLO pressure* — how close the online requests it served lately came
to their SLOs (observed TTFT / TTFT SLO on a prefill worker, TPOT / TPOT SLO on a decode worker, as a
moving average) — and applies what it returns: dispatch capacity for the offline queue, and how many
offline requests to preempt on a worker.

Two triggers (``ColocationLimits.trigger``):

``slo`` (default) — offline work is ballast that stays while online SLOs hold (the papers' point: every
    spare cycle goes to offline work). A worker with online work in flight keeps taking offline requests
    up to ``offline_per_worker`` while its pressure is below ``slo_low``; between ``slo_low`` and
    ``slo_high`` — or for ``hold_s`` after a preemption there, so that offline work does not come straight
    back while the pressure average still remembers the calm before the spike, only to be preempted again
    — it takes no new offline work (``offline_with_online``); at ``slo_high`` or above — or when
    ``online_queue`` online requests are in flight on it at once (a spike seen before any latency is) —
    offline work beyond ``offline_with_online`` is preempted at once (HyGen's latency-budget first phase,
    OOCO's fast preemption). The band between the two marks is the hysteresis that keeps it from
    oscillating.
``online`` — online first without SLO awareness: any online request landing on a worker preempts the
    offline work beyond ``offline_with_online`` there, and no new offline work goes there until the
    online work has drained.

Preempted requests are re-queued with the tokens they already produced and resume later, possibly
elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TRIGGERS = ("slo", "online")


@dataclass(frozen=True)
class ColocationLimits:
    offline_per_worker: int = 4  # offline requests a worker holds while its online SLOs have headroom
    offline_with_online: int = 0  # offline requests allowed to keep running next to online work under pressure
    trigger: str = "slo"  # slo | online (see the module docstring)
    slo_low: float = 0.5  # pressure below which offline work is still added next to online work
    slo_high: float = 0.8  # pressure at which offline work beyond offline_with_online is preempted
    online_queue: int = 4  # online requests in flight on one worker that preempt regardless of pressure (0: off)
    hold_s: float = 5.0  # after a preemption, no new offline work next to online work there for this long

    def __post_init__(self) -> None:
        if self.offline_per_worker < 0:
            raise ValueError("offline_per_worker: must be >= 0")
        if not 0 <= self.offline_with_online <= self.offline_per_worker:
            raise ValueError("offline_with_online: must be in [0, offline_per_worker]")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger: must be one of {', '.join(TRIGGERS)}")
        if not 0 < self.slo_low <= self.slo_high:
            raise ValueError("slo_low: must be in (0, slo_high]")
        if self.online_queue < 0:
            raise ValueError("online_queue: must be >= 0")
        if self.hold_s < 0:
            raise ValueError("hold_s: must be >= 0")


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    online: int  # online requests in flight on it (placed by this scheduler)
    offline: int  # offline requests in flight on it
    pressure: float = 0.0  # recent observed latency / SLO of its online requests (1.0 = at the SLO)
    since_preempt_s: float = float("inf")  # time since offline work was last preempted there


def _spiking(load: WorkerLoad, limits: ColocationLimits) -> bool:
    """Online work there must not share the worker with more than ``offline_with_online`` offline requests."""
    if load.online <= 0:
        return False
    if limits.trigger == "online":
        return True
    return load.pressure >= limits.slo_high or (limits.online_queue > 0 and load.online >= limits.online_queue)


def allowed_offline(load: WorkerLoad, limits: ColocationLimits) -> int:
    """How many offline requests this worker may hold now."""
    if load.online <= 0:
        return limits.offline_per_worker
    if limits.trigger == "slo" and not _spiking(load, limits) and load.pressure < limits.slo_low \
            and load.since_preempt_s >= limits.hold_s:
        return limits.offline_per_worker
    return limits.offline_with_online


def offline_capacity(load: WorkerLoad, limits: ColocationLimits) -> int:
    """How many more offline requests may be dispatched to this worker now."""
    return max(0, allowed_offline(load, limits) - load.offline)


def preemptions(loads: Mapping[str, WorkerLoad], limits: ColocationLimits) -> dict[str, int]:
    """Offline requests to preempt per worker: the excess over ``offline_with_online`` where online work is
    in flight and the trigger fires."""
    out = {}
    for wid, load in loads.items():
        if _spiking(load, limits) and load.offline > limits.offline_with_online:
            out[wid] = load.offline - limits.offline_with_online
    return out


def must_yield(load: WorkerLoad, limits: ColocationLimits) -> bool:
    """Whether an offline request about to start a phase on this worker (its decode, after its prefill ran
    elsewhere or earlier) must step back instead: the rule of :func:`preemptions`, applied to a request that
    was between phases — and so invisible to the worker — when the trigger fired. The request counts itself
    in ``load.offline``."""
    return _spiking(load, limits) and load.offline > limits.offline_with_online


PRESSURE_CAP = 10.0  # one observation counts at most as a 10x miss, so a single outlier cannot pin the average


def update_pressure(previous: float | None, observed_ms: float, slo_ms: float, alpha: float = 0.3) -> float:
    """The moving average of observed latency / SLO that :class:`WorkerLoad` carries (first sample: itself)."""
    ratio = min(observed_ms / slo_ms, PRESSURE_CAP)
    return ratio if previous is None else (1 - alpha) * previous + alpha * ratio
