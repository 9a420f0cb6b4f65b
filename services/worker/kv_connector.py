"""duopool's vLLM KV connector: moves a prompt's KV blocks between engines through KV segments.

Loaded by vLLM by module path (``KVTransferConfig(kv_connector="DuopoolConnector",
kv_connector_module_path="duopool.worker.kv_connector", kv_role="kv_both")``) in both the engine's
scheduler process and its model-runner process. The two halves exchange only ``DuopoolConnectorMeta``.

A request opts in through ``SamplingParams.extra_args["kv_transfer_params"]["duopool"]``:

* ``{"op": "save", "transfer_id": T}`` — prefill side. When the prompt's last chunk has run, every *full*
  block of the prompt is copied, layer by layer as the forward pass reaches it, into the segment
  ``<kv_dir>/T.kv`` (see ``duopool.kv.segment``), which is sealed at the end of the step. The request's
  output then carries ``kv_transfer_params["duopool"] = {"transfer_id", "num_tokens", "num_blocks",
  "num_bytes", "path"}`` (num_tokens = 0 when the prompt is shorter than one block: nothing to move).
* ``{"op": "load", "path": P, "num_tokens": N}`` — decode side. The scheduler half reports N tokens as an
  external hit (minus what the local prefix cache already holds), vLLM allocates blocks for them, and the
  worker half copies the segment's blocks into those blocks before the forward pass; only the tail beyond
  the transferred blocks is computed. A segment that is missing, unsealed or of another shape is reported
  as a miss (0 tokens) and the prompt is recomputed: the ``recompute`` failure policy. The service layer
  implements ``fail`` by not submitting a request whose KV it could not obtain.

* ``kv_transfer_params["duopool_park"] = T`` — an offline request whose KV is kept if it is preempted. When
  it is aborted while the park marker ``<kv_dir>/T.park`` exists (the worker made it: a preemption, not a
  cancel), ``request_finished`` keeps its blocks (vLLM's delayed free) and the next step's worker half
  copies every full block of its computed context — prompt and generated tokens — into ``<kv_dir>/T.kv``
  on a background thread (the engine's steps go on meanwhile), sealed with a CRC-32; once the copy is done
  the request is reported finished sending, which frees the blocks. vLLM keeps stepping (with or without
  a forward pass) while a finished request awaits its connector.

Saves and loads are synchronous inside the step (CPU engines copy with memcpy bandwidth), so blocks are
never held past ``request_finished`` except by a park, until its copy is done.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from duopool.kv.segment import KvSegment, SegmentError, SegmentMeta, segment_path, unlink_segment
from duopool.worker.engines.base import PARK_KEY, park_marker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("duopool.kv_connector")
EXPORT_LOG_S = 10.0  # how often the export rate inside the forward pass is logged (when there were exports)


def _export_counters() -> dict[str, float]:
    return {"s": 0.0, "create_s": 0.0, "seal_s": 0.0, "gather_s": 0.0, "write_s": 0.0, "calls": 0, "bytes": 0,
            "segments": 0,
            "since": time.monotonic()}

PARAMS_KEY = "duopool"


@dataclass
class SaveOp:
    req_id: str
    transfer_id: str
    path: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class LoadOp:
    req_id: str
    path: str
    dst_block_ids: list[int]  # where the segment's blocks [first_block, first_block + n) go
    first_block: int  # skip blocks the local prefix cache already had


@dataclass
class DuopoolConnectorMeta(KVConnectorMetadata):
    saves: list[SaveOp] = field(default_factory=list)
    loads: list[LoadOp] = field(default_factory=list)
    parks: list[SaveOp] = field(default_factory=list)  # aborted requests' computed context, blocks held


def _params(request: Request) -> dict[str, Any] | None:
    params = getattr(request, "kv_transfer_params", None) or {}
    op = params.get(PARAMS_KEY)
    return op if isinstance(op, dict) else None


class DuopoolConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if not logging.getLogger().handlers and not log.handlers:  # an engine process that set up no logging
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s engine %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self._block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._kv_dir = pathlib.Path(extra.get("kv_dir") or os.environ.get("DUOPOOL_KV_DIR", "/dev/shm/duopool-kv"))
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self._layer_names: tuple[str, ...] = tuple(n for g in groups for n in g.layer_names)
        # scheduler side
        self._save_reqs: dict[str, dict[str, Any]] = {}  # req_id -> params, until its prompt has run
        self._req_blocks: dict[str, list[int]] = {}  # req_id -> block ids allocated so far (save side)
        self._saved: dict[str, dict[str, Any]] = {}  # req_id -> result params for request_finished
        self._pending_loads: dict[str, tuple[str, int, int]] = {}  # req_id -> (path, local, total tokens)
        self._pending_parks: list[SaveOp] = []  # for the next step's worker half
        # worker side
        self._open_saves: dict[str, KvSegment] = {}
        self._load_errors: set[int] = set()  # blocks of this step's loads whose segment was gone
        # time the forward pass spent exporting KV (gather + write + seal), summed and logged every EXPORT_LOG_S
        self._export = _export_counters()
        self._parks: dict[str, concurrent.futures.Future] = {}  # req_id -> its copy (a background thread)
        self._park_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._staging = threading.local()  # per thread (the step's and the park copier's): a reused gather buffer

    # ================================ scheduler side ================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = _params(request)
        if not params or params.get("op") != "load":
            return 0, False
        if request.num_preemptions > 0:
            # resumed after vLLM preempted it: a resumed request's loads are not built (only new requests'
            # are), and its segment may be gone; its context is recomputed (from the prefix cache where held)
            return 0, False
        num_tokens = int(params.get("num_tokens", 0))
        path = params.get("path", "")
        num_tokens -= num_tokens % self._block_size
        # Leave at least one token to compute (vLLM needs a forward pass to sample from).
        num_tokens = min(num_tokens, (request.num_tokens - 1) // self._block_size * self._block_size)
        if num_tokens <= num_computed_tokens:
            return 0, False
        try:
            with KvSegment.open(pathlib.Path(path)) as seg:
                ok = self._segment_matches(seg.meta, num_tokens)
        except (SegmentError, OSError, ValueError) as exc:
            log.warning("request %s: KV segment unusable (%s); recomputing the prompt", request.request_id, exc)
            return 0, False
        if not ok:
            return 0, False
        self._pending_loads[request.request_id] = (path, num_computed_tokens, num_tokens)
        return num_tokens - num_computed_tokens, False

    def _segment_matches(self, meta: SegmentMeta, num_tokens: int) -> bool:
        if meta.block_size != self._block_size or meta.num_tokens < num_tokens:
            log.warning("KV segment %s has block size %d / %d tokens; need %d / %d",
                        meta.transfer_id, meta.block_size, meta.num_tokens, self._block_size, num_tokens)
            return False
        if tuple(meta.layer_names) != self._layer_names:
            log.warning("KV segment %s is for other layers (%d vs %d)", meta.transfer_id,
                        len(meta.layer_names), len(self._layer_names))
            return False
        return True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending_loads.pop(request.request_id, None)

    def on_new_request(self, request: Request) -> None:
        params = _params(request)
        if params and params.get("op") == "save":
            self._save_reqs[request.request_id] = params

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DuopoolConnectorMeta()
        sched_tokens = scheduler_output.num_scheduled_tokens
        for new_req in scheduler_output.scheduled_new_reqs:
            rid = new_req.req_id
            block_ids = list(new_req.block_ids[0])
            if rid in self._pending_loads:
                path, local, total = self._pending_loads.pop(rid)
                first, last = local // self._block_size, total // self._block_size
                meta.loads.append(LoadOp(rid, path, block_ids[first:last], first))
            if rid in self._save_reqs:
                self._req_blocks[rid] = block_ids
                self._maybe_save(meta, rid, new_req.num_computed_tokens + sched_tokens.get(rid, 0),
                                 len(new_req.prompt_token_ids or []))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid not in self._save_reqs:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if rid in cached.resumed_req_ids:
                    self._req_blocks[rid] = list(new_blocks[0])
                else:
                    self._req_blocks.setdefault(rid, []).extend(new_blocks[0])
            done = cached.num_computed_tokens[i] + sched_tokens.get(rid, 0)
            self._maybe_save(meta, rid, done, int(self._save_reqs[rid]["prompt_len"]))
        meta.parks, self._pending_parks = self._pending_parks, []
        return meta

    def _maybe_save(self, meta: DuopoolConnectorMeta, rid: str, done_tokens: int, prompt_len: int) -> None:
        params = self._save_reqs[rid]
        params.setdefault("prompt_len", prompt_len)
        if done_tokens < prompt_len:
            return  # prompt still being prefilled in chunks
        num_blocks = prompt_len // self._block_size
        transfer_id = str(params["transfer_id"])
        path = str(segment_path(transfer_id, self._kv_dir))
        result = {"transfer_id": transfer_id, "num_tokens": num_blocks * self._block_size,
                  "num_blocks": num_blocks, "path": path, "num_bytes": 0}
        if num_blocks > 0:
            meta.saves.append(SaveOp(rid, transfer_id, path, self._req_blocks[rid][:num_blocks],
                                     num_blocks * self._block_size))
        self._saved[rid] = result
        del self._save_reqs[rid]
        self._req_blocks.pop(rid, None)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._save_reqs.pop(rid, None)
        self._req_blocks.pop(rid, None)
        self._pending_loads.pop(rid, None)
        park = self._park_op(request, block_ids)
        if park is not None:
            self._pending_parks.append(park)
        result = self._saved.pop(rid, None)
        if result is None:
            return park is not None, None
        if result["num_blocks"]:
            try:
                with KvSegment.open(pathlib.Path(result["path"])) as seg:
                    result["num_bytes"] = seg.meta.data_bytes
            except SegmentError as exc:  # the worker half failed to write it: report nothing to move
                log.error("request %s: KV segment not written (%s)", rid, exc)
                result.update(num_tokens=0, num_blocks=0)
        return park is not None, {PARAMS_KEY: result}

    def _park_op(self, request: Request, block_ids: list[int]) -> SaveOp | None:
        """The park of an aborted request whose worker asked for one (its marker exists): every full block
        of the context it computed, or None."""
        from vllm.v1.request import RequestStatus

        tid = (getattr(request, "kv_transfer_params", None) or {}).get(PARK_KEY)
        if not tid or request.status != RequestStatus.FINISHED_ABORTED:
            return None
        try:
            park_marker(str(tid), self._kv_dir).unlink()
        except FileNotFoundError:
            return None  # aborted for another reason (a cancel): nothing kept
        computed = request.num_computed_tokens - int(getattr(request, "num_in_flight_tokens", 0) or 0)
        n = min(len(block_ids), max(0, computed) // self._block_size)
        if n == 0:
            return None
        return SaveOp(request.request_id, str(tid), str(segment_path(str(tid), self._kv_dir)), list(block_ids[:n]),
                      n * self._block_size)

    # ================================ worker side ================================

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DuopoolConnectorMeta)
        layers = forward_context.no_compile_layers
        for op in meta.parks:  # (called on steps without a forward pass too)
            if self._park_pool is None:
                self._park_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="duopool-park")
            # The copy runs beside the engine's next steps (torch releases the GIL): the online work that
            # caused the preemption is not held up by it. The blocks stay allocated until get_finished.
            tensors = {name: self._layer_cache(layers, name) for name in self._layer_names}
            self._parks[op.req_id] = self._park_pool.submit(self._write_park, op, tensors)
        if not meta.loads:
            return
        for op in meta.loads:
            try:
                self._load(op, layers)
            except (SegmentError, OSError, ValueError, RuntimeError) as exc:
                # the segment went (or does not fit) between the scheduler's check and this step (its transfer was released:
                # the request was preempted or cancelled meanwhile, or its lease ended): vLLM recomputes
                # these blocks (kv_load_failure_policy "recompute"); the engine and the step's other
                # requests go on
                log.warning("request %s: KV segment gone before it was loaded (%s); recomputing", op.req_id, exc)
                self._load_errors.update(op.dst_block_ids)

    def _load(self, op: LoadOp, layers: dict[str, Any]) -> None:
        with KvSegment.open(pathlib.Path(op.path), populate=True) as seg:
            n = len(op.dst_block_ids)
            dst_idx = torch.tensor(op.dst_block_ids, dtype=torch.long)
            for li, name in enumerate(seg.meta.layer_names):
                kv = layers[name].kv_cache
                if isinstance(kv, list):
                    kv = kv[0]
                src = self._segment_blocks(seg, li, kv.dtype)[op.first_block : op.first_block + n]
                kv.index_copy_(0, dst_idx, src.to(kv.device))
            del src
            if not seg.unchanged():  # retired and reused while copied (its lease ended): the blocks are torn
                raise SegmentError(f"{op.path} was rewritten while it was loaded")

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    @staticmethod
    def _layer_cache(layers: dict[str, Any], name: str) -> torch.Tensor:
        kv = layers[name].kv_cache
        return kv[0] if isinstance(kv, list) else kv

    def _write_park(self, op: SaveOp, tensors: dict[str, torch.Tensor]) -> None:
        """Copies a parked request's blocks out of every layer's cache into its segment, sealed with a
        checksum. A failure leaves no segment (the resume recomputes); the blocks are freed either way."""
        seg = None
        try:
            idx = torch.tensor(op.block_ids, dtype=torch.long)
            for li, name in enumerate(self._layer_names):
                kv = tensors[name]
                if seg is None:
                    seg = self._create_segment(op, kv)
                self._save_layer(seg, li, kv, idx)
            if seg is not None:
                seg.seal_with_checksum()
        except Exception as exc:  # noqa: BLE001 - a park is an optimisation: never fail the step for it
            log.error("request %s: KV not parked (%s)", op.req_id, exc)
            if seg is not None:
                seg.close()
                seg = None
            unlink_segment(pathlib.Path(op.path))
        finally:
            if seg is not None:
                seg.close()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Parks whose copy is done: vLLM frees their blocks (it keeps stepping until then)."""
        done = {rid for rid, f in self._parks.items() if f.done()}
        for rid in done:
            del self._parks[rid]
        return (done or None), None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    @staticmethod
    def _segment_blocks(seg: KvSegment, layer: int, dtype: torch.dtype) -> torch.Tensor:
        m = seg.meta
        raw = torch.frombuffer(seg.layer_view(layer), dtype=torch.uint8)
        return raw.view(dtype).view(m.num_blocks, *m.block_shape)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DuopoolConnectorMeta)
        if not meta.saves:
            return
        layer = self._layer_names.index(layer_name)
        t0 = time.perf_counter()
        for op in meta.saves:
            seg = self._open_saves.get(op.req_id)
            if seg is None:
                seg = self._create_segment(op, kv_layer)
                self._open_saves[op.req_id] = seg
                self._export["create_s"] += time.perf_counter() - t0
            self._save_layer(seg, layer, kv_layer, torch.tensor(op.block_ids, dtype=torch.long))
        self._export["s"] += time.perf_counter() - t0
        self._export["calls"] += 1

    def _save_layer(self, seg: KvSegment, layer: int, kv_layer: torch.Tensor, idx: torch.Tensor) -> None:
        """One layer's blocks into the segment: gathered into a reused staging buffer of this thread (hot in
        cache), then written with pwrite, which on a fresh tmpfs file skips the page faults and zero-fill
        of gathering straight into the mapping."""
        m = seg.meta
        nbytes = m.num_blocks * m.block_bytes
        stage = getattr(self._staging, "buf", None)
        if stage is None or stage.numel() < nbytes:
            stage = self._staging.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        out = stage[:nbytes]
        t0 = time.perf_counter()
        torch.index_select(kv_layer, 0, idx, out=out.view(kv_layer.dtype).view(m.num_blocks, *m.block_shape))
        t1 = time.perf_counter()
        seg.write_layer(layer, out.numpy())
        self._export["gather_s"] += t1 - t0
        self._export["write_s"] += time.perf_counter() - t1

    def _create_segment(self, op: SaveOp, kv_layer: torch.Tensor) -> KvSegment:
        block_shape = tuple(kv_layer.shape[1:])
        block_bytes = kv_layer[0].numel() * kv_layer.element_size()
        meta = SegmentMeta(
            transfer_id=op.transfer_id, num_layers=len(self._layer_names), num_blocks=len(op.block_ids),
            block_bytes=block_bytes, dtype=str(kv_layer.dtype).removeprefix("torch."), block_shape=block_shape,
            block_size=self._block_size, num_tokens=op.num_tokens, layer_names=self._layer_names,
        )
        return KvSegment.create(pathlib.Path(op.path), meta)

    def wait_for_save(self):
        t0 = time.perf_counter()
        ex = self._export
        for seg in self._open_saves.values():
            seg.seal()
            seg.close()
            ex["bytes"] += seg.meta.data_bytes
            ex["segments"] += 1
        self._open_saves.clear()
        ex["s"] += time.perf_counter() - t0
        ex["seal_s"] += time.perf_counter() - t0
        if ex["segments"] and time.monotonic() - ex["since"] >= EXPORT_LOG_S:
            log.info("KV export inside the forward pass: %d segment(s), %.1f MiB in %.1f ms (%.2f GB/s; creating "
                     "%.1f ms, gathering %.1f ms, writing %.1f ms, sealing %.1f ms, %d layer calls) over the last "
                     "%.0f s", ex["segments"], ex["bytes"] / 2**20, ex["s"] * 1e3,
                     ex["bytes"] / ex["s"] / 1e9 if ex["s"] > 0 else 0.0, ex["create_s"] * 1e3, ex["gather_s"] * 1e3,
                     ex["write_s"] * 1e3, ex["seal_s"] * 1e3, ex["calls"], time.monotonic() - ex["since"])
            self._export = _export_counters()
