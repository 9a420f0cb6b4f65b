"""The engine adapter interface: everything a worker needs from an inference engine.

A worker drives both phases through ``generate``: a prefill is a generate with ``max_tokens=1`` and
``kv_save`` set (the engine writes the prompt's full KV blocks to a segment named by the transfer id and
reports it in ``EngineOutput.kv``); a decode is a generate with ``kv_load`` set (the engine takes the
prompt's first ``num_tokens`` KV from the segment instead of computing it, and reports how many prompt
tokens it did not compute in ``num_cached_tokens``).
"""

from __future__ import annotations

import abc
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from duopool.common.ids import safe_key


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class KvLoad:
    path: str
    num_tokens: int


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    kv_save: str | None = None  # transfer id: export the prompt's KV
    kv_load: KvLoad | None = None
    offline: bool = False


@dataclass(frozen=True)
class KvExport:
    transfer_id: str
    path: str
    num_tokens: int
    num_blocks: int
    num_bytes: int


@dataclass
class EngineOutput:
    """One increment of a request's output (engines may batch several tokens into one increment)."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str = ""
    num_cached_tokens: int = 0
    kv: KvExport | None = None


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float
    steps: int = -1  # engine steps run since it started (-1: not known)
    step_ms: float = 0.0  # the last step's duration
    kv_capacity: int = 0  # KV tokens the engine can hold (0: not known)


class EngineError(RuntimeError):
    """An engine refused a request (bad input for this model) — maps to INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class EngineFailure(RuntimeError):
    """A request failed inside the engine (not the client's fault) — maps to INTERNAL; it fails alone."""


PARK_KEY = "duopool_park"  # vLLM kv_transfer_params: the transfer id a preempted request's KV is parked into


def park_marker(transfer_id: str, directory: pathlib.Path) -> pathlib.Path:
    """The file whose existence turns the abort of a vLLM request carrying ``PARK_KEY`` into a park (made by
    the worker's engine adapter before the abort, consumed by duopool's KV connector)."""
    return directory / f"{transfer_id}.park"


def parked_transfer_id(request_id: str) -> str:
    """The transfer id of the KV an engine saves for ``request_id`` when it stops it with ``park``."""
    return safe_key(f"{request_id}-parked")


class Engine(abc.ABC):
    name: str = "engine"
    simulated: bool = False
    step_observer = None  # called with each engine step's seconds where the engine has steps of its own
    # Whether the engine can save a stopped request's KV (abort with ``park``): every full block of its
    # context, prompt and generated tokens, into the segment ``parked_transfer_id(request_id)``, reported in
    # the final output's ``kv``. ``park_evicted``, set by the worker, asks the same of requests its own step
    # plans evict.
    parks: bool = False
    park_evicted: bool = False

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this (0: unknown, not checked)."""
        return 0

    @property
    def step_plans(self) -> str:
        """The scheduling policy whose step plans form this engine's steps ("" none), for heartbeats."""
        return ""

    def plan_stats(self):
        """A real engine's step-plan counters (``step_plan.PlanStats``), or None where it runs no plans or
        reports none."""
        return None

    @property
    def broken(self) -> str | None:
        """Why the engine can serve nothing more (its loop died), or None while it is healthy. A broken
        engine's worker stops heartbeating and reports NOT_SERVING, so no work is sent to it."""
        return None

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def model_name(self) -> str: ...

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abc.abstractmethod
    def block_size(self) -> int: ...

    @abc.abstractmethod
    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text``; with ``chat``, of ``text`` as one user turn in the model's chat template."""

    @abc.abstractmethod
    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role", "content"}, ...]``) in the model's chat template, ending
        with the assistant's turn to speak."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str, park: bool = False) -> bool:
        """Stops a request at the next step boundary (its stream ends with finish_reason "abort"). With
        ``park`` (and ``parks``) its KV is saved first (see ``parks``); an engine that cannot park ignores it."""

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...


def create_engine(config) -> Engine:
    """The engine a WorkerConfig asks for (imports lazily: only the vllm adapter imports vllm)."""
    if config.engine == "sim":
        if getattr(config, "step_policy", ""):
            from duopool.worker.engines.sim_plan import PlannedSimEngine

            return PlannedSimEngine.from_config(config)
        from duopool.worker.engines.sim import SimEngine

        return SimEngine.from_config(config)
    if config.engine == "vllm":
        from duopool.worker.engines.vllm import VllmEngine

        return VllmEngine.from_config(config)
    raise ValueError(f"engine: unknown engine {config.engine!r}")
