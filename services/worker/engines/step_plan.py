"""The policy's step plan for a real engine's own queue: what runs in the next step, from the same ``plan``
code (``duopool.core.policies``) the simulator's instances and the simulated engine run.

A real engine's scheduler (``vllm_sched.DuopoolScheduler`` for vLLM) calls :meth:`StepPlanner.decide` at
the start of every step with its running and waiting requests. The planner mirrors them into the
decision core's types (an :class:`~duopool.core.state.Instance` holding ``Req`` objects: online prompts
being prefilled, offline prefills in progress, the decode batch, the offline backlog), asks the policy's
``plan`` and turns the plan into what an engine scheduler can enforce:

* ``evict``: running offline decodes to stop at this step boundary (the engine preempts them in place: its
  KV blocks are freed, the request waits in the engine, behind online work, and resumes from its prefix);
* ``admit``: offline requests that may start or continue their prefill in this step (every other offline
  prefill waits a step);
* ``token_budget``: the step's tokens, online chunks + offline chunks + one per decode, so an offline
  prefill takes no more than the plan gave it.

The latency predictor the plan uses is fitted to the engine's own steps (:class:`MeasuredPredictor`,
HyGen's linear model refitted as steps run); until it has enough of them the planner leaves the step to
the engine (online before offline, by priority). No I/O and no engine import here: the request objects
only need ``request_id``, ``priority`` (> 0: offline), ``num_prompt_tokens``, ``num_tokens``,
``num_computed_tokens``, ``num_output_tokens``, ``max_tokens`` and ``arrival_time`` (wall clock; vLLM's
``Request`` has them all).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duopool.core.perfmodel import PerfModel, ProfileSample
from duopool.core.placement import PoolName, Role
from duopool.core.policies import PolicyConfig, SchedulingPolicy
from duopool.core.policies.hygen import HyGen
from duopool.core.predictor import LatencyPredictor, fit
from duopool.core.state import OFFLINE, ONLINE, Cluster, Instance, Phase, Req

# Policies whose step plan a real engine can run: their plan reads the latency predictor (fitted to the
# engine's own steps here), not the roofline of an imitated GPU.
ENGINE_STEP_POLICIES = ("hygen",)
PLAN_KEY = "duopool_step_plan"  # where vLLM's KV connector extra config carries the plan's settings
MIN_SAMPLES = 40  # steps measured before the predictor is first fitted (until then: the engine's own order)
REFIT_EVERY = 50  # new steps between refits
MAX_SAMPLES = 2000  # the most recent steps a fit uses
BIAS_ALPHA = 0.05  # weight of the newest step in the measured / predicted moving average (~20 steps)
BIAS_RANGE = (0.5, 4.0)  # one step's ratio is clipped to this before it enters the average
ONLINE_SEQ_SHARE = 8  # 1/8 of the engine's sequence slots are kept from offline admission for online prompts
LATENCIES_KEPT = 1000  # in-engine preemption latencies kept for the percentiles


class MeasuredPredictor:
    """HyGen's latency predictor fitted to the engine's own measured steps, refitted every ``REFIT_EVERY``
    steps over the last ``MAX_SAMPLES``. ``pred`` is None until ``MIN_SAMPLES`` steps were measured.

    The fit is plain least squares (the mean step for its shape: a TPOT is a mean of step periods), and
    ``bias`` — a moving average of measured / predicted over the recent steps — corrects what a fit over the
    last 2,000 steps lags behind: a host whose other processes (the other engine, the token streams) take
    more of the CPU now than they did."""

    def __init__(self, min_samples: int = MIN_SAMPLES, refit_every: int = REFIT_EVERY) -> None:
        self.samples: deque[ProfileSample] = deque(maxlen=MAX_SAMPLES)
        self.pred: LatencyPredictor | None = None
        self._min = min_samples
        self._every = refit_every
        self._new = 0
        self.fits = 0
        self.bias = 1.0
        self.last_predicted_ms = 0.0  # what the fit predicted for the last step added (0: no fit yet)

    def add(self, sample: ProfileSample) -> None:
        if sample.step_ms <= 0 or not (sample.prefill or sample.decode_contexts):
            return
        self.last_predicted_ms = 0.0
        if self.pred is not None:
            p = self.last_predicted_ms = self.pred.predict_sample_ms(sample)
            if p > 0:
                ratio = min(BIAS_RANGE[1], max(BIAS_RANGE[0], sample.step_ms / p))
                self.bias += BIAS_ALPHA * (ratio - self.bias)
        self.samples.append(sample)
        self._new += 1
        if len(self.samples) >= self._min and (self.pred is None or self._new >= self._every):
            self.refit()

    def add_sample(self, prefill: Sequence[tuple[int, int]], decode_contexts: Sequence[int], step_ms: float) -> None:
        """One measured step: its prefill chunks (new tokens, context after), decode contexts, milliseconds."""
        self.add(ProfileSample(tuple(prefill), tuple(decode_contexts), step_ms))

    def refit(self) -> None:
        self._new = 0
        try:
            p = fit(list(self.samples), holdout=0.2, relative=False)
        except (ValueError, np.linalg.LinAlgError):
            return
        if all(math.isfinite(c) for cs in p.coefs for c in cs):
            self.pred = p
            self.fits += 1


@functools.cache
def _roofline() -> PerfModel:
    """The performance model the policy's base class is built with (loaded once: a refit builds a policy)."""
    return PerfModel.load()


class _MeasuredHyGen(HyGen):
    """HyGen's plan on a real engine: its predictor is the engine's measured one, and the decode-time
    estimates its eviction rule uses come from the same predictor instead of an imitated GPU's roofline."""

    def __init__(self, cfg: PolicyConfig, predictor: LatencyPredictor) -> None:
        SchedulingPolicy.__init__(self, _roofline(), cfg)  # the roofline's figures are not read
        self.pred = predictor
        self.base_budget_ms = cfg.hygen_budget_frac * cfg.tpot_slo_s * 1e3
        self.budget_ms = self.base_budget_ms
        self.bias = 1.0

    def calibrate(self, bias: float) -> None:
        """Steps run ``bias`` × their prediction now: the plan holds the budget in measured time (a predicted
        step of budget / bias)."""
        self.bias = bias
        self.budget_ms = self.base_budget_ms / bias

    def decode_time(self, inst: Instance, extra_n: int = 0, extra_ctx: int = 0, pad_to: int = 0) -> float:
        n = inst.n_decoding + extra_n
        if n <= 0:
            return 0.0
        return max(0.0, self.pred.predict_ms(0, inst.ctx_sum() + extra_ctx, 0, n)) / 1e3  # predicted time, as budget_ms


@dataclass
class StepDecision:
    evict: list = field(default_factory=list)  # running offline requests to stop at this boundary
    admit: set = field(default_factory=set)  # ids of offline requests whose prefill may run this step
    token_budget: int | None = None  # None: the engine's own budget
    planned: bool = False  # the policy's plan formed the step (False: predictor not ready yet)


def is_offline(req) -> bool:
    return req.priority > 0


def prefilling(req) -> bool:
    """Still computing its context: a fresh prompt, or a preempted request recomputing prompt + output
    (a decoding request has computed all but its last sampled token)."""
    return req.num_computed_tokens < req.num_tokens - (1 if req.num_output_tokens else 0)


class StepPlanner:
    """Runs a policy's step plan over a real engine's queue (see the module docstring)."""

    def __init__(self, policy: str, ttft_slo_ms: float, tpot_slo_ms: float, block_size: int, kv_capacity: int,
                 max_num_seqs: int, max_batched_tokens: int, predictor: MeasuredPredictor | None = None,
                 clock=time.monotonic, wall=time.time, budget_frac: float = 0.8) -> None:
        if policy not in ENGINE_STEP_POLICIES:
            raise ValueError(f"step policy {policy!r}: a real engine runs the step plans of "
                             f"{', '.join(ENGINE_STEP_POLICIES)} only")
        self.name = policy
        self.max_seqs = max_num_seqs
        # offline admission leaves sequence slots free for online prompts arriving meanwhile
        self.cfg = PolicyConfig(ttft_slo_s=ttft_slo_ms / 1e3, tpot_slo_s=tpot_slo_ms / 1e3,
                                max_num_seqs=max(1, max_num_seqs - max(1, max_num_seqs // ONLINE_SEQ_SHARE)),
                                max_batched_tokens=max_batched_tokens,
                                hygen_budget_frac=budget_frac)
        self.block_size = block_size
        self.kv_capacity = kv_capacity
        self.measured = predictor or MeasuredPredictor()
        self._policy: _MeasuredHyGen | None = None
        self._clock, self._wall = clock, wall
        self._first_token: dict[str, float] = {}  # request id -> when it was first seen decoding (monotonic)
        # offline decodes the plan evicted that wait in the engine: the plan's swapped decodes, resumed by its
        # own rule (HyGen: while the decode part is under the budget's share, two a step), not re-admitted
        # as new work at the next step
        self._evicted: set[str] = set()
        self.preempted = 0  # offline requests evicted by the plan
        self.latencies_ms: deque[float] = deque(maxlen=LATENCIES_KEPT)  # online arrival -> eviction for it

    @property
    def policy(self) -> _MeasuredHyGen | None:
        p = self.measured.pred
        if p is None:
            return None
        if self._policy is None or self._policy.pred is not p:
            self._policy = _MeasuredHyGen(self.cfg, p)
        self._policy.calibrate(self.measured.bias)
        return self._policy

    def decide(self, running: Sequence, waiting: Iterable, kv_used_tokens: int) -> StepDecision:
        policy = self.policy
        now = self._clock()
        skew = self._wall() - now  # request arrival times are wall-clock
        waiting = list(waiting)
        live = {r.request_id for r in running}
        for rid in [k for k in self._first_token if k not in live]:
            del self._first_token[rid]
        if self._evicted:
            self._evicted &= {r.request_id for r in waiting}  # resumed (running again) or gone
        if policy is None:
            return StepDecision(admit={r.request_id for r in [*running, *waiting] if is_offline(r)})
        inst = Instance(0, Role.MIXED, PoolName.RELAXED, kv_capacity=self.kv_capacity, block_size=self.block_size)
        cluster = Cluster([inst])
        of: dict[int, object] = {}
        decode_part = 0
        for i, r in enumerate(running):
            cls = OFFLINE if is_offline(r) else ONLINE
            pf = prefilling(r)
            # a request resumed after a preemption prefills its prompt and the tokens it had generated
            prompt = r.num_tokens if pf else r.num_prompt_tokens
            m = Req(i, cls, r.arrival_time - skew, prompt, max(1, r.max_tokens), queued_t=r.arrival_time - skew,
                    prefilled=min(r.num_computed_tokens, prompt), generated=0 if pf else r.num_output_tokens, inst=0)
            of[i] = r
            if pf:  # a chunk per step
                if cls == ONLINE:
                    inst.waiting.append(m)
                    inst.queued_prefill_tokens += prompt - m.prefilled
                else:
                    inst.waiting_off.append(m)
            else:
                m.first_token_t = self._first_token.setdefault(r.request_id, now)
                m.generated = max(1, m.generated)
                inst.add_decode(m, self.cfg.tpot_slo_s)
                decode_part += prompt + m.generated + self.block_size
        n = len(running)
        for j, r in enumerate(waiting):
            cls = OFFLINE if is_offline(r) else ONLINE
            m = Req(n + j, cls, r.arrival_time - skew, r.num_tokens, max(1, r.max_tokens),
                    queued_t=r.arrival_time - skew, prefilled=0, generated=r.num_output_tokens)
            of[n + j] = r
            if cls == ONLINE:
                m.inst = 0
                inst.waiting.append(m)
                inst.queued_prefill_tokens += m.prompt
            elif r.request_id in self._evicted:
                m.phase = Phase.SWAPPED
                m.prompt, m.generated = r.num_prompt_tokens, r.num_output_tokens
                cluster.resume.append(m)
            else:
                cluster.backlog.append(m)
        inst.kv_reserved = max(0, kv_used_tokens - decode_part)  # prefills' blocks: the engine's own count
        plan = policy.plan(inst, cluster, now)
        d = StepDecision(planned=True)
        d.evict = [of[m.rid] for m in plan.evict if m.cls == OFFLINE and m.rid < n]
        new_online = sum(1 for m, _ in plan.chunks if m.cls == ONLINE and m.rid >= n)
        over = n - len(d.evict) + new_online - self.max_seqs
        if over > 0:
            # the engine admits no request past its sequence limit: an online prompt must not wait for an
            # offline decode to finish, so the newest offline decodes make room for it
            gone = {id(r) for r in d.evict}
            for m in inst.newest_offline_decodes():
                if over <= 0:
                    break
                if id(of[m.rid]) not in gone:
                    d.evict.append(of[m.rid])
                    over -= 1
        if d.evict:
            self.preempted += len(d.evict)
            self._evicted.update(r.request_id for r in d.evict)
            online_waiting = [m for m in inst.waiting if m.prefilled == 0]
            if online_waiting:  # what they were evicted for: the newest online arrival's wait
                newest = max(m.arrival for m in online_waiting)
                self.latencies_ms.append(max(0.0, (now - newest) * 1e3))
        tokens = 0
        online_new = False
        running_offline_chunks: dict[str, int] = {}  # offline prefills continuing in the running batch
        for m, c in plan.chunks:
            tokens += c
            if m.cls == OFFLINE:
                rid = of[m.rid].request_id
                d.admit.add(rid)
                if m.rid < n:
                    running_offline_chunks[rid] = running_offline_chunks.get(rid, 0) + c
            elif m.rid >= n:
                online_new = True
        for m in plan.pull:  # swapped decodes resumed: the engine recomputes their context in this step
            r = of.get(m.rid)
            if r is not None and r.request_id in self._evicted:
                d.admit.add(r.request_id)
                tokens += r.num_tokens
        if online_new:
            # a new online prompt is scheduled after every running request: an offline prefill continuing
            # in the running batch would take the online prompt's share, so it waits this step
            d.admit = {rid for rid in d.admit if rid not in live}
            tokens -= sum(running_offline_chunks.values())  # ... and its chunk is not in the step's budget
        idle_queue = inst.waiting_off or cluster.backlog or cluster.resume
        if not plan.chunks and not plan.pull and inst.n_decoding == 0 and not inst.waiting and idle_queue:
            # an idle engine holds no work: the budgets are for steps that carry online work (and a plan whose
            # fixed step cost alone is over its budget must not strand offline work here)
            m = idle_queue[0]
            d.admit.add(of[m.rid].request_id)
            tokens = self.cfg.max_batched_tokens
        tokens += inst.n_decoding - len(d.evict)
        d.token_budget = max(1, tokens)
        return d

    def latency_percentiles(self) -> tuple[float, float]:
        if not self.latencies_ms:
            return math.nan, math.nan
        a = np.asarray(self.latencies_ms)
        return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# ---------------------------------------------------------------------------- stats to the worker
_STATS = struct.Struct("<8d")  # steps, preempted, planned steps, fitted, samples, test MAPE, latency p50, p99


@dataclass(frozen=True)
class PlanStats:
    steps: int = 0
    preempted: int = 0
    planned_steps: int = 0
    fitted: bool = False
    samples: int = 0
    mape: float = math.nan
    latency_p50_ms: float = math.nan
    latency_p99_ms: float = math.nan


class StatsBlock:
    """A small file the engine's scheduler (another process) writes its plan counters into, at most every
    ``interval_s``, and the worker reads for its heartbeats. Made by the reader (``create``); the writer
    opens it by path."""

    def __init__(self, path: Path, mm: mmap.mmap) -> None:
        self.path, self._mm = path, mm
        self._last = 0.0

    @classmethod
    def create(cls, path: Path) -> StatsBlock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _STATS.size)
            return cls(path, mmap.mmap(fd, _STATS.size))
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | Path) -> StatsBlock:
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(Path(path), mmap.mmap(fd, _STATS.size))
        finally:
            os.close(fd)

    def write(self, s: PlanStats, force: bool = False, interval_s: float = 0.2) -> None:
        now = time.monotonic()
        if not force and now - self._last < interval_s:
            return
        self._last = now
        _STATS.pack_into(self._mm, 0, s.steps, s.preempted, s.planned_steps, float(s.fitted), s.samples,
                         s.mape, s.latency_p50_ms, s.latency_p99_ms)

    def read(self) -> PlanStats:
        v = _STATS.unpack_from(self._mm, 0)
        return PlanStats(int(v[0]), int(v[1]), int(v[2]), bool(v[3]), int(v[4]), v[5], v[6], v[7])

    def close(self, unlink: bool = False) -> None:
        self._mm.close()
        if unlink:
            self.path.unlink(missing_ok=True)
