"""Discrete-event cluster simulator: virtual clock, N instances, the scheduling policies of ``duopool.core``.

Main loop: pop the next event (receive), let the policy plan the instance's next step (schedule), compute
its duration from the roofline model (execute), apply the outcome at the step's end (update).

Events: online arrival, step end, KV arrival (transfer done), periodic policy tick, idle poll. A decode-only
plan runs as one event for up to ``max_run_steps`` iterations (durations from one roofline call); anything delivered to
the instance meanwhile truncates the run at the next iteration boundary, so decisions still happen at
every step where something changed. Deterministic for a seed (the seed orders the offline backlog).

KV memory is physical: every allocation is checked against the instance's capacity, as an engine does.
An online prompt is allocated when its first chunk is scheduled (preempting this instance's offline work
first: offline decodes swap to host memory, offline prefills in progress go back to the backlog and are
recomputed), else it waits in its queue; a transfer is admitted by its destination only when the KV fits
there (online transfers preempt offline decodes), and until it has arrived the source keeps its copy; a
decode run reserves the tokens it will add. ``kv.peak_fraction`` in the summary is the highest use seen.
Transfers take ``tokens × KV bytes / (NIC rate × eff.net)`` and queue on the sender's and the receiver's NIC,
FIFO within a class, online ahead of offline (an online transfer delays the queued offline ones). A watchdog raises :class:`SimulationStalled` when simulated time advances
``watchdog_s`` with work queued and nothing running anywhere.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from duopool.core.brain import Brain
from duopool.core.perfmodel import Efficiency, PerfModel
from duopool.core.placement import Role
from duopool.core.policies import PolicyConfig, SchedulingPolicy, get_policy
from duopool.core.state import OFFLINE, ONLINE, Cluster, Instance, Phase, Req, SetRole, StepPlan
from duopool.traces import Trace

_ARRIVE, _STEP, _KV, _TICK, _WAKE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SimConfig:
    policy: str = "hygen"  # the default: holds its SLO on every workload measured (docs/scheduling.md)
    hardware: str = "H100-SXM"
    model: str = "llama-3.1-8b"
    tp: int = 1
    instances: int = 8
    seed: int = 0
    policy_cfg: PolicyConfig = field(default_factory=PolicyConfig)
    efficiency: Efficiency | None = None
    max_run_steps: int = 512
    idle_poll_s: float = 0.05
    offline_limit: int | None = None  # None: endless backlog sampled from the offline trace
    max_time_s: float | None = None  # stop here at the latest (default: when online traffic is done)
    watchdog_s: float = 120.0  # simulated seconds with work queued and nothing running before failing loudly

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError("sim config field 'instances' must be >= 1")
        if self.max_run_steps < 1:
            raise ValueError("sim config field 'max_run_steps' must be >= 1")


class SimulationStalled(RuntimeError):
    """Simulated time advanced with work queued and no instance running or transferring anything."""


@dataclass(slots=True)
class _Run:
    plan: StepPlan
    k: int
    start: float
    cum: list[float] | None  # cumulative durations of a decode run
    dur: float
    aborted: bool = False
    n: int = 0  # decodes in the run (each adds one token per iteration)


@dataclass
class SimResult:
    config: SimConfig
    online: list[Req]
    offline: list[Req]
    end_time: float
    wall_s: float
    events: int
    steps: int
    role_history: list = field(default_factory=list)
    offline_tokens: int = 0
    kv: dict = field(default_factory=dict)  # memory and transfer figures (summary.json ``kv``)


class Simulator:
    def __init__(self, cfg: SimConfig, online: Trace | None, offline: Trace | None,
                 perf: PerfModel | None = None, policy: SchedulingPolicy | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        self.cfg = cfg
        self.pm = perf or PerfModel.load(cfg.hardware, cfg.model, tp=cfg.tp, eff=cfg.efficiency)
        self.policy = policy or get_policy(cfg.policy, self.pm, cfg.policy_cfg)
        self.pcfg = self.policy.cfg
        self.online_trace = online
        self.offline_trace = offline
        self.progress = progress
        cap = self.pm.kv_capacity_tokens()
        insts = []
        for i, (role, pool, off_only) in enumerate(self.policy.layout(cfg.instances)):
            inst = Instance(i, role, pool, cap, offline_only=off_only)
            inst.cur = None  # type: ignore[attr-defined]
            inst.token = 0  # type: ignore[attr-defined]
            inst.inbox_online = 0  # type: ignore[attr-defined]  # online requests in inst.inbox
            insts.append(inst)
        self.cluster = Cluster(insts)
        # the decision core (duopool.core.brain): the same routing, decode-target, step-plan and control
        # questions the live scheduler asks, here over the simulator's own state and virtual clock
        self.brain = Brain(self.policy, cluster=self.cluster, log_requests=0)
        self.events: list = []
        self._seq = itertools.count(1)  # FIFO among events at the same time
        self.now = 0.0
        self.n_events = 0
        self.n_steps = 0
        self.online_reqs: list[Req] = []
        self.offline_reqs: list[Req] = []
        self.online_left = len(online) if online is not None else 0
        self._rng = random.Random(cfg.seed)
        self._next_rid = 0
        self._offline_made = 0
        self.role_history: list = [(0.0, self._roles())]
        self._tpot = self.pcfg.tpot_slo_s
        if online is not None and len(online):
            self._arr = online.arrival_s.tolist()
            self._inp = online.input_tokens.tolist()
            self._out = online.output_tokens.tolist()
            self.horizon = float(online.arrival_s[-1])
        else:
            self._arr, self._inp, self._out = [], [], []
            self.horizon = cfg.max_time_s or 0.0
        self._arr_i = 0
        self._off_inp: list[int] = []  # the offline trace as plain lists: indexing numpy per request is slow
        self._off_out: list[int] = []
        if offline is not None and len(offline):
            self._off_inp = [int(x) for x in offline.input_tokens.tolist()]
            self._off_out = [int(x) for x in offline.output_tokens.tolist()]
        self._off_done_i = 0  # offline_reqs[:i] are all done (a finished request stays finished)
        self._last_progress = 0.0  # last time a step or a transfer started (watchdog)
        self._kv_stats = {"transfers": 0, "transfer_s": 0.0, "nic_wait_s": 0.0, "online_transfers": 0,
                          "online_nic_wait_s": 0.0, "transfer_mem_waits": 0,
                          "online_mem_waits": 0, "offline_preempted_for_memory": 0, "rejected_online": 0}

    # ================================================================ events
    def _push(self, t: float, kind: int, a=None, b=None) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, a, b))

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._refill_backlog()
        if self._arr:
            self._push(self._arr[0], _ARRIVE)
        if self.policy.tick_s > 0:
            self._push(self.policy.tick_s, _TICK)
        for inst in self.cluster.instances:
            self._push(0.0, _WAKE, inst)
        stop_at = self.cfg.max_time_s if self.cfg.max_time_s is not None else math.inf
        # stop conditions that cannot change during the run, evaluated once
        stop_when_online_done = self.online_trace is not None and len(self.online_trace) > 0
        n_arrivals = len(self._arr)
        stop_when_offline_done = self.cfg.offline_limit is not None and not self._arr
        progress = self.progress if self.progress and self.horizon > 0 else None
        next_report = 0.0
        ev = self.events
        heappop = heapq.heappop
        cluster = self.cluster
        finish_step, start_step = self._finish_step, self._start_step
        while ev:
            t, _, kind, a, b = heappop(ev)
            if t > stop_at:
                self.now = stop_at
                break
            self.now = cluster.now = t
            self.n_events += 1
            if kind == _STEP:
                if a.token == b:
                    finish_step(a)
            elif kind == _ARRIVE:
                self._arrive()
            elif kind == _KV:
                self._kv_arrived(a, b)
            elif kind == _WAKE:
                if not a.busy:
                    start_step(a)
                    if not a.busy and (t - self._last_progress > self.cfg.watchdog_s
                                       or t - a.step_start > self.cfg.watchdog_s):
                        self._watchdog(a)
            elif kind == _TICK:
                self._tick()
            if stop_when_online_done and self.online_left == 0 and self._arr_i >= n_arrivals \
                    and (self.cfg.offline_limit is None or self._offline_all_done()):
                break  # a finite backlog (offline_limit) is drained too: its drain time is the capacity figure
            if stop_when_offline_done and self._offline_all_done():
                break
            if progress is not None and t >= next_report:
                progress(min(1.0, t / self.horizon))
                next_report = t + self.horizon / 200
        if self.progress:
            self.progress(1.0)
        offline_tokens = self._offline_tokens()
        return SimResult(self.cfg, self.online_reqs, self.offline_reqs, self.now, time.perf_counter() - wall0,
                         self.n_events, self.n_steps, self.role_history, offline_tokens, self._kv_summary())

    def _kv_summary(self) -> dict:
        insts = self.cluster.instances
        cap = max(i.kv_capacity for i in insts)
        st = dict(self._kv_stats)
        n = st["transfers"]
        tsum, wsum = st.pop("transfer_s"), st.pop("nic_wait_s")
        st["transfer_s_mean"] = tsum / n if n else 0.0
        st["nic_wait_s_mean"] = wsum / n if n else 0.0
        on, owsum = st["online_transfers"], st.pop("online_nic_wait_s")
        st["online_nic_wait_s_mean"] = owsum / on if on else 0.0
        return {"capacity_tokens": cap, "peak_tokens": max(i.kv_peak for i in insts),
                "peak_fraction": max(i.kv_peak / i.kv_capacity for i in insts),
                "peak_fraction_per_instance": [round(i.kv_peak / i.kv_capacity, 4) for i in insts], **st}

    # ================================================================ watchdog
    def _work_queued(self) -> bool:
        c = self.cluster
        return bool(c.resume) or any(i.waiting or i.waiting_off or i.inbox or i.xfer_wait or i.busy
                                     for i in c.instances)

    def _watchdog(self, inst: Instance) -> None:
        """Fail loudly when nothing runs anywhere while work is queued, or when an idle instance has work
        queued on it (prompts, KV waiting to join or to arrive) and neither ran a step nor received KV for
        ``watchdog_s``: a stuck simulation must not pass for a slow one."""
        c = self.cluster
        now = self.now
        stuck_here = (inst.waiting or inst.inbox or inst.xfer_wait or inst.waiting_off) \
            and now - inst.step_start > self.cfg.watchdog_s
        if stuck_here:
            what = f"instance {inst.idx} ran no step and received no KV for {now - inst.step_start:.1f} s"
        elif not any(i.busy for i in c.instances) and self._work_queued():
            what = f"nothing ran for {now - self._last_progress:.1f} s"
        else:
            return
        lines = [f"simulated time {now:.1f} s: {what} with work queued ({self.cfg.policy}); "
                 f"resume queue {len(c.resume)}, backlog {len(c.backlog)}"]
        for i in c.instances:
            lines.append(f"  instance {i.idx} {i.role}/{i.pool}: waiting {len(i.waiting)} online, "
                         f"{len(i.waiting_off)} offline; inbox {len(i.inbox)}; transfers waiting for memory "
                         f"{len(i.xfer_wait)}; decoding {i.n_decoding}; KV {i.kv_used()}/{i.kv_capacity} tokens")
        raise SimulationStalled("\n".join(lines))

    # ================================================================ workload
    def _refill_backlog(self) -> None:
        tr = self.offline_trace
        if tr is None or not len(tr):
            return
        bl = self.cluster.backlog
        limit = self.cfg.offline_limit
        if len(bl) >= 2048 or (limit is not None and self._offline_made >= limit):
            return
        batch = []
        n = 4096 if limit is None else min(4096, limit - self._offline_made)
        randrange, size, now = self._rng.randrange, len(tr), self.now
        inp, out, prefixes = self._off_inp, self._off_out, tr.prefix_hashes
        rid = self._next_rid
        for _ in range(n):
            j = randrange(size)
            batch.append(Req(rid, OFFLINE, now, inp[j], out[j], prefixes[j] if prefixes is not None else None,
                             queued_t=now))
            rid += 1
        self._next_rid = rid
        self._offline_made += n
        self.offline_reqs.extend(batch)
        bl.extend(self.policy.order_backlog(batch))

    def _offline_all_done(self) -> bool:
        if self.cluster.backlog:
            return False
        reqs, i = self.offline_reqs, self._off_done_i
        while i < len(reqs) and reqs[i].phase == Phase.DONE:
            i += 1
        self._off_done_i = i
        return i == len(reqs)

    def _arrive(self) -> None:
        i = self._arr_i
        self._arr_i += 1
        r = Req(self._next_rid, ONLINE, self._arr[i], int(self._inp[i]), int(self._out[i]))
        self._next_rid += 1
        r.queued_t = self.now
        self.online_reqs.append(r)
        self.cluster.arrived_prefill_s += self.pm.prefill_time_s(r.prompt)
        self.cluster.arrived_requests += 1
        if self._arr_i < len(self._arr):
            self._push(self._arr[self._arr_i], _ARRIVE)
        i0 = self.cluster.instances[0]
        if r.prompt + 1 + i0.block_size + self._watermark(i0) > i0.kv_capacity:
            r.phase = Phase.REJECTED  # no instance can ever hold it: a counted failure, not a stall
            self.online_left -= 1
            self._kv_stats["rejected_online"] += 1
            return
        inst = self.brain.route(r, self.now)[0]
        self._enqueue_online(inst, r)

    def _enqueue_online(self, inst: Instance, r: Req) -> None:
        """Queue an online prompt; its KV is allocated when its first chunk is scheduled."""
        r.inst = inst.idx
        r.phase = Phase.QUEUED
        r.kv_res = 0
        inst.waiting.append(r)
        inst.queued_prefill_tokens += r.prompt - r.prefilled
        self._poke(inst, online=True)

    # ================================================================ instance steps
    def _poke(self, inst: Instance, online: bool = False) -> None:
        """Something was delivered to ``inst``: start it if idle, or bring its next boundary forward."""
        if not inst.busy:
            self._start_step(inst)
            return
        run: _Run = inst.cur
        now = self.now
        if online and self.policy.fast_preemption and run.plan.fast_preemptible and run.plan.chunks \
                and not run.aborted:
            # fast preemption: the offline step stops at the next layer boundary
            layer = run.dur / self.pm.model.num_hidden_layers
            end = min(run.start + run.dur, now + layer)
            run.aborted = True
            inst.token += 1
            self._push(end, _STEP, inst, inst.token)
            return
        if run.k > 1 and run.cum is not None:
            j = min(bisect_left(run.cum, now - run.start), run.k - 1)
            if j + 1 < run.k:
                run.k = j + 1
                inst.kv_growth = run.n * run.k
                inst.token += 1
                self._push(run.start + run.cum[j], _STEP, inst, inst.token)

    def _start_step(self, inst: Instance) -> None:
        if inst.starting:
            return  # already being started further up the stack (a role change re-routing its queue here)
        inst.starting = True
        try:
            self._start_step_now(inst)
        finally:
            inst.starting = False

    def _start_step_now(self, inst: Instance) -> None:
        now = self.now
        if inst.pending_role is not None:
            self._apply_role(inst)
        if inst.pending_out:
            self._release_pending(inst)
        if inst.xfer_wait:
            self._admit_transfers(inst, may_evict=True)
        if inst.inbox:
            self._join_inbox(inst)
        if len(self.cluster.backlog) < 2048:
            self._refill_backlog()
        plan = self.brain.plan(inst, now)
        for r in plan.evict:
            if r.phase == Phase.DECODING and r.inst == inst.idx:
                self._evict(inst, r)
        for r in plan.pull:
            self._pull(r, inst)
        if plan.chunks:
            plan = self._allocate_chunks(inst, plan)
        n = inst.n_decoding if plan.decode else 0
        if plan.chunks:
            if n and inst.kv_free() < n and not self._ensure_memory(inst):
                n = inst.n_decoding
            chunks = []
            all_offline = True
            for r, c in plan.chunks:
                chunks.append((c, r.prefilled + c))
                if r.cls == ONLINE:
                    all_offline = False
            dur = self.pm.chunked_step_time_s(chunks, n, inst.ctx_sum() if n else 0)
            run = _Run(plan, 1, now, None, dur, n=n)
            inst.running_offline_prefill = all_offline
        elif n:
            if not self._ensure_memory(inst):
                n = inst.n_decoding
                if not n:
                    return self._go_idle(inst)
            k = min(plan.max_steps, self.cfg.max_run_steps)
            nf = inst.next_finish_step()
            if nf is not None:
                k = min(k, max(1, nf - inst.steps))
            free = inst.kv_free()
            k = max(1, min(k, free // n if n else k))
            cum = self.pm.decode_run_cumtimes(n, inst.ctx_sum(), k)
            dur = cum[-1]
            run = _Run(plan, k, now, cum, dur, n=n)
            inst.running_offline_prefill = False
        else:
            return self._go_idle(inst, plan.wake_at)
        inst.kv_growth = run.n * run.k
        inst.note_kv_peak()
        self._last_progress = now
        inst.cur = run
        inst.busy = True
        inst.step_start, inst.step_end = now, now + dur
        inst.token += 1
        self.n_steps += 1
        self._push(now + dur, _STEP, inst, inst.token)

    def _go_idle(self, inst: Instance, wake_at: float | None = None) -> None:
        inst.busy = False
        inst.cur = None
        inst.running_offline_prefill = False
        t = wake_at if wake_at is not None else self.now + self.cfg.idle_poll_s
        self._push(max(t, self.now + 1e-6), _WAKE, inst)

    def _finish_step(self, inst: Instance) -> None:
        run: _Run = inst.cur
        inst.busy = False
        inst.cur = None
        inst.kv_growth = 0
        if not run.aborted:
            if run.plan.decode and inst.n_decoding:
                inst.steps += run.k
                for r in inst.pop_finished():
                    self._complete(inst, r)
            for r, c in run.plan.chunks:
                if r.inst != inst.idx or r.phase != Phase.QUEUED:
                    continue
                r.prefilled += c
                if r.cls == ONLINE:
                    inst.queued_prefill_tokens -= c
                if r.prefilled >= r.prompt:
                    self._prefill_done(inst, r)
        else:
            for r, _c in run.plan.chunks:
                if r.cls == OFFLINE:
                    r.preemptions += 1
        inst.compact_join_order()
        self._start_step(inst)

    def _complete(self, inst: Instance, r: Req) -> None:
        inst.remove_decode(r)
        r.generated = r.output
        r.phase = Phase.DONE
        r.finish_t = self.now
        r.inst = -1
        if r.cls == ONLINE:
            self.online_left -= 1

    def _prefill_done(self, inst: Instance, r: Req) -> None:
        now = self.now
        if r.cls == ONLINE:
            inst.waiting.remove(r)
        else:
            inst.waiting_off.remove(r)
        inst.kv_reserved -= r.kv_res
        r.kv_res = 0
        r.generated = 1
        if math.isnan(r.first_token_t):
            r.first_token_t = now
        if r.output <= 1:
            r.phase = Phase.DONE
            r.finish_t = now
            r.inst = -1
            if r.cls == ONLINE:
                self.online_left -= 1
            return
        dst = self.brain.decode_target(r, inst, now)
        r.kv_res = r.prompt + 1 + inst.block_size  # prompt + first token: exactly what joining the batch takes
        inst.kv_reserved += r.kv_res
        if dst == inst.idx:
            self._to_inbox(inst, r)
        else:
            self._hold_source(inst, r)
            self._transfer(r, self.cluster.instances[dst], r.prompt + 1, inst)

    def _hold_source(self, inst: Instance, r: Req) -> None:
        """``r``'s KV on ``inst`` (its reservation) stays allocated until the copy has arrived elsewhere."""
        r.src, r.src_res = inst.idx, r.kv_res
        r.kv_res = 0

    def _move_out(self, inst: Instance, r: Req, dst: Instance) -> None:
        """A running decode leaves ``inst`` for ``dst``; its blocks stay allocated here until they have moved."""
        inst.remove_decode(r)
        tokens = r.prompt + r.generated
        r.kv_res = tokens + inst.block_size
        inst.kv_reserved += r.kv_res
        self._hold_source(inst, r)
        self._transfer(r, dst, tokens, inst)

    def _transfer(self, r: Req, dst: Instance, tokens: int, src: Instance | None = None,
                  admit: bool = True) -> None:
        """Queue ``r``'s KV (``tokens``) for ``dst``, from ``src`` (None: host memory). It starts once ``dst``
        can allocate it (not before ``dst``'s next step boundary when ``admit`` is False)."""
        r.phase = Phase.TRANSFER
        r.inst = dst.idx
        r.kv_res = 0
        if src is None:
            r.src, r.src_res = -1, 0
        dst.incoming += 1
        dst.xfer_wait.append((r, tokens))
        if admit and (len(dst.xfer_wait) == 1 or r.cls == ONLINE):
            self._admit_transfers(dst, may_evict=not dst.busy)
        if r.kv_res == 0:  # still waiting for memory there
            self._kv_stats["transfer_mem_waits"] += 1
            if dst.busy and r.cls == ONLINE:
                self._poke(dst)  # bring its next step boundary forward: online may preempt offline there

    def _admit_transfers(self, inst: Instance, may_evict: bool) -> None:
        """Allocate KV for waiting transfers, online first, FIFO within a class, and start them. An online
        transfer preempts offline decodes here (``may_evict``: only at a step boundary)."""
        q = inst.xfer_wait
        if len(q) > 1 and any(r.cls == ONLINE for r, _ in q):
            q = deque(sorted(q, key=lambda e: e[0].cls))
        keep: deque = deque()
        blocked = [False, False]
        bs = inst.block_size
        for r, tokens in q:
            if blocked[r.cls]:
                keep.append((r, tokens))
                continue
            need = tokens + bs + self._watermark(inst)  # and room left for the running batch to grow
            if inst.kv_free() < need and r.cls == ONLINE and may_evict:
                for v in inst.newest_offline_decodes():
                    self._evict(inst, v)
                    self._kv_stats["offline_preempted_for_memory"] += 1
                    if inst.kv_free() >= need:
                        break
            if inst.kv_free() < need:
                blocked[r.cls] = True
                keep.append((r, tokens))
                continue
            r.kv_res = tokens + bs
            inst.kv_reserved += r.kv_res
            inst.note_kv_peak()
            src = self.cluster.instances[r.src] if r.src >= 0 else None
            now = self.now
            dur = self.pm.kv_transfer_s(tokens)
            start, end = self._nic_slot(r.cls == ONLINE, src.nic_tx if src is not None and src is not inst else None,
                                        inst.nic_rx, dur)
            st = self._kv_stats
            st["transfers"] += 1
            st["transfer_s"] += dur
            st["nic_wait_s"] += start - now
            if r.cls == ONLINE:
                st["online_transfers"] += 1
                st["online_nic_wait_s"] += start - now
            self._last_progress = now
            self._push(end, _KV, r, inst)
        inst.xfer_wait = keep

    def _nic_slot(self, online: bool, tx: list | None, rx: list, dur: float) -> tuple[float, float]:
        """(start, end) of a transfer of ``dur`` seconds through a sender's and a receiver's NIC queues (``tx``
        None: from host memory). Each queue is [online tail, all tail]: transfers are FIFO within a class, an
        online one waits only for online ones and pushes the queued offline traffic back by its duration."""
        queues = (rx,) if tx is None else (rx, tx)
        now = self.now
        if online:
            start = max(now, *(q[0] for q in queues))
            end = start + dur
            for q in queues:
                q[0] = end
                q[1] = max(q[1], start) + dur
        else:
            start = max(now, *(q[1] for q in queues))
            end = start + dur
            for q in queues:
                q[1] = end
        return start, end

    def _kv_arrived(self, r: Req, dst: Instance) -> None:
        dst.incoming -= 1  # its KV now sits in dst's memory (r.kv_res) until it joins the batch
        if r.src >= 0:
            src = self.cluster.instances[r.src]
            src.kv_reserved -= r.src_res
            r.src, r.src_res = -1, 0
        self._last_progress = self.now
        if not dst.busy:
            dst.step_start = self.now  # (idle) activity for the watchdog
        self._to_inbox(dst, r)
        self._poke(dst)

    def _to_inbox(self, inst: Instance, r: Req) -> None:
        inst.inbox.append(r)
        if r.cls == ONLINE:
            inst.inbox_online += 1

    def _join_inbox(self, inst: Instance) -> None:
        box = inst.inbox
        if not box:
            return
        online_left = inst.inbox_online  # online requests in ``box`` not looked at yet
        if online_left and box[0].cls != ONLINE:
            box = deque(sorted(box, key=lambda r: r.cls))  # online first, FIFO within a class
        inst.inbox = waiting = deque()
        waiting_online = 0
        max_seqs = self.pcfg.max_num_seqs
        blocked = [False, False]  # per class: FIFO, so once one waits the rest of its class waits too
        victims = inst.newest_offline_decodes()
        no_victims = False
        items = iter(box)
        for r in items:
            online = r.cls == ONLINE
            if online:
                online_left -= 1
            if blocked[r.cls]:
                waiting.append(r)
                waiting_online += online
            else:
                need = r.prompt + r.output + inst.block_size
                if online and not no_victims:
                    while inst.n_decoding >= max_seqs or inst.kv_free() + r.kv_res < need:
                        v = next(victims, None)
                        if v is None:
                            no_victims = True
                            break
                        self._evict(inst, v)
                # room to grow a little; with nothing decoding here (nothing will free memory), its own KV is
                # enough: decode growth then preempts the newest online sequence (swap) as an engine does
                room = min(need, r.prompt + r.generated + 64) if inst.n_decoding else r.kv_res + inst.block_size
                if inst.n_decoding >= max_seqs or inst.kv_free() + r.kv_res < room:
                    waiting.append(r)  # waits for room, keeping its reservation
                    waiting_online += online
                    blocked[r.cls] = True
                else:
                    inst.kv_reserved -= r.kv_res
                    r.kv_res = 0
                    inst.add_decode(r, self._tpot)
            if blocked[OFFLINE] and (blocked[ONLINE] or not online_left):
                # everything behind waits as well (the per-request loop would only re-queue it): keep it as is
                waiting.extend(items)
                waiting_online += online_left
                break
        inst.inbox_online = waiting_online

    def _ensure_memory(self, inst: Instance) -> bool:
        """Engine-level preemption when the next decode step would overflow KV: offline first."""
        ok = True
        while inst.n_decoding and inst.kv_free() < inst.n_decoding:
            ok = False
            v = next(inst.newest_offline_decodes(), None)
            if v is None:
                # only online left: swap out the newest online sequence and bring it back later
                v = next(r for r, ep in reversed(inst.join_order) if ep == r.epoch and r.phase == Phase.DECODING)
                inst.remove_decode(v)  # swapped out to host memory, back in when it fits
                v.preemptions += 1
                self._transfer(v, inst, v.prompt + v.generated, admit=False)
                continue
            self._evict(inst, v)
        return ok

    def _evict(self, inst: Instance, r: Req) -> None:
        inst.remove_decode(r)
        r.phase = Phase.SWAPPED
        r.inst = -1
        r.preemptions += 1
        r.queued_t = self.now
        self.cluster.resume.append(r)

    @staticmethod
    def _watermark(inst: Instance) -> int:
        return inst.admission_watermark()

    def _allocate_chunks(self, inst: Instance, plan: StepPlan) -> StepPlan:
        """Allocate KV for the plan's chunks as the engine would; drop the ones that do not fit. A new online
        prompt first preempts this instance's offline work (decodes swap to host, prefills in progress go
        back to the backlog), then waits in its queue (FIFO: the ones behind it wait too)."""
        kept = []
        online_blocked = False
        dropped: set[int] = set()
        for r, c in plan.chunks:
            if r.rid in dropped:
                continue
            if r.inst != inst.idx:  # offline work admitted by this step
                if r.phase != Phase.QUEUED or not self._admit_offline(inst, r):
                    continue
            elif r.cls == ONLINE and r.kv_res == 0:
                if online_blocked:
                    continue
                need = r.prompt + 1 + inst.block_size  # the prompt and its first token
                if inst.kv_free() < need + self._watermark(inst):
                    self._free_for_online(inst, need + self._watermark(inst), dropped)
                if inst.kv_free() < need + self._watermark(inst):
                    online_blocked = True
                    self._kv_stats["online_mem_waits"] += 1
                    continue
                r.kv_res = need
                inst.kv_reserved += need
            kept.append((r, c))
        if dropped:
            kept = [(r, c) for r, c in kept if r.rid not in dropped]
        if len(kept) != len(plan.chunks):
            plan = replace(plan, chunks=tuple(kept))
        return plan

    def _free_for_online(self, inst: Instance, need: int, dropped: set[int]) -> None:
        for v in inst.newest_offline_decodes():
            self._evict(inst, v)
            self._kv_stats["offline_preempted_for_memory"] += 1
            if inst.kv_free() >= need:
                return
        while inst.waiting_off and inst.kv_free() < need:
            v = inst.waiting_off.pop()
            self._back_to_backlog(inst, v)
            v.preemptions += 1
            dropped.add(v.rid)
            self._kv_stats["offline_preempted_for_memory"] += 1

    def _back_to_backlog(self, inst: Instance, r: Req) -> None:
        """An offline prefill in progress (already out of ``inst.waiting_off``) gives up its KV on ``inst`` and
        goes back to the front of the backlog; its prefill is recomputed when it is admitted again."""
        inst.kv_reserved -= r.kv_res
        r.kv_res = 0
        r.prefilled = 0
        r.phase = Phase.QUEUED
        r.inst = -1
        self.cluster.backlog.appendleft(r)

    def _admit_offline(self, inst: Instance, r: Req) -> bool:
        if inst.kv_free() < r.prompt + 1 + inst.block_size + self._watermark(inst):
            return False
        bl = self.cluster.backlog
        if bl and bl[0] is r:
            bl.popleft()
        else:
            bl.remove(r)
        r.inst = inst.idx
        r.phase = Phase.QUEUED
        r.queued_t = self.now
        r.kv_res = r.prompt + 1 + inst.block_size
        inst.kv_reserved += r.kv_res
        inst.waiting_off.append(r)
        return True

    def _pull(self, r: Req, dst: Instance) -> None:
        if r.phase == Phase.SWAPPED:
            self.cluster.resume.remove(r)
            self._transfer(r, dst, r.prompt + r.generated)
            return
        if r.phase != Phase.DECODING or r.moving or r.inst == dst.idx:
            return
        src = self.cluster.instances[r.inst]
        self._set_moving(r, True)
        dst.incoming += 1
        src.pending_out.append((r, dst))
        if src.busy:
            self._poke(src)
        else:
            self._release_pending(src)

    def _set_moving(self, r: Req, moving: bool) -> None:
        r.moving = moving
        if r.phase == Phase.DECODING:  # its instance's batch changed (see Instance.version)
            self.cluster.instances[r.inst].version += 1

    def _release_pending(self, inst: Instance) -> None:
        if not inst.pending_out:
            return
        for r, dst in inst.pending_out:
            dst.incoming -= 1
            self._set_moving(r, False)
            if r.phase != Phase.DECODING or r.inst != inst.idx:
                continue
            self._move_out(inst, r, dst)
        inst.pending_out.clear()

    # ================================================================ control
    def _tick(self) -> None:
        acts = self.brain.control(self.now)
        for a in acts:
            if isinstance(a, SetRole):
                inst = self.cluster.instances[a.instance]
                inst.pending_role = (a.role, a.pool)
                inst.accepting = False
                if not inst.busy:
                    self._start_step(inst)
                else:
                    self._poke(inst)
        if acts:
            self.role_history.append((self.now, self._roles()))
        if self.online_left > 0 or self._arr_i < len(self._arr):
            self._push(self.now + self.policy.tick_s, _TICK)

    def _roles(self) -> list[str]:
        return [str(i.role if i.pending_role is None else i.pending_role[0]) for i in self.cluster.instances]

    def _apply_role(self, inst: Instance) -> None:
        role, pool = inst.pending_role
        inst.pending_role = None
        inst.role, inst.pool = role, pool
        inst.accepting = True
        now = self.now
        if role == Role.DECODE:
            for r in [r for r in inst.waiting if r.prefilled == 0]:
                inst.waiting.remove(r)
                inst.queued_prefill_tokens -= r.prompt
                inst.kv_reserved -= r.kv_res
                r.kv_res = 0
                self._enqueue_online(self.brain.route(r, now)[0], r)
            for r in list(inst.waiting_off):
                inst.waiting_off.remove(r)
                self._back_to_backlog(inst, r)
        else:
            for r in list(inst.decoding.values()):
                if r.moving:
                    continue  # already leaving (a pull released at this boundary)
                dst = self.brain.decode_target(r, inst, now)
                if dst != inst.idx:
                    self._move_out(inst, r, self.cluster.instances[dst])

    def _offline_tokens(self) -> int:
        total = 0
        for r in self.offline_reqs:
            if r.phase == Phase.DECODING:
                total += self.cluster.instances[r.inst].gen_of(r)
            else:
                total += r.generated
        return total
