"""The scheduling-policy interface, its registry and the helpers the policies share.

One interface for all policies (the simulator and the live scheduler load the same classes by name):

* ``layout(n)`` — initial role/pool of each of ``n`` instances;
* ``order_backlog(reqs)`` — order of the offline backlog;
* ``route(req, cluster, now)`` — the instance that prefills a new online request;
* ``decode_target(req, inst, cluster, now)`` — where a request decodes once its prefill is done;
* ``plan(inst, cluster, now)`` — the :class:`StepPlan` of the instance's next step;
* ``tick(cluster, now)`` — periodic control (every ``tick_s`` seconds), returns actions (DOPD role changes).

The decision core (``duopool.core.brain``) asks these questions for the simulator and the live scheduler alike.

Policies are pure: no I/O, no clock (``now`` is passed in), no mutation of the cluster state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from duopool.core.perfmodel import PerfModel
from duopool.core.placement import PoolName, RequestClass, Role, placement_policy_names
from duopool.core.state import OFFLINE, ONLINE, Cluster, Instance, Req, SetRole, StepPlan


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs shared by the policies; defaults and their sources in docs/scheduling.md."""

    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1
    prefill_fraction: float = 0.5  # P/D layouts: share of (online) instances that prefill
    offline_share: float = 0.25  # pd-static: instances reserved for offline work (when static_split is None)
    # pd-static: explicit (prefill, decode, offline-only) instance counts; overrides the two fractions.
    # ``duopool sim`` sizes it from the workload by a stated rule (duopool/sim/sizing.py) unless told.
    static_split: tuple[int, int, int] | None = None
    max_num_seqs: int = 256  # vLLM default
    max_batched_tokens: int = 8192  # tokens per prefill step (vLLM chunked-prefill budget)
    offline_chunk_tokens: int = 2048  # offline prefill chunk on a co-located instance
    # OOCO
    kv_watermark: float = 0.90  # strict instance pulls offline decode while KV use is below this
    step_margin: float = 0.90  # ... and predicted step time below this × TPOT target
    pull_per_step: int = 8
    # HyGen
    hygen_budget_frac: float = 0.80  # latency budget = this × TPOT SLO (the SLO-aware profiler's output)
    hygen_decode_share: float = 1.0  # admit new offline work only while the decode part < this × budget
    starvation_s: float = 60.0  # an offline request queued longer than this goes first
    # Tropical
    short_prompt: int = 256  # prompts this short always multiplex onto decode instances
    # DOPD
    dopd_tick_s: float = 10.0
    dopd_target_util: float = 0.6  # prefill instances kept at most this busy with online prefill
    dopd_alpha: float = 0.5  # forecast smoothing (Holt level)
    dopd_beta: float = 0.3  # forecast smoothing (Holt trend)
    dopd_min_prefill: int = 1

    def __post_init__(self) -> None:
        for f in ("ttft_slo_s", "tpot_slo_s", "max_batched_tokens", "max_num_seqs", "offline_chunk_tokens"):
            if not getattr(self, f) > 0:
                raise ValueError(f"policy config field {f!r} must be > 0")
        for f in ("prefill_fraction", "offline_share", "kv_watermark", "step_margin", "hygen_budget_frac",
                  "hygen_decode_share", "dopd_target_util"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"policy config field {f!r} must be in (0, 1]")
        if self.static_split is not None:
            sp = tuple(self.static_split)
            if len(sp) != 3 or any(int(x) != x or x < 0 for x in sp) or sum(sp) < 1:
                raise ValueError("policy config field 'static_split' must be three counts >= 0 "
                                 "(prefill, decode, offline-only) with at least one instance")
            if (sp[0] == 0) != (sp[1] == 0):
                raise ValueError("policy config field 'static_split' needs both a prefill and a decode "
                                 "instance for online work, or neither (offline only)")
            object.__setattr__(self, "static_split", tuple(int(x) for x in sp))


class SchedulingPolicy:
    """Base class: P/D layout, least-loaded routing, FIFO backlog. Subclasses override the hooks."""

    name: ClassVar[str] = "base"
    tick_s: ClassVar[float] = 0.0
    fast_preemption: ClassVar[bool] = False
    deadline_margin: ClassVar[float] = 0.95  # plan online requests to finish within this share of their TPOT budget
    local_decode_frac: ClassVar[float] = 0.25  # decode in place when the KV transfer takes more of the TPOT budget
    overflow_frac: ClassVar[float] = 0.5  # prompts the prefill side reaches later than this × TTFT may overflow
    local_decode_share: ClassVar[float] = 0.6  # ... and the decode part of that instance's steps stays under this × target

    def __init__(self, perf: PerfModel, cfg: PolicyConfig | None = None) -> None:
        self.pm = perf
        self.cfg = cfg or PolicyConfig()
        self.kv_capacity = perf.kv_capacity_tokens()
        self._prefill_per_token_s = perf.prefill_time_s(1024) / 1024
        self.sat_batch = perf.saturation_batch()

    # ---------------------------------------------------------------- hooks
    def layout(self, n: int) -> list[tuple[Role, PoolName, bool]]:
        """(role, pool, offline_only) per instance."""
        return pd_layout(n, self.cfg.prefill_fraction)

    def order_backlog(self, reqs: list[Req]) -> list[Req]:
        return reqs

    def route(self, r: Req, cluster: Cluster, now: float) -> int:
        return least_queued(candidates(cluster, Role.PREFILL)).idx

    def decode_target(self, r: Req, inst: Instance, cluster: Cluster, now: float) -> int:
        if inst.role == Role.MIXED or inst.offline_only:
            return inst.idx
        return least_decoding(candidates(cluster, Role.DECODE)).idx

    def plan(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        raise NotImplementedError

    def tick(self, cluster: Cluster, now: float) -> list[SetRole]:
        return []

    # ---------------------------------------------------------------- shared pieces
    def online_prefill_chunks(self, inst: Instance, budget: int | None = None, sjf: bool = False) -> list:
        """Online prefills FIFO (or shortest-first) until the token budget; the last one may be chunked."""
        queue = sorted(inst.waiting, key=lambda r: r.prompt - r.prefilled) if sjf else inst.waiting
        return fill_prefill_chunks(queue, self.cfg.max_batched_tokens if budget is None else budget)

    def offline_prefill_chunks(self, inst: Instance, cluster: Cluster, token_budget: int,
                               admit_new: bool = True, kv_reserve: int = 0) -> list:
        """Continue this instance's offline prefills, then admit from the backlog while KV, sequence and
        token budgets allow. Each chunk is at most ``offline_chunk_tokens``."""
        out = []
        left = token_budget
        chunk = self.cfg.offline_chunk_tokens
        for r in inst.waiting_off:
            if left <= 0:
                return out
            c = min(r.prompt - r.prefilled, left, chunk)
            out.append((r, c))
            left -= c
        if not admit_new:
            return out
        free = inst.kv_free() - kv_reserve
        seqs = inst.n_seqs
        i = 0
        backlog = cluster.backlog
        while left > 0 and i < len(backlog) and seqs < self.cfg.max_num_seqs:
            r = backlog[i]
            i += 1
            need = r.prompt + r.output + inst.block_size
            if need > free:
                break
            c = min(r.prompt, left, chunk)
            out.append((r, c))
            free -= need
            left -= c
            seqs += 1
        return out

    def decode_time(self, inst: Instance, extra_n: int = 0, extra_ctx: int = 0, pad_to: int = 0) -> float:
        n = inst.n_decoding + extra_n
        if n <= 0:
            return 0.0
        ctx = inst.ctx_sum() + extra_ctx
        if pad_to > n:  # linear layers at the padded batch, attention at the real contexts
            return (self.pm.linear_time(pad_to) + self.pm.attention_time(ctx, n, ctx)
                    + self.pm.lm_head_time(n) + self.pm.eff.step_overhead_s)
        return self.pm.chunked_step_time_s((), n, ctx)

    def step_target(self) -> float:
        """The step time a decode batch with online work aims for: ``step_margin`` × TPOT SLO."""
        return self.cfg.step_margin * self.cfg.tpot_slo_s

    def online_step_target(self, inst: Instance, now: float) -> float:
        """``step_margin`` × TPOT, or less when an online request decoding here needs it: each one's time
        to its deadline (``deadline_margin`` × TPOT × (max tokens − 1) after its first token) divided by the
        tokens it has still to generate. The KV transfer and the wait to join the batch, which land in a
        short request's TPOT, are paid for by shorter steps."""
        target = self.step_target()
        dm = self.deadline_margin * self.cfg.tpot_slo_s
        steps = inst.steps
        for r in inst.online_decoding.values():
            left = r.output - (r.gen_join + steps - r.join_step)
            if left > 0:
                allow = (r.first_token_t + dm * (r.output - 1) - now) / left
                if allow < target:
                    target = allow
        return target

    def transfer_breaks_tpot(self, r: Req) -> bool:
        """The KV transfer alone would take more than ``local_decode_frac`` of the request's TPOT budget."""
        return self.pm.kv_transfer_s(r.prompt + 1) > \
            self.local_decode_frac * self.cfg.tpot_slo_s * max(1, r.output - 1)

    def decodes_in_place(self, r: Req, inst: Instance) -> bool:
        """An online request on prefill instance ``inst`` keeps decoding there: its KV transfer would break its
        TPOT, or it is already decoding there (``inst`` just changed role)."""
        return r.online and inst.role == Role.PREFILL and (self.transfer_breaks_tpot(r) or r.generated > 1)

    def route_local_decode(self, insts: Sequence[Instance]) -> Instance:
        """The prefill instance for a request that will decode where it prefills: the least queued prompt
        tokens and offline decode work."""
        return min(insts, key=lambda i: (i.queued_prefill_tokens + 64 * i.n_dec[OFFLINE], i.idx))

    def overflow_prefill(self, r: Req, best: Instance, cluster: Cluster) -> Instance:
        """When the least-queued prefill instance ``best`` would take more than ``overflow_frac`` of the TTFT
        SLO to reach this prompt (a burst), a decode instance that would reach it sooner prefills it instead,
        in chunks inside its step target (:meth:`plan_local_online_decode`), and decodes it there."""
        if not self.overflow_frac:
            return best
        per_token = self._prefill_per_token_s
        wait = (best.queued_prefill_tokens + r.prompt) * per_token
        if wait <= self.overflow_frac * self.cfg.ttft_slo_s:
            return best
        target = self.step_target()
        choice, choice_wait = best, wait
        for s in cluster.instances:
            if s.role != Role.DECODE or s.offline_only or not s.accepting:
                continue
            share = 1.0 - min(0.9, self.decode_time(s, 0, 0) / target) if s.n_dec[0] else 1.0
            w = (s.queued_prefill_tokens + r.prompt) * per_token / share
            if w < choice_wait:
                choice, choice_wait = s, w
        return choice

    def plan_local_online_decode(self, inst: Instance, cluster: Cluster, now: float) -> StepPlan:
        """An instance that runs online prefill next to online decodes — a prefill instance decoding requests
        whose KV was too costly to move, or a decode instance prefilling a burst's overflow: steps within the
        deadline-based target, online prefill chunks beside the decodes (as many tokens as fit), no offline
        prefill; offline decodes step aside (evicted, pulled again later) until the decode part is under
        ``local_decode_share`` of the target."""
        target = self.online_step_target(inst, now)
        # offline decodes step aside until the decode part leaves room for online prefill chunks
        evict = self.evict_for_budget(inst, self.local_decode_share * target)
        chunks: list = []
        if inst.waiting:
            n = inst.n_decoding - len(evict)
            ctx = inst.ctx_sum() - sum(inst.ctx_of(r) for r in evict)
            first = inst.waiting[0]
            lo, hi = 0, min(self.cfg.max_batched_tokens, sum(r.prompt - r.prefilled for r in inst.waiting))
            while lo < hi:  # most prompt tokens that keep the step within the target (at least a small chunk)
                mid = (lo + hi + 1) // 2
                if self.pm.chunked_step_time_s([(mid, first.prefilled + mid)], n, ctx) <= target:
                    lo = mid
                else:
                    hi = mid - 1
            chunks = self.online_prefill_chunks(inst, max(lo, min(256, hi)))
        return StepPlan(chunks=tuple(chunks), decode=True, evict=evict)

    def resume_pulls(self, inst: Instance, cluster: Cluster, max_n: int, kv_reserve: int = 0) -> tuple:
        """Swapped offline decodes, oldest first (FIFO, so none starves), that fit this instance's
        slots and KV; stops at the first that does not fit."""
        if not cluster.resume or max_n <= 0:
            return ()
        room = min(max_n, self.cfg.max_num_seqs - inst.n_seqs - inst.incoming - len(inst.inbox))
        if room <= 0:
            return ()
        out = []
        free = inst.kv_free() - kv_reserve
        for r in cluster.resume:
            if r.moving:
                continue
            need = r.prompt + r.output + inst.block_size
            if need > free:
                break
            out.append(r)
            free -= need
            if len(out) >= room:
                break
        return tuple(out)

    def evict_for_budget(self, inst: Instance, budget_s: float) -> tuple:
        """Offline decodes from the back of the running queue until the decode step fits ``budget_s``."""
        if inst.n_dec[OFFLINE] == 0 or self.decode_time(inst) <= budget_s:
            return ()
        out = []
        n, ctx = 0, 0
        for r in inst.newest_offline_decodes():
            out.append(r)
            n += 1
            ctx += inst.ctx_of(r)
            if self.decode_time(inst, -n, -ctx) <= budget_s:
                break
        return tuple(out)


# -------------------------------------------------------------------- registry
_POLICIES: dict[str, type[SchedulingPolicy]] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Register a scheduling policy. The simulator and the live scheduler both run it through the decision
    core (``duopool.core.brain``); it has no separate live placement rule."""

    def wrap(cls: type) -> type:
        if name in _POLICIES or name in placement_policy_names():
            raise ValueError(f"scheduling policy {name!r} registered twice")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return wrap


def get_policy(name: str, perf: PerfModel, cfg: PolicyConfig | None = None) -> SchedulingPolicy:
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {', '.join(sorted(_POLICIES))}") from None
    return cls(perf, cfg)


def policy_names() -> list[str]:
    return sorted(_POLICIES)


# -------------------------------------------------------------------- helpers
def fill_prefill_chunks(queue, budget: int) -> list:
    """(request, tokens) in queue order until ``budget`` prefill tokens; the last one may be chunked."""
    out, left = [], budget
    for r in queue:
        if left <= 0:
            break
        c = min(r.prompt - r.prefilled, left)
        out.append((r, c))
        left -= c
    return out


def pd_layout(n: int, prefill_fraction: float, pools: bool = True) -> list[tuple[Role, PoolName, bool]]:
    if n < 2:
        return [(Role.MIXED, PoolName.RELAXED, False)] * n
    n_p = min(n - 1, max(1, round(n * prefill_fraction)))
    return ([(Role.PREFILL, PoolName.RELAXED, False)] * n_p
            + [(Role.DECODE, PoolName.STRICT, False)] * (n - n_p))


def candidates(cluster: Cluster, role: Role) -> list[Instance]:
    c = [i for i in cluster.instances if i.role == role and i.accepting and not i.offline_only]
    if not c:
        c = [i for i in cluster.instances if i.role == role and not i.offline_only]
    if not c:
        c = [i for i in cluster.instances if not i.offline_only] or cluster.instances
    return c


def least_queued(insts: Sequence[Instance]) -> Instance:
    return min(insts, key=lambda i: (i.queued_prefill_tokens + (4096 if i.running_offline_prefill else 0), i.idx))


def least_decoding(insts: Sequence[Instance]) -> Instance:
    return min(insts, key=lambda i: (i.n_dec[ONLINE] + i.incoming, i.n_decoding, i.idx))


def request_class_of(r: Req) -> RequestClass:
    return RequestClass.ONLINE if r.cls == ONLINE else RequestClass.OFFLINE
