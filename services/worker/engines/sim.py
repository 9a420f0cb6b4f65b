"""The SIMULATED engine: real batching, block accounting and KV segments; synthetic tokens and timing.

Everything it produces is labelled simulated (token text ``sim<ID>``, engine name ``sim``). It lets the real
router, scheduler, kvtransfer and Redis run a cluster of many simulated GPUs on one small host:

* step loop: each step admits waiting requests (prefill) up to the batch and KV limits, runs one decode
  token for every running request, and takes the step time predicted by the roofline performance model
  of the imitated hardware and model (``duopool.core.perfmodel``), divided by ``speedup`` — step start to
  step start, the loop's own work in between overlapping the step as an asynchronous scheduler's does
  (``OVERLAP_S``);
* tokens: a deterministic function of the previous token and the position (and the seed), so a request
  split across a prefill and a decode engine yields exactly the tokens one engine would;
* KV: a prefill with ``kv_save`` writes a real KV segment (one small block per 16 prompt tokens, content
  derived from the prompt), and a decode with ``kv_load`` verifies it byte for byte before counting those
  tokens as cached — so the KV path, leases and failures are exercised for real.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from duopool.kv.segment import KvSegment, SegmentError, SegmentMeta, segment_path
from duopool.worker.engines.base import (
    Engine,
    EngineError,
    EngineFailure,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    KvExport,
    parked_transfer_id,
)

log = logging.getLogger(__name__)

SIM_VOCAB = 32000
SIM_BLOCK_SIZE = 16
MAX_BATCH = 256  # sequences in one step: vLLM's default max_num_seqs (the simulator's instances use it too)
MAX_BATCHED_TOKENS = 8192  # tokens in one step (vLLM's chunked-prefill budget; the simulator's too)
DEFAULT_BLOCKS = 4096  # KV blocks without a roofline model (or if it holds less)
IDLE_POLL_S = 0.005  # with work held and nothing to run, the step loop looks again this often
OVERRUN_REPORT_S = 10.0  # how often the step loop reports its wall time against the modeled time
# The step loop's own work between two steps (forming the batch, emitting tokens) overlaps the next step, as
# an asynchronous scheduler's does on a GPU, up to this much: a step *period* is the modeled step time while
# the host keeps up. Beyond it (a loaded host), the period grows and the overrun is reported.
OVERLAP_S = 0.005
SIM_BLOCK_BYTES = 4 * SIM_BLOCK_SIZE  # per block of the simulated segment: a word per token (real models carry far more)


def sim_tokenize(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % SIM_VOCAB for w in text.split()]


def sim_token(last_token: int, position: int, seed: int | None) -> int:
    """The next token from the last one and the sequence length: a prefill/decode split reproduces it."""
    return (last_token * 31 + 7919 * position + 104729 * (seed or 0)) % SIM_VOCAB


def sim_kv_blocks(ids: tuple[int, ...], n: int) -> np.ndarray:
    """The simulated KV of the first ``n`` full blocks of ``ids``: (n, SIM_BLOCK_BYTES) bytes, a known function
    of each token id and its position (so a decode can check that what it loads is its prompt's), computed
    in one vector operation: the imitated GPU's KV must not cost the host much CPU per token (it did: a
    hash per block, ~2 ms per 14 k-token context at every park, resume and load)."""
    tok = np.fromiter(ids[: n * SIM_BLOCK_SIZE], dtype=np.uint32, count=n * SIM_BLOCK_SIZE).reshape(n, SIM_BLOCK_SIZE)
    where = np.arange(n * SIM_BLOCK_SIZE, dtype=np.uint32).reshape(n, SIM_BLOCK_SIZE)
    words = tok * np.uint32(2654435761) + where * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15)
    return words.astype("<u4", copy=False).view(np.uint8)


class StepTimer:
    """Predicts one step's seconds from the roofline model of the imitated hardware and model."""

    def __init__(self, hardware: str, model: str, speedup: float) -> None:
        self.speedup = speedup
        self.source = "linear"
        self._model = None
        try:
            from duopool.core.perfmodel import PerfModel

            self._model = PerfModel.load(hardware=hardware, model=model)
            self.source = f"roofline:{hardware}:{model}"
        except Exception as exc:  # noqa: BLE001 - an unknown name falls back, and says so
            log.warning("sim engine: no roofline model for %s/%s (%s); using a linear step model",
                        hardware, model, exc)

    def kv_capacity_tokens(self) -> int:
        """KV tokens the imitated hardware holds for the model (0: no roofline model)."""
        return self._model.kv_capacity_tokens() if self._model is not None else 0

    def chunked_step_s(self, chunks: list[tuple[int, int]], decode_ctxs: list[int]) -> float:
        """One step of prefill chunks (new tokens, context after the chunk) beside decodes (contexts)."""
        if self._model is not None:
            return self._model.chunked_step_time_s(chunks, len(decode_ctxs), float(sum(decode_ctxs))) / self.speedup
        return self.step_s([c for c, _ in chunks], decode_ctxs)

    def step_s(self, prefill_lens: list[int], decode_ctxs: list[int]) -> float:
        if self._model is not None:
            t = self._model.step_time_s(prefill_lens, decode_ctxs)
        else:  # ~H100 / 8B orders of magnitude: 60 µs per prefill token, 10 ms base decode step
            t = 0.004 + 60e-6 * sum(prefill_lens) + 0.006 * bool(decode_ctxs) + 2e-9 * sum(decode_ctxs) * 1e3
        return t / self.speedup


@dataclass
class _Req:
    req: EngineRequest
    out: asyncio.Queue
    last: int
    cached: int = 0
    generated: int = 0
    prefilled: int = -1  # prompt tokens computed (-1: not admitted yet)
    done: bool = False
    blocks: int = 0
    text: str = ""
    kv: KvExport | None = None
    aborted: bool = False
    park: bool = False  # aborted with park: its KV is saved as it stops
    ids: list[int] = field(default_factory=list)  # the tokens it generated
    first_output: bool = True
    held: list[int] = field(default_factory=list)  # offline tokens not put out yet (``offline_flush_s``)
    held_text: list[str] = field(default_factory=list)
    flushed: float = 0.0  # when its last output was put out (perf_counter)
    m: object = None  # the step plan's Req for it (duopool.worker.engines.sim_plan), if plans run the steps


class SimEngine(Engine):
    name = "sim"
    simulated = True
    parks = True

    def __init__(self, kv_dir: str, max_model_len: int = 4096, num_blocks: int | None = None,
                 max_batch: int = MAX_BATCH, hardware: str = "H100-SXM", model: str = "llama-3.1-8b",
                 speedup: float = 1.0, max_batched_tokens: int = MAX_BATCHED_TOKENS,
                 offline_flush_s: float = 0.0) -> None:
        self._token_budget = max_batched_tokens
        self._offline_flush_s = offline_flush_s
        self._kv_dir = pathlib.Path(kv_dir)
        self._max_model_len = max_model_len
        self._max_batch = max_batch
        self._model = model
        self.timer = StepTimer(hardware, model, speedup)
        if num_blocks is None:  # the imitated GPU's KV memory (what the simulator's instances hold)
            cap = self.timer.kv_capacity_tokens()
            num_blocks = max(DEFAULT_BLOCKS, cap // SIM_BLOCK_SIZE) if cap else DEFAULT_BLOCKS
        self._num_blocks = num_blocks
        self.last_step_ms = 0.0
        self._waiting: deque[_Req] = deque()  # online (and unclassed) requests not admitted yet, FIFO
        self._waiting_off: deque[_Req] = deque()  # offline ones: admitted only after every online one
        self._running: list[_Req] = []
        self._by_id: dict[str, _Req] = {}
        self._used_blocks = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._broken: str | None = None
        self.steps = 0
        self._modeled_s = self._wall_s = 0.0
        self._step_end = -1.0  # when the last step ended (perf_counter)
        self._mix = [0, 0, 0]  # steps, decodes, prefill tokens since the last report
        self._reported = time.monotonic()

    @classmethod
    def from_config(cls, config) -> SimEngine:
        return cls(config.kv_dir, config.max_model_len, hardware=config.sim_hardware, model=config.sim_model,
                   speedup=config.sim_speedup, offline_flush_s=config.sim_offline_flush_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sim-engine")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._broken = f"engine loop died: {task.exception()!r}"
            log.error("%s", self._broken)
            for r in list(self._by_id.values()):
                r.out.put_nowait(RuntimeError(self._broken))

    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def vocab_size(self) -> int:
        return SIM_VOCAB

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def model_name(self) -> str:
        return f"sim:{self._model}"

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def block_size(self) -> int:
        return SIM_BLOCK_SIZE

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        return sim_tokenize(text)  # the simulated model has no chat template

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return sim_tokenize(" ".join(f"{m['role']}: {m['content']}" for m in messages))

    def load(self) -> EngineLoad:
        return EngineLoad(len(self._running), len(self._waiting) + len(self._waiting_off),
                          self._used_blocks / self._num_blocks,
                          steps=self.steps, step_ms=self.last_step_ms,
                          kv_capacity=self._num_blocks * SIM_BLOCK_SIZE)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if len(request.prompt_token_ids) + request.max_tokens > self._max_model_len:
            raise EngineError("max_tokens", f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens "
                              f"({request.max_tokens}) exceeds the model's context of {self._max_model_len}")
        if request.request_id in self._by_id:
            raise EngineError("request_id", f"{request.request_id!r} is already running here")
        if not request.prompt_token_ids:
            raise EngineError("prompt", "must not be empty")
        r = _Req(request, asyncio.Queue(), request.prompt_token_ids[-1])
        self._by_id[request.request_id] = r
        (self._waiting_off if request.offline else self._waiting).append(r)
        self._wake.set()
        if not request.offline:
            self._on_online_arrival()
        try:
            while True:
                item = await r.out.get()
                if isinstance(item, Exception):  # this request failed inside the engine (it alone)
                    raise EngineFailure(str(item))
                yield item
                if item.finished:
                    return
        finally:
            self._forget(r)

    async def abort(self, request_id: str, park: bool = False) -> bool:
        r = self._by_id.get(request_id)
        if r is None:
            return False
        r.aborted = True
        r.park = r.park or park
        self._wake.set()
        return True

    def _on_online_arrival(self) -> None:
        """An online request arrived. The step plans may cut the running step short (OOCO's fast preemption);
        the plain engine finishes every step."""

    async def _run_step(self, end: float, step_s: float) -> float:
        """Waits out the running step (it ends at ``end``, perf_counter); returns when it ended: ``end``, or
        earlier for a step cut short (then its work is not applied)."""
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return end

    def _forget(self, r: _Req) -> None:
        if self._by_id.get(r.req.request_id) is r:
            del self._by_id[r.req.request_id]
        self._release(r)
        for q in (self._waiting, self._waiting_off):
            try:
                q.remove(r)
            except ValueError:
                pass

    # -- the step loop: receive, schedule, execute, update ---------------------------------------------
    # Like vLLM's v1 scheduler with chunked prefill and priority: each step has a token budget
    # (``max_batched_tokens``); running decodes take one token each, then prefills in progress continue,
    # then waiting requests are admitted (online before offline, FIFO within a class) while sequences, KV
    # blocks and tokens last; the last prefill of a step may be a chunk. An aborted request (a preemption)
    # leaves at the next step boundary.
    def _has_work(self) -> bool:
        return bool(self._waiting or self._waiting_off or self._running)

    async def _loop(self) -> None:
        while True:
            if not self._has_work():
                self._step_end = -1.0  # idle: the next step starts when it starts (no overlap with a wait)
                self._wake.clear()
                await self._wake.wait()
            chunks: list[tuple[_Req, int]] = []
            try:
                chunks, decodes = self._schedule()
                if not chunks and not decodes:  # work held (KV full, or a step plan holds it): wait for news
                    self._step_end = -1.0
                    self._wake.clear()
                    try:  # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a stop()'s cancel)
                        async with asyncio.timeout(IDLE_POLL_S):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    continue
                if await self._execute(chunks, decodes):
                    self._update(chunks, decodes)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its batch, never the loop
                log.exception("engine step failed; failing the %d request(s) in it", len(self._running))
                for r in list(self._running):
                    self._fail(r, exc)
                self._running = []

    def _schedule(self) -> tuple[list[tuple[_Req, int]], list[_Req]]:
        for r in [r for r in self._running if r.aborted]:
            self._finish(r, "abort")
        decodes = [r for r in self._running if r.prefilled >= len(r.req.prompt_token_ids)]
        budget = self._token_budget - len(decodes)
        chunks: list[tuple[_Req, int]] = []
        for offline, q in ((False, self._waiting), (True, self._waiting_off)):  # online's tokens first
            for r in self._running:
                left = len(r.req.prompt_token_ids) - r.prefilled
                if left > 0 and budget > 0 and r.req.offline == offline:
                    c = min(left, budget)
                    chunks.append((r, c))
                    budget -= c
            while budget > 0 and q and len(self._running) < self._max_batch:
                r = q[0]
                if r.aborted:
                    q.popleft()
                    self._finish(r, "abort")
                    continue
                need = -(-(len(r.req.prompt_token_ids) + r.req.max_tokens) // SIM_BLOCK_SIZE)
                if self._used_blocks + need > self._num_blocks:
                    break  # KV full: wait for running requests to finish
                q.popleft()
                r.blocks = need
                self._used_blocks += need
                r.cached = self._load_kv(r)
                r.prefilled = r.cached
                self._running.append(r)
                c = min(len(r.req.prompt_token_ids) - r.prefilled, budget)
                chunks.append((r, c))
                budget -= c
        return chunks, decodes

    async def _execute(self, chunks: list[tuple[_Req, int]], decodes: list[_Req]) -> bool:
        """Runs one step in simulated time; False if it was cut short (its work is then not applied)."""
        completed = True
        if chunks or decodes:
            step_s = self.timer.chunked_step_s([(c, r.prefilled + c) for r, c in chunks],
                                               [len(r.req.prompt_token_ids) + r.generated for r in decodes])
            now = time.perf_counter()
            prev = self._step_end  # the last step's end while the loop stayed busy (-1: it waited for work)
            start = prev if 0.0 <= now - prev <= min(OVERLAP_S, step_s) else now  # busy: the period counts
            end = start + step_s
            ended = await self._run_step(end, step_s)
            if ended < end:  # cut short: what ran until then is the step's (modeled) time
                completed = False
                step_s, end = max(0.0, ended - start), ended
            done = time.perf_counter()
            self._step_end = end if done - end <= OVERLAP_S else done  # a late wake-up is not made up later
            # the period as a decode sees it: from the last step's end while busy (the loop's own work counts)
            self._note_overrun(step_s, done - (prev if prev >= 0.0 else start), len(decodes),
                               sum(c for _, c in chunks))
            self.steps += 1
            self.last_step_ms = step_s * 1e3
            if self.step_observer is not None:
                self.step_observer(step_s)
        return completed

    def _note_overrun(self, modeled_s: float, wall_s: float, decodes: int, prefill: int) -> None:
        """Sums modeled and wall seconds of the steps; every ``OVERRUN_REPORT_S`` it logs how far the wall
        clock ran over the model (a loaded host: the simulated GPU is then slower than the one it imitates)."""
        self._modeled_s += modeled_s
        self._wall_s += wall_s
        self._mix[0] += 1
        self._mix[1] += decodes
        self._mix[2] += prefill
        now = time.monotonic()
        if now - self._reported >= OVERRUN_REPORT_S and self._modeled_s > 0:
            over = self._wall_s / self._modeled_s - 1
            n, dec, pre = self._mix
            (log.warning if over > 0.1 else log.info)(
                "sim engine: %d steps (%.1f decodes and %.0f prefill tokens each), modeled %.1f s, took %.1f s "
                "(%+.0f%%)%s", n, dec / n, pre / n, self._modeled_s, self._wall_s, over * 100,
                " — the host is too loaded to keep the simulated timing" if over > 0.1 else "")
            self._modeled_s = self._wall_s = 0.0
            self._mix = [0, 0, 0]
            self._reported = now

    def _update(self, chunks: list[tuple[_Req, int]], decodes: list[_Req]) -> None:
        emit = list(decodes)
        for r, c in chunks:
            r.prefilled += c
            if r.prefilled >= len(r.req.prompt_token_ids):
                emit.append(r)  # its prefill completed in this step: the first token
        self._emit_tokens(emit)

    def _emit_tokens(self, emit: list[_Req]) -> None:
        """A token for each request of the step (that still has a caller), and the running list without the
        requests that ended."""
        for r in emit:
            if self._by_id.get(r.req.request_id) is not r:
                r.done = True  # the caller went away
                self._release(r)
            elif not r.done:
                self._emit_token(r)
        self._running = [r for r in self._running if not r.done and self._by_id.get(r.req.request_id) is r]

    def _emit_token(self, r: _Req) -> None:
        try:
            self._emit_token_or_raise(r)
        except Exception as exc:  # noqa: BLE001 - e.g. its KV could not be saved: this request fails alone
            log.warning("request %s failed in the engine: %r", r.req.request_id, exc)
            self._fail(r, exc)

    def _emit_token_or_raise(self, r: _Req) -> None:
        req = r.req
        tok = sim_token(r.last, len(req.prompt_token_ids) + r.generated, req.sampling.seed)
        r.last = tok
        r.generated += 1
        r.ids.append(tok)
        text = f" sim{tok}"
        r.text += text
        reason = ""
        if r.generated >= req.max_tokens:
            reason = "length"
        elif req.sampling.stop and any(s in r.text for s in req.sampling.stop):
            reason = "stop"
        kv = self._save_kv(r) if req.kv_save and r.generated == 1 else None
        now = time.perf_counter()
        if req.offline and not reason and kv is None and not r.first_output and \
                now - r.flushed < self._offline_flush_s:
            r.held.append(tok)  # put out with a later token: no per-token wake-up of the caller's stream
            r.held_text.append(text)
            return
        ids = [tok]
        if r.held:
            ids, text = r.held + ids, "".join(r.held_text) + text
            r.held, r.held_text = [], []
        out = EngineOutput(ids, text, finished=bool(reason), finish_reason=reason,
                           num_cached_tokens=r.cached if r.first_output else 0, kv=kv)
        r.first_output = False
        r.flushed = now
        r.out.put_nowait(out)
        if out.finished:
            r.done = True
            self._release(r)

    def _fail(self, r: _Req, exc: Exception) -> None:
        r.done = True
        r.out.put_nowait(exc)
        self._release(r)

    def _finish(self, r: _Req, reason: str) -> None:
        """Ends a request that did not end by itself ("abort", or "preempted" by a step plan); its KV is
        parked first where asked (``park`` on the abort, ``park_evicted`` for a step plan's eviction)."""
        r.done = True
        kv = None
        if r.park or (reason == "preempted" and self.park_evicted):
            try:
                kv = self._park(r)
            except (SegmentError, OSError) as exc:  # the resume recomputes
                log.warning("request %s: KV not parked (%s)", r.req.request_id, exc)
        # (a request stopped before its first token still reports the KV it was given: cached tokens)
        held, text = r.held, "".join(r.held_text)  # offline tokens not put out yet go with the end
        r.held, r.held_text = [], []
        r.out.put_nowait(EngineOutput(held, text, finished=True, finish_reason=reason, kv=kv,
                                      num_cached_tokens=r.cached if r.first_output else 0))
        self._release(r)

    def _release(self, r: _Req) -> None:
        if r in self._running:
            self._running.remove(r)
        self._used_blocks -= r.blocks
        r.blocks = 0

    # -- KV segments -------------------------------------------------------------------------------
    def _save_kv(self, r: _Req) -> KvExport:
        prompt = r.req.prompt_token_ids
        n = len(prompt) // SIM_BLOCK_SIZE
        if n == 0:
            return KvExport(r.req.kv_save, str(segment_path(r.req.kv_save, self._kv_dir)), 0, 0, 0)
        return self._write_segment(r.req.kv_save, prompt, n)

    def _park(self, r: _Req) -> KvExport | None:
        """Saves every full block of the KV ``r`` has computed (its prompt as far as prefilled, then each
        generated token but the last, whose KV the next step would have computed) into the segment
        ``parked_transfer_id``; None if not one block is full."""
        prompt = r.req.prompt_token_ids
        computed = len(prompt) + r.generated - 1 if r.generated else max(0, r.prefilled)
        n = computed // SIM_BLOCK_SIZE
        if n == 0:
            return None
        return self._write_segment(parked_transfer_id(r.req.request_id), prompt + tuple(r.ids), n, checksum=True)

    def _write_segment(self, transfer_id: str, ids: tuple[int, ...], n: int, checksum: bool = False) -> KvExport:
        path = segment_path(transfer_id, self._kv_dir)
        meta = SegmentMeta(transfer_id=transfer_id, num_layers=1, num_blocks=n, block_bytes=SIM_BLOCK_BYTES,
                           dtype="uint8", block_shape=(SIM_BLOCK_BYTES,), block_size=SIM_BLOCK_SIZE,
                           num_tokens=n * SIM_BLOCK_SIZE, layer_names=("sim",))
        with KvSegment.create(path, meta) as seg:
            seg.write_layer(0, sim_kv_blocks(ids, n).reshape(-1))
            seg.seal_with_checksum() if checksum else seg.seal()
        return KvExport(transfer_id, str(path), n * SIM_BLOCK_SIZE, n, meta.data_bytes)

    def _load_kv(self, r: _Req) -> int:
        load = r.req.kv_load
        if load is None or load.num_tokens <= 0:
            return 0
        want = min(load.num_tokens, (len(r.req.prompt_token_ids) - 1) // SIM_BLOCK_SIZE * SIM_BLOCK_SIZE)
        try:
            with KvSegment.open(pathlib.Path(load.path), populate=True) as seg:
                n = want // SIM_BLOCK_SIZE
                view = seg.layer_view(0)
                got = np.frombuffer(view, dtype=np.uint8, count=n * SIM_BLOCK_BYTES).reshape(n, SIM_BLOCK_BYTES)
                bad = np.flatnonzero((got != sim_kv_blocks(r.req.prompt_token_ids, n)).any(axis=1))
                del got, view
                if bad.size:
                    log.warning("request %s: KV block %d differs; recomputing", r.req.request_id, int(bad[0]))
                    return 0
                if not seg.unchanged():
                    raise SegmentError("rewritten while it was read (its transfer ended)")
        except (SegmentError, OSError) as exc:
            log.warning("request %s: KV segment unusable (%s); recomputing", r.req.request_id, exc)
            return 0
        return want
