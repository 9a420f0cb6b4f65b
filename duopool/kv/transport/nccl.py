"""NCCL transport: device-to-device KV blocks between two GPU workers' connectors (GPU hosts only).

Same push protocol and pair model as gloo (:mod:`duopool.kv.transport._torchdist`); only the process
group (``ProcessGroupNCCL``) and the block source/sink differ: :class:`DeviceBlocks` reads and writes the
paged KV cache tensors of vLLM directly (gathering a piece's scattered blocks into one contiguous device
buffer on send, scattering on receive), so no byte crosses host memory. Everything up to the NCCL call is
exercised on CPU by the unit tests through the gloo twin (``DeviceBlocks`` works on any torch device).

What a GPU host needs: the ``vllm`` (CUDA) build's torch with NCCL; each connector creates its pair group
once at start-up (``NcclTransport.connect``; rendezvous through a store both reach, e.g. a TCPStore on the
prefill host, bound to the data-plane NIC, with ``NCCL_SOCKET_IFNAME``/``NCCL_IB_HCA`` set for the fabric);
one push per direction at a time (NCCL matches point-to-point operations in issue order, without tags); a
CUDA stream per pair so transfers overlap the model's compute stream; ``register_kv_caches`` hands the
caches to :class:`DeviceBlocks`.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Sequence

from duopool.kv.segment import SegmentMeta
from duopool.kv.transport import (
    KvTransport,
    TransferError,
    TransferResult,
    TransportUnavailable,
    default_dir,
    register_transport,
)

try:  # import-guarded: CPU-only hosts have torch without CUDA; some have no torch at all
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]


def unavailable_reason() -> str:
    if torch is None:
        return "torch is not installed"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        return "this torch build has no NCCL (CPU build); install the CUDA build of vllm/torch"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ""


class DeviceBlocks:
    """Paged KV cache blocks of one request as a block source/sink for the push protocol.

    ``kv_caches[l]`` is layer l's paged cache; ``block_ids[b]`` the request's b-th block in it; the block
    axis is ``block_dim`` (1 for vLLM's (2, num_blocks, block_size, heads, dim) layout, 0 for
    (num_blocks, ...)). A unit's wire bytes are that block's slice, made contiguous (K then V).
    """

    def __init__(self, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], transfer_id: str, *,
                 block_dim: int = 1, block_size: int = 16, piece_bytes: int = 4 << 20) -> None:
        if not kv_caches:
            raise ValueError("no KV caches")
        self.caches = list(kv_caches)
        self.block_ids = list(block_ids)
        self.block_dim = block_dim
        unit = self._unit(0, 0)
        self.unit_shape = tuple(unit.shape)
        self.dtype = unit.dtype
        block_bytes = unit.numel() * unit.element_size()
        self.meta = SegmentMeta(transfer_id=transfer_id, num_layers=len(self.caches), num_blocks=len(self.block_ids),
                                block_bytes=block_bytes, dtype=str(unit.dtype).removeprefix("torch."),
                                block_shape=self.unit_shape, block_size=block_size,
                                num_tokens=len(self.block_ids) * block_size)
        self._piece_units = max(1, piece_bytes // block_bytes)
        self._received = bytearray(self.meta.num_layers * self.meta.num_blocks)
        self._staging: dict[int, torch.Tensor] = {}

    def _unit(self, layer: int, block: int) -> torch.Tensor:
        return self.caches[layer].select(self.block_dim, self.block_ids[block])

    def _units(self, start: int, count: int):
        nb = self.meta.num_blocks
        for u in range(start, start + count):
            yield u - start, divmod(u, nb)

    def max_piece_units(self) -> int:
        return self._piece_units

    # source
    def units_tensor(self, start: int, count: int) -> torch.Tensor:
        parts = [self._unit(layer, b).contiguous().view(torch.uint8).reshape(-1)
                 for _, (layer, b) in self._units(start, count)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # sink
    def missing_runs(self) -> list[tuple[int, int]]:
        from duopool.kv.transport import runs_of

        return runs_of([u for u, got in enumerate(self._received) if not got])

    def stage(self, start: int, count: int) -> torch.Tensor:
        buf = torch.empty(count * self.meta.block_bytes, dtype=torch.uint8, device=self.caches[0].device)
        self._staging[start] = buf
        return buf

    def commit(self, start: int, count: int) -> None:
        buf = self._staging.pop(start)
        bb = self.meta.block_bytes
        for i, (layer, b) in self._units(start, count):
            self._unit(layer, b).copy_(buf[i * bb : (i + 1) * bb].view(self.dtype).view(self.unit_shape))
        self._received[start : start + count] = b"\x01" * count

    def finish(self) -> bool:
        return all(self._received)


class _DeviceSink:
    """Adapter: the receiving side allocates a staging buffer per piece before posting the receive."""

    def __init__(self, blocks: DeviceBlocks) -> None:
        self.blocks = blocks
        self.meta = blocks.meta

    def max_piece_units(self) -> int:
        return self.blocks.max_piece_units()

    def missing_runs(self) -> list[tuple[int, int]]:
        return self.blocks.missing_runs()

    def units_tensor(self, start: int, count: int) -> torch.Tensor:
        return self.blocks.stage(start, count)

    def commit(self, start: int, count: int) -> None:
        self.blocks.commit(start, count)

    def finish(self) -> bool:
        return self.blocks.finish()


def receive_blocks(channel: object, blocks_for) -> TransferResult:
    """Accepts the next push into device blocks: ``blocks_for(meta) -> DeviceBlocks`` (the connector
    looks up the request's allocated blocks by ``meta.transfer_id`` and checks the layout)."""

    def open_sink(meta: SegmentMeta) -> _DeviceSink:
        blocks = blocks_for(meta)
        if (blocks.meta.num_layers, blocks.meta.num_blocks, blocks.meta.block_bytes) != (
                meta.num_layers, meta.num_blocks, meta.block_bytes):
            raise TransferError(f"{meta.transfer_id}: layout mismatch {blocks.meta} vs {meta}")
        return _DeviceSink(blocks)

    return channel.accept(open_sink)  # type: ignore[attr-defined]


@register_transport
class NcclTransport(KvTransport):
    """Device blocks over a 2-rank NCCL pair group. ``send_blocks``/``receive_blocks`` are the connector
    calls; ``send``/``receive`` of segment files are not offered (use gloo for host segments)."""

    name = "nccl"
    push = True

    def __init__(self, channel: object, kv_dir: pathlib.Path | str | None = None) -> None:
        self.channel = channel
        self.kv_dir = default_dir(kv_dir)

    @classmethod
    def is_available(cls) -> bool:
        return not unavailable_reason()

    unavailable_reason = staticmethod(unavailable_reason)

    @classmethod
    def connect(cls, rank: int, store: object, *, device: int | str = 0, timeout_s: float = 300.0) -> NcclTransport:
        reason = unavailable_reason()
        if reason:
            raise TransportUnavailable(f"nccl: {reason}")
        import torch.distributed as dist

        from duopool.kv.transport._torchdist import PairChannel

        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        torch.cuda.set_device(dev)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=timeout_s)
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)  # pragma: no cover - needs GPUs
        pg.barrier().wait()  # pragma: no cover
        return cls(PairChannel(pg, rank, str(dev), timeout_s=timeout_s))  # pragma: no cover

    def send_blocks(self, blocks: DeviceBlocks) -> TransferResult:
        return self.channel.push(blocks)  # type: ignore[attr-defined]

    def receive_blocks(self, blocks_for) -> TransferResult:
        return receive_blocks(self.channel, blocks_for)

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        raise TransferError("nccl moves device blocks (send_blocks); host segments go over gloo/shm/grpc")

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        raise TransferError("nccl moves device blocks (receive_blocks); host segments go over gloo/shm/grpc")

    def close(self) -> None:
        ch = self.channel
        if ch is None:
            return
        self.channel = None
        try:
            ch.pg.shutdown()  # type: ignore[attr-defined]
        except Exception:
            pass
