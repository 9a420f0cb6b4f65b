"""Live online/offline co-location rules: how much offline work a worker may hold, and when to preempt.

Pure (no I/O, no clock): the scheduler service feeds it per-worker counts of in-flight online and offline
requests it placed, and applies what it returns — dispatch capacity for the offline queue, and how many
offline requests to preempt on a worker an online request has just been placed on.

The rule is the online-first core shared by the papers' live schedulers: a worker with no online work
in flight takes up to ``offline_per_worker`` offline requests (the ballast filling idle cycles); once
online work lands on it, offline work beyond ``offline_with_online`` is preempted at once (HyGen's
first phase / OOCO's fast preemption) and no new offline work is sent there until the online work has
drained. Preempted requests are re-queued with the tokens they already produced and resume later,
possibly elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ColocationLimits:
    offline_per_worker: int = 4  # offline requests a worker holds while no online request is in flight on it
    offline_with_online: int = 0  # offline requests allowed to keep running next to online work

    def __post_init__(self) -> None:
        if self.offline_per_worker < 0:
            raise ValueError("offline_per_worker: must be >= 0")
        if not 0 <= self.offline_with_online <= self.offline_per_worker:
            raise ValueError("offline_with_online: must be in [0, offline_per_worker]")


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    online: int  # online requests in flight on it (placed by this scheduler)
    offline: int  # offline requests in flight on it


def offline_capacity(load: WorkerLoad, limits: ColocationLimits) -> int:
    """How many more offline requests may be dispatched to this worker now."""
    cap = limits.offline_with_online if load.online > 0 else limits.offline_per_worker
    return max(0, cap - load.offline)


def preemptions(loads: Mapping[str, WorkerLoad], limits: ColocationLimits) -> dict[str, int]:
    """Offline requests to preempt per worker: the excess over the limit where online work is in flight."""
    out = {}
    for wid, load in loads.items():
        if load.online > 0 and load.offline > limits.offline_with_online:
            out[wid] = load.offline - limits.offline_with_online
    return out


def must_yield(load: WorkerLoad, limits: ColocationLimits) -> bool:
    """Whether an offline request about to start a phase on this worker (its decode, after its prefill ran
    elsewhere or earlier) must step back instead: online work is in flight there and the offline work placed
    on it, this request included, exceeds ``offline_with_online``. The same rule as :func:`preemptions`,
    applied to a request that was between phases — and so invisible to the worker — when online work landed.
    """
    return load.online > 0 and load.offline > limits.offline_with_online
