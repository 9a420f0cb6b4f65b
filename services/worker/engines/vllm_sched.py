"""duopool's scheduler class for vLLM: vLLM's own v1 scheduler with the policy's step plan applied at the
start of every step (``StepPlanner``, ``step_plan.py``). vLLM loads it by ``SchedulerConfig.scheduler_cls``
inside its engine-core process; the engine adapter (``vllm.py``) passes the plan's settings in the KV
connector's extra config under ``PLAN_KEY`` (policy, SLOs, the stats file it reads).

Each step:

1. the planner reads the running and waiting requests (offline = vLLM priority > 0) and the KV in use, and
   runs the policy's plan over them;
2. offline decodes the plan evicts are preempted in place (vLLM's own preemption: blocks freed, the request
   back in the waiting queue, resumed later from its prefix);
3. offline requests the plan does not admit this step are kept out of the step (taken out of the waiting
   queue and put back after it; one whose prefill is in progress stays in the running list, skipped until
   its next eligible step);
4. the step's token budget is the plan's (online chunks + offline chunks + one per decode), and the running
   list is ordered decodes, online prefills, offline prefills, so an offline chunk takes only what is left;
5. vLLM's scheduler forms the step within those bounds (its KV allocation, prefix cache and priority
   preemption unchanged).

The measured step (prefill chunks, decode contexts, and its period: from its start to the next step's
start while the engine stays busy, what a decode's TPOT sees) feeds the planner's latency predictor. No RPC is involved: an online arrival changes the next step's plan.
"""

from __future__ import annotations

import logging
import math
import time

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import SchedulingPolicy as VllmQueuePolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from duopool.worker.engines.step_plan import (
    PLAN_KEY,
    PlanStats,
    StatsBlock,
    StepPlanner,
    is_offline,
    prefilling,
)

log = logging.getLogger(__name__)

KV_HOLD_LIMIT = 0.9  # KV use above which offline prefills the plan holds back are preempted, not held
LOG_EVERY_S = 10.0  # how often the engine logs its planned steps: measured and predicted times
IDLE_GAP_S = 0.002  # a next step starting later than this after the last one ended: the engine was idle


class _StepLog:
    """Measured and predicted planned steps, summed for a log line every ``LOG_EVERY_S``."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.n = self.prefill = self.decodes = 0
        self.ms = self.predicted = self.longest = 0.0

    def add(self, ms: float, predicted: float, prefill_tokens: int, decodes: int) -> None:
        self.n += 1
        self.ms += ms
        self.predicted += predicted
        self.prefill += prefill_tokens
        self.decodes += decodes
        self.longest = max(self.longest, ms)

    def flush(self, now: float, preempted: int) -> None:
        n = self.n
        log.info("step plans: %d steps in %.0f s, mean %.1f ms (predicted %.1f, longest %.1f), %.0f prefill tokens "
                 "and %.1f decodes a step; %d offline preempted so far", n, now - self.since, self.ms / n,
                 self.predicted / n, self.longest, self.prefill / n, self.decodes / n, preempted)
        self.__init__(now)


class _StepPlanMixin:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not logging.getLogger().handlers and not log.handlers:  # vLLM's engine process: no logging set up
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s engine %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        ktc = self.vllm_config.kv_transfer_config
        cfg = ((ktc.kv_connector_extra_config or {}) if ktc is not None else {}).get(PLAN_KEY)
        self._planner: StepPlanner | None = None
        self._stats: StatsBlock | None = None
        self._steps = self._planned = 0
        self._t_start = 0.0  # when this step's schedule() began
        self._shape: tuple[list, list] | None = None  # this step's prefill chunks and decode contexts
        self._done: tuple | None = None  # (shape, start, end) of the last step: measured at the next start
        self._log = _StepLog(time.monotonic())
        if not cfg:
            return
        if self.policy != VllmQueuePolicy.PRIORITY or not self.scheduler_config.enable_chunked_prefill:
            log.warning("duopool step plans need vLLM's priority scheduling and chunked prefill; running vLLM's "
                        "own order")
            return
        self._planner = StepPlanner(
            cfg["policy"], float(cfg["ttft_slo_ms"]), float(cfg["tpot_slo_ms"]), self.block_size,
            self.kv_cache_config.num_blocks * self.block_size, self.max_num_running_reqs,
            self.scheduler_config.max_num_batched_tokens, budget_frac=float(cfg.get("budget_frac", 0.8)))
        if cfg.get("stats_path"):
            self._stats = StatsBlock.open(cfg["stats_path"])
        log.info("duopool step plans: %s (TTFT %s ms, TPOT %s ms, step budget %s x TPOT), KV %d tokens",
                 cfg["policy"], cfg["ttft_slo_ms"], cfg["tpot_slo_ms"], cfg.get("budget_frac", 0.8),
                 self.kv_cache_config.num_blocks * self.block_size)

    def schedule(self, *args, **kwargs):
        p = self._planner
        if p is None or self._pause_state != PauseState.UNPAUSED:
            return super().schedule(*args, **kwargs)
        now = time.monotonic()
        try:
            self._measure(now)
            d = p.decide(self.running, self.waiting, int(round(self.kv_cache_manager.usage * p.kv_capacity)))
        except Exception:  # noqa: BLE001 - a planning error must not take the engine down: vLLM's own order
            log.exception("step plan failed; this step runs in vLLM's own order")
            return super().schedule(*args, **kwargs)
        self._t_start = now
        if d.evict:
            for r in d.evict:
                if r.status == RequestStatus.RUNNING and r in self.running:
                    self.running.remove(r)
                    self._preempt_request(r, now)
        held_run = [r for r in self.running if is_offline(r) and prefilling(r) and r.request_id not in d.admit]
        if held_run and self.kv_cache_manager.usage > KV_HOLD_LIMIT:
            # memory is short: an offline prefill sitting the step out must not keep its blocks meanwhile
            for r in held_run:
                self.running.remove(r)
                self._preempt_request(r, now)
            held_run = []
        held_wait = [r for r in self.waiting if is_offline(r) and r.request_id not in d.admit]
        budget = self.max_num_scheduled_tokens
        eligible = [(r, r.next_decode_eligible_step) for r in held_run]
        try:
            if held_wait:
                self.waiting.remove_requests(held_wait)
            # held running requests stay in the running list (they keep their sequence slot and vLLM's own
            # priority preemption still sees them) but are not scheduled in this step: vLLM skips a running
            # request until its next eligible step (``schedule`` counts this step first)
            for r, _ in eligible:
                r.next_decode_eligible_step = self.current_step + 2
            if d.planned:
                self._planned += 1
                # decodes first, then online prefill chunks, then offline ones: within the step's budget an
                # offline chunk gets what online work left (sort is stable)
                self.running.sort(key=lambda r: 0 if not prefilling(r) else (2 if is_offline(r) else 1))
            if d.token_budget is not None:
                self.max_num_scheduled_tokens = min(budget, d.token_budget)
            out = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget
            for r in held_wait:
                self.waiting.add_request(r)
            for r, step in eligible:
                r.next_decode_eligible_step = step
        self._steps += 1
        self._shape = self._step_shape(out)
        return out

    def _measure(self, now: float) -> None:
        """The last step's time, for the latency predictor. In a busy engine a decode's next token waits the
        whole period from one step's start to the next (scheduling, the forward pass, output processing,
        new input): that is what its TPOT sees, so that is the step's time; after an idle gap, only the
        step's own part (start to the end of its update)."""
        if self._done is None:
            return
        shape, t0, t1 = self._done
        self._done = None
        end = now if now - t1 < IDLE_GAP_S else t1
        ms = (end - t0) * 1e3
        m = self._planner.measured
        m.add_sample(shape[0], shape[1], ms)
        if m.last_predicted_ms > 0:  # the prediction the bias correction compared it with
            self._log.add(ms, m.last_predicted_ms, sum(c for c, _ in shape[0]), len(shape[1]))
            if now - self._log.since >= LOG_EVERY_S:
                self._log.flush(now, self._planner.preempted)

    def _step_shape(self, out) -> tuple[list, list] | None:
        prefill, decode = [], []
        for rid, n in out.num_scheduled_tokens.items():
            r = self.requests.get(rid)
            if r is None:
                continue
            before = r.num_computed_tokens - n  # already advanced by this step's tokens
            if n == 1 and r.num_output_tokens and before >= r.num_tokens - 1:  # one token after its last
                decode.append(before + 1)
            else:
                prefill.append((n, before + n))
        return (prefill, decode) if prefill or decode else None

    def update_from_output(self, scheduler_output, model_runner_output):
        out = super().update_from_output(scheduler_output, model_runner_output)
        p = self._planner
        if p is not None and self._shape is not None:
            self._done = (self._shape, self._t_start, time.monotonic())
            self._shape = None
            if self._stats is not None:
                m = p.measured
                p50, p99 = p.latency_percentiles()
                self._stats.write(PlanStats(self._steps, p.preempted, self._planned, m.pred is not None,
                                            len(m.samples), m.pred.test_mape if m.pred is not None else math.nan,
                                            p50, p99))
        return out


class DuopoolScheduler(_StepPlanMixin, Scheduler):
    """vLLM's synchronous scheduler with duopool's step plans."""


class DuopoolAsyncScheduler(_StepPlanMixin, AsyncScheduler):
    """vLLM's asynchronous scheduler with duopool's step plans (the step time measured is the gap between
    two steps' hand-offs there)."""
