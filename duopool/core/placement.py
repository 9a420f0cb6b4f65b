"""Placement: which prefill and which decode worker serve one request.

Pure: the scheduler service converts Redis/protobuf state into these dataclasses, calls a policy, and
applies the decision it returns. Policies are registered by name so the service and the simulator load
the same class (``get_placement_policy("least-loaded")``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


class PoolName(enum.StrEnum):
    STRICT = "strict"
    RELAXED = "relaxed"


class RequestClass(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class WorkerView:
    """What a policy may know of one worker: observed state plus the scheduler's own in-flight count."""

    worker_id: str
    role: Role
    pool: PoolName
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0  # requests placed on it and not yet released (fresher than heartbeats)
    max_model_len: int = 0
    host: str = ""

    def can_prefill(self) -> bool:
        return self.role in (Role.PREFILL, Role.MIXED)

    def can_decode(self) -> bool:
        return self.role in (Role.DECODE, Role.MIXED)

    @property
    def load(self) -> float:
        """A scalar load for least-loaded choice: queued and running work, then KV pressure."""
        return self.inflight + self.waiting + self.running * 0.5 + self.kv_usage


@dataclass(frozen=True)
class PlacementRequest:
    request_id: str
    request_class: RequestClass
    prompt_tokens: int = 0  # 0 when the router has not tokenized
    max_tokens: int = 0
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    exclude: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class PlacementDecision:
    prefill_worker_id: str
    decode_worker_id: str
    policy: str
    reason: str = ""


class PlacementPolicy(Protocol):
    """Chooses workers for a request; returns None when no worker can take it."""

    name: str

    def place(
        self, request: PlacementRequest, workers: Sequence[WorkerView], now: float
    ) -> PlacementDecision | None: ...


_REGISTRY: dict[str, Callable[[], PlacementPolicy]] = {}


def register_placement(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"placement policy {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def get_placement_policy(name: str) -> PlacementPolicy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def placement_policy_names() -> list[str]:
    return sorted(_REGISTRY)


@register_placement("least-loaded")
class LeastLoaded:
    """Least-loaded prefill worker, least-loaded decode worker; ties broken by worker id (deterministic).

    A request prefilled on a mixed worker decodes there too (its KV stays where it is: one streamed call,
    nothing moved); a request prefilled on a prefill worker decodes on the least-loaded other worker that
    decodes, so prefill and decode disaggregate.
    """

    name = "least-loaded"

    def place(
        self, request: PlacementRequest, workers: Sequence[WorkerView], now: float
    ) -> PlacementDecision | None:
        usable = [w for w in workers if w.worker_id not in request.exclude]
        prefills = sorted((w for w in usable if w.can_prefill()), key=lambda w: (w.load, w.worker_id))
        decodes = sorted((w for w in usable if w.can_decode()), key=lambda w: (w.load, w.worker_id))
        if not prefills or not decodes:
            return None
        prefill = prefills[0]
        if prefill.role == Role.MIXED:
            return PlacementDecision(prefill.worker_id, prefill.worker_id, self.name, reason="least load, one worker")
        decode = next((w for w in decodes if w.worker_id != prefill.worker_id), decodes[0])
        return PlacementDecision(prefill.worker_id, decode.worker_id, self.name, reason="least load")
