"""The SIMULATED engine with the scheduling policy's step plan inside: every step is what the policy's
``plan`` (``duopool.core.policies``) returns for this engine's own state — the same code, on the same
``Instance`` and ``Req`` types, that forms each step of the simulator's instances.

What the plan decides, here as in the simulator:

* which online prefill chunks run, and how many offline prefill tokens fill the rest of the step (HyGen's
  latency budget, OOCO's relaxed-pool saturation cap, Tropical's slack check ...);
* which offline requests are admitted from the engine's queue (its ``backlog``), against KV, sequence and
  token budgets;
* which offline decodes it evicts (the newest first) so the online batch meets its step target. An evicted
  request stops at that step boundary, with no RPC: its stream ends with finish reason ``preempted`` and the
  offline dispatcher re-queues it (nothing is lost; its tokens so far are kept).

The engine applies the plan with engine rules: KV for a prompt is allocated when its first chunk runs
(prompt + first token + a block; an online prompt that does not fit preempts offline work first), a decode
step needs a token of free KV per running sequence (offline decodes are preempted, newest first, when it
is short), and a request that arrives with transferred KV (a decode continuation a scheduler placed here)
joins the decode batch at the next step, as a transfer joins a simulated instance. Tokens, stop strings,
KV segments and aborts are the plain sim engine's (``duopool.worker.engines.sim``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from duopool.core.placement import PoolName, Role
from duopool.core.policies import PolicyConfig, SchedulingPolicy, get_policy
from duopool.core.state import OFFLINE, ONLINE, Cluster, Instance, Phase, Req
from duopool.worker.engines.base import EngineLoad
from duopool.worker.engines.sim import SIM_BLOCK_SIZE, SimEngine, _Req

log = logging.getLogger(__name__)

STRANDED_S = 0.2  # an offline prompt on a busy decode instance (its plan admits none) is handed back after this


class PlannedSimEngine(SimEngine):
    def __init__(self, kv_dir: str, policy: str | SchedulingPolicy, role: str = "mixed", pool: str = "",
                 ttft_slo_ms: float = 1000.0, tpot_slo_ms: float = 100.0, **kw) -> None:
        super().__init__(kv_dir, **kw)
        if isinstance(policy, str):
            if self.timer._model is None:
                raise ValueError(f"step policy {policy!r} needs the roofline model of the imitated hardware")
            policy = get_policy(policy, self.timer._model,
                                PolicyConfig(ttft_slo_s=ttft_slo_ms / 1e3, tpot_slo_s=tpot_slo_ms / 1e3))
        self.policy = policy
        role_ = Role(role)
        self.inst = Instance(0, role_, PoolName(pool) if pool else
                             (PoolName.STRICT if role_ == Role.DECODE else PoolName.RELAXED),
                             kv_capacity=self._num_blocks * SIM_BLOCK_SIZE, block_size=SIM_BLOCK_SIZE)
        self.cluster = Cluster([self.inst])
        self._of: dict[int, _Req] = {}  # Req.rid -> the engine request it mirrors
        self._rids = itertools.count()
        self._tpot = policy.cfg.tpot_slo_s
        self.preempted_in_engine = 0  # offline requests this engine's step plans stopped
        self.stranded = 0  # offline requests sent to this decode instance without their KV, handed back
        self.fast_preempted = 0  # offline steps cut short at a layer boundary for an online arrival (OOCO)
        self._cuttable = False  # the running step may be cut short (the plan says so)
        self._cut: asyncio.Event | None = None  # set by an online arrival during a cuttable step
        model = self.timer._model
        self._layers = max(1, int(model.model.num_hidden_layers)) if model is not None else 32

    @classmethod
    def from_config(cls, config) -> PlannedSimEngine:
        return cls(config.kv_dir, config.step_policy, role=config.role, pool=config.pool,
                   ttft_slo_ms=config.ttft_slo_ms, tpot_slo_ms=config.tpot_slo_ms,
                   max_model_len=config.max_model_len, hardware=config.sim_hardware, model=config.sim_model,
                   speedup=config.sim_speedup, offline_flush_s=config.sim_offline_flush_s)

    @property
    def step_plans(self) -> str:
        return self.policy.name

    def set_role(self, role: str, pool: str, offline_only: bool = False) -> None:
        """The worker's role changed (SetRole): the plans follow it (OOCO's pools, DOPD's roles, pd-static's
        offline share)."""
        self.inst.role, self.inst.pool = Role(role), PoolName(pool)
        self.inst.offline_only = offline_only

    def load(self) -> EngineLoad:
        inst = self.inst
        return EngineLoad(inst.n_decoding + len(inst.waiting_off), len(inst.waiting) + len(self.cluster.backlog),
                          min(1.0, inst.kv_usage()), steps=self.steps, step_ms=self.last_step_ms,
                          kv_capacity=inst.kv_capacity)

    def _has_work(self) -> bool:
        return super()._has_work() or bool(self.cluster.backlog or self.inst.waiting or self.inst.n_decoding)

    # -- intake: new engine requests become the plan's requests ---------------------------------------
    def _intake(self, now: float) -> None:
        inst = self.inst
        for q, cls in ((self._waiting, ONLINE), (self._waiting_off, OFFLINE)):
            while q:
                r = q.popleft()
                if r.aborted:
                    self._finish(r, "abort")
                    continue
                prompt = len(r.req.prompt_token_ids)
                m = Req(next(self._rids), cls, now, prompt, max(1, r.req.max_tokens), queued_t=now)
                r.m = m
                r.cached = self._load_kv(r)
                r.prefilled = m.prefilled = r.cached
                self._of[m.rid] = r
                if r.cached:  # transferred KV: a decode placed here joins the batch at the next step
                    m.inst = inst.idx
                    m.prefilled = prompt
                    m.first_token_t = now
                    inst.add_decode(m, self._tpot)
                    self._running.append(r)
                elif cls == ONLINE:
                    m.inst = inst.idx
                    inst.waiting.append(m)
                    inst.queued_prefill_tokens += prompt
                    self._running.append(r)
                else:
                    self.cluster.backlog.append(m)  # admitted when a step plan takes it

    # -- schedule: the policy's plan, applied with engine rules --------------------------------------
    def _schedule(self) -> tuple[list[tuple[_Req, int]], list[_Req]]:
        now = time.monotonic()
        self._intake(now)
        for r in [r for r in self._running if r.aborted]:
            self._finish(r, "abort")
        inst = self.inst
        plan = self.policy.plan(inst, self.cluster, now)
        for m in plan.evict:
            r = self._of.get(m.rid)
            if r is not None and m.phase == Phase.DECODING and m.rid in inst.decoding:
                self._preempt(r, "step plan")
        chunks: list[tuple[_Req, int]] = []
        online_blocked = offline_blocked = False
        for m, c in plan.chunks:
            r = self._of.get(m.rid)
            if r is None or r.done or m.phase != Phase.QUEUED:
                continue
            if m.inst != inst.idx:  # offline work the plan admits from the queue
                if offline_blocked or not self._admit_offline(r):
                    offline_blocked = True
                    continue
            elif m.kv_res == 0:  # an online prompt's first chunk: allocate its KV now
                if online_blocked or not self._allocate_online(r):
                    online_blocked = True
                    continue
            chunks.append((r, min(c, m.prompt - m.prefilled)))
        chunks = [(r, c) for r, c in chunks if not r.done and c > 0]
        decodes: list[_Req] = []
        if plan.decode and inst.n_decoding:
            self._ensure_growth()
            decodes = [self._of[m.rid] for m in inst.decoding.values()]
        # OOCO's fast preemption, as the simulator's instances do it: an online arrival stops an offline step
        # at its next layer boundary; the step's work is not applied (its prefill chunks run again later)
        self._cuttable = bool(self.policy.fast_preemption and plan.fast_preemptible and chunks)
        if not chunks and not decodes and not inst.n_decoding and not inst.waiting and self.cluster.backlog:
            # an idle engine holds no work: the plan's budgets are for steps that carry online work (and a
            # scheduler whose view of this worker differs from the plan's must not strand a request here)
            m = self.cluster.backlog[0]
            r = self._of[m.rid]
            if self._admit_offline(r):
                chunks = [(r, min(m.prompt - m.prefilled, self.policy.cfg.max_batched_tokens))]
        elif inst.role == Role.DECODE and self.cluster.backlog:
            # A decode instance's plan admits no offline prompt; one sent here anyway is a decode continuation
            # whose KV could not be loaded (its segment gone): while the engine is busy it would wait for an
            # idle step that never comes under load, and running its prefill here would break the online
            # requests' TPOT. It is handed back (its stream ends "preempted", nothing lost): the dispatcher
            # re-queues it and the policy places its prefill again.
            for m in [m for m in self.cluster.backlog if now - m.queued_t >= STRANDED_S]:
                r = self._of.get(m.rid)
                if r is not None and not r.done:
                    self.stranded += 1
                    log.info("request %s reached this decode instance without its KV: handed back",
                             r.req.request_id)
                    self._finish(r, "preempted")
        return chunks, decodes

    def _on_online_arrival(self) -> None:
        if self._cut is not None:
            self._cut.set()

    async def _run_step(self, end: float, step_s: float) -> float:
        if not self._cuttable:
            return await super()._run_step(end, step_s)
        self._cut = cut = asyncio.Event()
        try:
            try:
                async with asyncio.timeout(max(0.0, end - time.perf_counter())):
                    await cut.wait()
            except TimeoutError:
                return end
            ended = min(end, time.perf_counter() + step_s / self._layers)  # the layer running finishes
            await asyncio.sleep(max(0.0, ended - time.perf_counter()))
            if ended < end:
                self.fast_preempted += 1
            return ended
        finally:
            self._cut = None

    def _watermark(self) -> int:
        return self.inst.admission_watermark()

    def _admit_offline(self, r: _Req) -> bool:
        inst, m = self.inst, r.m
        need = m.prompt + 1 + inst.block_size
        if inst.kv_free() < need + self._watermark():
            return False
        try:
            self.cluster.backlog.remove(m)
        except ValueError:
            return False
        m.inst = inst.idx
        m.kv_res = need
        inst.kv_reserved += need
        inst.waiting_off.append(m)
        self._running.append(r)
        return True

    def _allocate_online(self, r: _Req) -> bool:
        """KV for an online prompt; offline decodes (newest first), then offline prefills in progress, are
        preempted to make room."""
        inst, m = self.inst, r.m
        need = m.prompt + 1 + inst.block_size
        if inst.kv_free() < need + self._watermark():
            for v in list(inst.newest_offline_decodes()):
                self._preempt(self._of[v.rid], "KV for an online prompt")
                if inst.kv_free() >= need + self._watermark():
                    break
        while inst.kv_free() < need + self._watermark() and inst.waiting_off:
            self._preempt(self._of[inst.waiting_off[-1].rid], "KV for an online prompt")
        if inst.kv_free() < need + self._watermark():
            return False
        m.kv_res = need
        inst.kv_reserved += need
        return True

    def _ensure_growth(self) -> None:
        """A decode step adds a token per running sequence: offline decodes go (newest first) while there is
        not a token of free KV for each."""
        inst = self.inst
        if inst.kv_free() >= inst.n_decoding:
            return
        for v in list(inst.newest_offline_decodes()):
            self._preempt(self._of[v.rid], "KV for the running batch")
            if inst.kv_free() >= inst.n_decoding:
                return

    def _preempt(self, r: _Req, why: str) -> None:
        """Stops an offline request at this step boundary (its stream ends "preempted"; it is re-queued)."""
        self.preempted_in_engine += 1
        log.debug("step plan preempts %s (%s)", r.req.request_id, why)
        self._finish(r, "preempted")

    # -- update: the step's outcome into both the engine requests and the plan's state ---------------
    def _update(self, chunks: list[tuple[_Req, int]], decodes: list[_Req]) -> None:
        inst = self.inst
        now = time.monotonic()
        if decodes:
            inst.steps += 1
        emit = list(decodes)
        joined = []
        for r, c in chunks:
            m = r.m
            if r.done or m.phase != Phase.QUEUED:
                continue
            r.prefilled += c
            m.prefilled += c
            if m.cls == ONLINE:
                inst.queued_prefill_tokens -= c
            if m.prefilled >= m.prompt:
                (inst.waiting if m.cls == ONLINE else inst.waiting_off).remove(m)
                inst.kv_reserved -= m.kv_res
                m.kv_res = 0
                emit.append(r)
                joined.append(r)
        self._emit_tokens(emit)
        for r in joined:
            if not r.done:
                r.m.generated = 1
                r.m.first_token_t = now
                inst.add_decode(r.m, self._tpot)
        inst.compact_join_order()

    def _release(self, r: _Req) -> None:
        super()._release(r)
        m = r.m
        if m is None or m.phase == Phase.DONE:
            return
        inst = self.inst
        if m.phase == Phase.DECODING:
            if m.rid in inst.decoding:
                inst.remove_decode(m)
        elif m.inst != inst.idx:
            try:
                self.cluster.backlog.remove(m)
            except ValueError:
                pass
        else:
            q = inst.waiting if m.cls == ONLINE else inst.waiting_off
            try:
                q.remove(m)
                if m.cls == ONLINE:
                    inst.queued_prefill_tokens -= m.prompt - m.prefilled
            except ValueError:
                pass
            inst.kv_reserved -= m.kv_res
            m.kv_res = 0
        m.phase = Phase.DONE
        self._of.pop(m.rid, None)
