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

Saves run off the forward pass: as each layer's attention has run, the layer's blocks are handed to one
background writer thread (``AsyncSaver``), which gathers and writes them while the next layers compute and
seals the segment after the last one. The prompt's first token does not wait for the copy. A finished
request whose segment is still being written keeps its blocks (vLLM's delayed free) until the writer is done
(reported finished sending). A decode that asks for a segment still being written waits for its seal
(``get_num_new_matched_tokens`` answers "not yet", up to ``SEAL_WAIT_S``). Loads are synchronous inside the
step (CPU engines copy with memcpy bandwidth).
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
EXPORT_LOG_S = 10.0  # how often the export rates are logged (when there were exports)
SEAL_WAIT_S = 5.0  # how long a decode waits for a segment its prefill is still writing before it recomputes


def _export_counters() -> dict[str, float]:
    return {"forward_s": 0.0, "create_s": 0.0, "writer_s": 0.0, "seal_s": 0.0, "gather_s": 0.0, "write_s": 0.0,
            "calls": 0, "bytes": 0, "segments": 0, "since": time.monotonic()}

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
    save_frees: list[str] = field(default_factory=list)  # finished requests whose blocks wait for their save


class AsyncSaver:
    """Writes prompts' KV blocks into their segments on one background thread, off the forward pass.

    ``layer`` is called from the forward pass as each layer's attention has run: it creates the request's
    segment on the first layer (header only, so its size is known at once) and queues the layer's copy
    (``_copy_layer``: gather the request's blocks into a reused staging buffer, ``pwrite`` them). ``end_step``
    queues the seals of the step's segments. The thread runs the queue in order; torch's gather and
    ``pwrite`` release the GIL, so the engine's next layers and steps go on meanwhile. The caller keeps the
    blocks allocated until ``done`` says the request's segment is sealed (or failed: then the segment is
    unlinked and the decode recomputes)."""

    def __init__(self, layer_names: tuple[str, ...], block_size: int) -> None:
        self._layer_names = layer_names
        self._block_size = block_size
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._open: dict[str, tuple[KvSegment, torch.Tensor]] = {}  # req_id -> (segment, block ids): this step
        self._sealing: dict[str, concurrent.futures.Future] = {}  # req_id -> its seal (done: sealed or failed)
        self._failed: set[int] = set()  # id() of segments a write failed for (writer thread only)
        self.stats = _export_counters()
        self._lock = threading.Lock()

    def layer(self, op: SaveOp, layer: int, kv_layer: torch.Tensor) -> None:
        t0 = time.perf_counter()
        entry = self._open.get(op.req_id)
        if entry is None:
            seg = _create_segment(op, kv_layer, self._layer_names, self._block_size)
            entry = self._open[op.req_id] = (seg, torch.tensor(op.block_ids, dtype=torch.long))
            with self._lock:
                self.stats["create_s"] += time.perf_counter() - t0
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="duopool-save")
        self._pool.submit(self._write, entry[0], layer, kv_layer, entry[1])
        with self._lock:
            self.stats["forward_s"] += time.perf_counter() - t0
            self.stats["calls"] += 1

    def end_step(self) -> None:
        if not self._open:
            return
        t0 = time.perf_counter()
        assert self._pool is not None
        for rid, (seg, _) in self._open.items():
            self._sealing[rid] = self._pool.submit(self._seal, seg)
        self._open.clear()
        with self._lock:
            self.stats["forward_s"] += time.perf_counter() - t0

    def done(self, req_id: str) -> bool:
        """True once the request's segment is sealed or given up (or it had none)."""
        f = self._sealing.get(req_id)
        if f is None:
            return req_id not in self._open
        if not f.done():
            return False
        del self._sealing[req_id]
        return True

    def pending(self) -> int:
        return len(self._sealing)

    def _write(self, seg: KvSegment, layer: int, kv_layer: torch.Tensor, idx: torch.Tensor) -> None:
        if id(seg) in self._failed:
            return
        try:
            gather_s, write_s = _copy_layer(seg, layer, kv_layer, idx)
        except Exception as exc:  # noqa: BLE001 - one request's export: never fail the engine for it
            log.error("KV segment %s: layer %d not written (%s); its decode recomputes", seg.path, layer, exc)
            self._failed.add(id(seg))
            return
        with self._lock:
            self.stats["gather_s"] += gather_s
            self.stats["write_s"] += write_s
            self.stats["writer_s"] += gather_s + write_s

    def _seal(self, seg: KvSegment) -> None:
        t0 = time.perf_counter()
        failed = id(seg) in self._failed
        self._failed.discard(id(seg))
        try:
            if not failed:
                seg.seal()
        except Exception as exc:  # noqa: BLE001
            log.error("KV segment %s not sealed (%s); its decode recomputes", seg.path, exc)
            failed = True
        finally:
            seg.close()
        if failed:
            unlink_segment(seg.path)
            return
        dt = time.perf_counter() - t0
        with self._lock:
            ex = self.stats
            ex["seal_s"] += dt
            ex["writer_s"] += dt
            ex["bytes"] += seg.meta.data_bytes
            ex["segments"] += 1
            if time.monotonic() - ex["since"] < EXPORT_LOG_S:
                return
            self.stats = _export_counters()
        log.info("KV export: %d segment(s), %.1f MiB over the last %.0f s; the forward pass spent %.1f ms on it "
                 "(creating %.1f ms, queueing %d layer copies); the writer thread wrote at %.2f GB/s off the "
                 "forward pass (gathering %.1f ms, writing %.1f ms, sealing %.1f ms)", ex["segments"],
                 ex["bytes"] / 2**20, time.monotonic() - ex["since"], ex["forward_s"] * 1e3, ex["create_s"] * 1e3,
                 ex["calls"], ex["bytes"] / ex["writer_s"] / 1e9 if ex["writer_s"] > 0 else 0.0,
                 ex["gather_s"] * 1e3, ex["write_s"] * 1e3, ex["seal_s"] * 1e3)


_STAGING = threading.local()  # per thread (the writer's, the park copier's): a reused gather buffer


def _copy_layer(seg: KvSegment, layer: int, kv_layer: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """One layer's blocks ``idx`` of ``kv_layer`` into the segment: gathered into this thread's reused staging
    buffer (hot in cache), then written with pwrite, which on a fresh tmpfs file skips the page faults and
    zero-fill of gathering straight into the mapping. Returns (gather, write) seconds."""
    m = seg.meta
    if tuple(kv_layer.shape[1:]) != tuple(m.block_shape) or str(kv_layer.dtype) != f"torch.{m.dtype}":
        raise SegmentError(f"layer cache {tuple(kv_layer.shape[1:])} {kv_layer.dtype} does not match the "
                           f"segment's blocks {tuple(m.block_shape)} {m.dtype}")
    nbytes = m.num_blocks * m.block_bytes
    stage = getattr(_STAGING, "buf", None)
    if stage is None or stage.numel() < nbytes:
        stage = _STAGING.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
    out = stage[:nbytes]
    t0 = time.perf_counter()
    torch.index_select(kv_layer, 0, idx, out=out.view(kv_layer.dtype).view(m.num_blocks, *m.block_shape))
    t1 = time.perf_counter()
    seg.write_layer(layer, out.numpy())
    return t1 - t0, time.perf_counter() - t1


def _create_segment(op: SaveOp, kv_layer: torch.Tensor, layer_names: tuple[str, ...], block_size: int) -> KvSegment:
    block_shape = tuple(kv_layer.shape[1:])
    block_bytes = kv_layer[0].numel() * kv_layer.element_size()
    meta = SegmentMeta(
        transfer_id=op.transfer_id, num_layers=len(layer_names), num_blocks=len(op.block_ids),
        block_bytes=block_bytes, dtype=str(kv_layer.dtype).removeprefix("torch."), block_shape=block_shape,
        block_size=block_size, num_tokens=op.num_tokens, layer_names=layer_names,
    )
    return KvSegment.create(pathlib.Path(op.path), meta)


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
        self._pending_save_frees: list[str] = []  # finished requests whose blocks wait for their save
        self._unsealed_since: dict[str, float] = {}  # decode side: req_id -> when its segment was first unsealed
        # worker side
        self._saver = AsyncSaver(self._layer_names, self._block_size)
        self._save_frees: set[str] = set()  # finished requests whose blocks are held until their save is done
        self._load_errors: set[int] = set()  # blocks of this step's loads whose segment was gone
        self._parks: dict[str, concurrent.futures.Future] = {}  # req_id -> its copy (a background thread)
        self._park_pool: concurrent.futures.ThreadPoolExecutor | None = None

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
        rid = request.request_id
        try:
            with KvSegment.open(pathlib.Path(path), require_sealed=False) as seg:
                meta = seg.meta
        except (SegmentError, OSError, ValueError) as exc:
            self._unsealed_since.pop(rid, None)
            log.warning("request %s: KV segment unusable (%s); recomputing the prompt", rid, exc)
            return 0, False
        if not meta.sealed:  # its prefill's writer is still at it (AsyncSaver): ask again next step
            now = time.monotonic()
            if now - self._unsealed_since.setdefault(rid, now) < SEAL_WAIT_S:
                return None, False
            log.warning("request %s: KV segment %s not sealed within %.0f s; recomputing the prompt", rid, path,
                        SEAL_WAIT_S)
            self._unsealed_since.pop(rid, None)
            return 0, False
        self._unsealed_since.pop(rid, None)
        if not self._segment_matches(meta, num_tokens):
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
        meta.save_frees, self._pending_save_frees = self._pending_save_frees, []
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
        self._unsealed_since.pop(rid, None)
        park = self._park_op(request, block_ids)
        if park is not None:
            self._pending_parks.append(park)
        result = self._saved.pop(rid, None)
        if result is None:
            return park is not None, None
        if not result["num_blocks"]:
            return park is not None, {PARAMS_KEY: result}
        # The worker half's writer may still be copying the blocks: they stay allocated until it reports the
        # request finished sending (told through the next step's metadata). The segment's header is written
        # already (its first layer created it), so its size is known; the decode waits for its seal.
        self._pending_save_frees.append(rid)
        try:
            with KvSegment.open(pathlib.Path(result["path"]), require_sealed=False) as seg:
                result["num_bytes"] = seg.meta.data_bytes
        except SegmentError as exc:  # the worker half failed to create it: report nothing to move
            log.error("request %s: KV segment not written (%s)", rid, exc)
            result.update(num_tokens=0, num_blocks=0)
        return True, {PARAMS_KEY: result}

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
        self._save_frees.update(meta.save_frees)
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
                    seg = _create_segment(op, kv, self._layer_names, self._block_size)
                _copy_layer(seg, li, kv, idx)
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
        """Parks whose copy is done and finished requests whose save is done: vLLM frees their blocks (it
        keeps stepping until then)."""
        done = {rid for rid, f in self._parks.items() if f.done()}
        for rid in done:
            del self._parks[rid]
        saved = {rid for rid in self._save_frees if self._saver.done(rid)}
        self._save_frees -= saved
        done |= saved
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
        for op in meta.saves:
            self._saver.layer(op, layer, kv_layer)

    def wait_for_save(self):
        """The step's segments are sealed by the writer thread once their last layer is written (the forward
        pass does not wait for the copies)."""
        self._saver.end_step()
