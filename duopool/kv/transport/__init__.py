"""KV transports: one interface, several ways of moving a segment's blocks between two endpoints.

A *transfer* moves one KV segment (one request's blocks, see :mod:`duopool.kv.segment`) identified by its
``transfer_id`` from a source endpoint to a destination endpoint. Every transport implements
:class:`KvTransport`:

* ``send(transfer_id)`` on the source side: the sealed segment ``<kv_dir>/<transfer_id>.kv`` is handed to
  the transport. Push transports (gloo, nccl, ucx) move the bytes now; pull transports (shm, grpc) only
  check the segment and the bytes move when the destination calls ``receive``.
* ``receive(transfer_id)`` on the destination side: makes the segment complete and sealed on this host
  (or, for shm, checks the shared file) and returns a :class:`TransferResult`.

Rules shared by all transports (the failure model of the kvtransfer service builds on them):

* **Per-unit resume.** A unit is one block of one layer. The destination segment carries a received map
  (``KvSegment.create(..., block_map=True)``); only missing units are moved, so an interrupted transfer
  resumes where it stopped.
* **Idempotent.** Receiving a transfer whose destination segment is already complete moves nothing;
  re-sent units are written to the same place.
* **Defined end state.** ``send``/``receive`` return a ``TransferResult`` (``completed``) or raise
  :class:`TransferError`; a partial destination segment is left unsealed (resumable) and the caller either
  resumes or unlinks it (``unlink_segment``). Transports never leave open files, mappings or sockets
  behind after ``close()``.

Choosing a transport: :func:`choose_transport` picks, for a (source, destination) pair of
:class:`Endpoint`, the best transport both speak. Implementations are looked up by name with
:func:`get_transport` and imported lazily (torch, grpc and ucxx are only imported by the modules that use
them). :class:`LocalCopyTransport` is the in-process fake (two directories, fault injection) for tests.
"""

from __future__ import annotations

import importlib
import pathlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from duopool.kv.segment import KvSegment, SegmentError, SegmentMeta, kv_dir, same_layout, segment_path

__all__ = [
    "PREFERENCE",
    "Endpoint",
    "KvTransport",
    "LocalCopyTransport",
    "TransferError",
    "TransferResult",
    "TransportUnavailable",
    "available_transports",
    "choose_transport",
    "get_transport",
    "open_destination",
    "register_transport",
    "split_runs",
]

# Best first. nccl/ucx move device blocks directly; shm shares host memory; gloo and grpc copy over TCP.
PREFERENCE: tuple[str, ...] = ("nccl", "ucx", "shm", "gloo", "grpc")


class TransferError(RuntimeError):
    """A transfer did not complete. The destination segment (if any) is left unsealed and resumable."""


class TransportUnavailable(RuntimeError):
    """The transport cannot run in this process (missing package or device)."""


@dataclass(frozen=True)
class Endpoint:
    """One side of a transfer: a worker (or kvtransfer agent) and what it can speak."""

    worker_id: str
    host: str
    transports: frozenset[str] = frozenset({"shm", "grpc"})
    device: str = "cpu"  # where its KV lives: "cpu" or "cuda"


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    transport: str
    state: str  # "completed" | "ready" (pull transport: source checked, bytes move on receive)
    bytes_moved: int = 0
    units_moved: int = 0
    units_skipped: int = 0  # already present at the destination (resume / idempotent re-send)
    seconds: float = 0.0
    location: str = ""  # destination segment path (or shared path for shm)
    extra: dict = field(default_factory=dict)


def choose_transport(src: Endpoint, dst: Endpoint, *, available: Iterable[str] | None = None) -> str:
    """The best transport both endpoints speak (and, if given, this process has available).

    * both KV caches on GPUs and both speak nccl → ``nccl`` (also on one host: device to device beats
      staging through host memory), else both speak ucx → ``ucx``;
    * same host and both speak shm → ``shm`` (the segment file is shared, no bytes move);
    * both speak gloo → ``gloo`` (CPU across hosts);
    * otherwise ``grpc``, which every endpoint has (the kvtransfer service's ``Read`` stream).
    """
    shared = set(src.transports) & set(dst.transports)
    shared.add("grpc")
    if available is not None:
        shared &= set(available) | {"grpc"}
    if src.device == "cuda" and dst.device == "cuda":
        for name in ("nccl", "ucx"):
            if name in shared:
                return name
    if src.host == dst.host and "shm" in shared:
        return "shm"
    for name in ("ucx", "gloo"):
        if name in shared:
            return name
    return "grpc"


class KvTransport(ABC):
    """Moves KV segments between a source and a destination endpoint. See the module docstring."""

    name: ClassVar[str]
    #: True if bytes move when the source calls ``send`` (gloo, nccl, ucx); False if the destination pulls.
    push: ClassVar[bool]

    @classmethod
    def is_available(cls) -> bool:
        """True if this process can use the transport (packages importable, device present)."""
        return True

    @abstractmethod
    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        """Source side: hand the sealed segment ``transfer_id`` to the transport.

        Push transports move the units the destination is missing and return once the destination has
        acknowledged (state ``completed``); pull transports check the segment and return state ``ready``.
        Raises :class:`TransferError` (or ``SegmentError`` if the segment is missing or unsealed).
        """

    @abstractmethod
    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        """Destination side: bring the segment's missing units to this host and seal it.

        Returns at once if the destination segment is already complete (idempotent). Push transports may
        be called with ``transfer_id=None`` to accept whatever transfer the peer pushes next.
        """

    def close(self) -> None:
        """Frees everything the transport holds (connections, process groups, mappings). Idempotent."""
        return None  # noqa: B027 - optional hook, a no-op for stateless transports

    def __enter__(self) -> KvTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- registry -----------------------------------------------------------------------------------------
_MODULES: dict[str, str] = {
    "shm": "duopool.kv.transport.shm:ShmTransport",
    "grpc": "duopool.kv.transport.grpc_stream:GrpcStreamTransport",
    "gloo": "duopool.kv.transport.gloo:GlooTransport",
    "nccl": "duopool.kv.transport.nccl:NcclTransport",
    "ucx": "duopool.kv.transport.ucx:UcxTransport",
    "local": "duopool.kv.transport:LocalCopyTransport",
}
_CLASSES: dict[str, type[KvTransport]] = {}


def register_transport(cls: type[KvTransport]) -> type[KvTransport]:
    """Class decorator: registers a transport under ``cls.name`` (out-of-tree transports too)."""
    _CLASSES[cls.name] = cls
    _MODULES.setdefault(cls.name, f"{cls.__module__}:{cls.__qualname__}")
    return cls


def get_transport(name: str) -> type[KvTransport]:
    """The transport class registered under ``name`` (imports its module on first use)."""
    if name not in _CLASSES:
        if name not in _MODULES:
            raise KeyError(f"unknown KV transport {name!r} (known: {sorted(_MODULES)})")
        module, _, qual = _MODULES[name].partition(":")
        _CLASSES[name] = getattr(importlib.import_module(module), qual)
    return _CLASSES[name]


def available_transports() -> list[str]:
    """Names of the transports this process can use, best first (the fake is not listed)."""
    names = []
    for name in PREFERENCE:
        try:
            if get_transport(name).is_available():
                names.append(name)
        except ImportError:
            continue
    return names


# -- helpers shared by the receiving sides ------------------------------------------------------------
def open_destination(meta: SegmentMeta, directory: pathlib.Path | None = None) -> tuple[KvSegment, bool]:
    """The destination segment for ``meta``: reopened if a partial (or complete) one with the same layout
    exists (resume / idempotency), else created with a received map. Returns (segment, created).

    A leftover file with another layout, or without a received map and unsealed, is replaced.
    """
    path = segment_path(meta.transfer_id, directory)
    if path.exists():
        try:
            seg = KvSegment.open(path, require_sealed=False, writable=True)
        except SegmentError:
            seg = None
        if seg is not None:
            if same_layout(seg.meta, meta) and (seg.has_block_map or seg.meta.sealed):
                return seg, False
            seg.close()
    clean = SegmentMeta.from_json(meta.to_json())
    clean = SegmentMeta(**{**clean.__dict__, "sealed": False, "extra": {
        k: v for k, v in clean.extra.items() if k != "block_map"}})
    return KvSegment.create(path, clean, block_map=True), True


def split_runs(runs: Iterable[tuple[int, int]], units_per_piece: int) -> list[tuple[int, int]]:
    """Cuts (start, count) runs of units into pieces of at most ``units_per_piece`` units."""
    out: list[tuple[int, int]] = []
    step = max(1, units_per_piece)
    for start, count in runs:
        for s in range(start, start + count, step):
            out.append((s, min(step, start + count - s)))
    return out


def finish_destination(seg: KvSegment) -> None:
    """Seals a destination segment once every unit is received (no-op if already sealed)."""
    if not seg.meta.sealed and seg.is_complete():
        seg.seal()


@register_transport
class LocalCopyTransport(KvTransport):
    """In-process fake: copies segments from ``src_dir`` to ``dst_dir`` unit run by unit run.

    ``fail_after_units`` makes ``receive`` raise :class:`TransferError` after that many units (once), to
    test resume; everything else follows the real rules (received map, idempotency, sealing).
    """

    name = "local"
    push = False

    def __init__(self, src_dir: pathlib.Path, dst_dir: pathlib.Path, *, fail_after_units: int | None = None,
                 units_per_piece: int = 8) -> None:
        self.src_dir, self.dst_dir = pathlib.Path(src_dir), pathlib.Path(dst_dir)
        self.fail_after_units = fail_after_units
        self.units_per_piece = units_per_piece

    def send(self, transfer_id: str, *, timeout_s: float | None = None) -> TransferResult:
        with KvSegment.open(segment_path(transfer_id, self.src_dir)) as seg:
            return TransferResult(transfer_id, self.name, "ready", location=str(seg.path))

    def receive(self, transfer_id: str | None = None, *, timeout_s: float | None = None) -> TransferResult:
        if transfer_id is None:
            raise TransferError("the local fake is pull-based: give a transfer_id")
        t0 = time.perf_counter()
        src = KvSegment.open(segment_path(transfer_id, self.src_dir))
        dst, _ = open_destination(src.meta, self.dst_dir)
        moved = 0
        try:
            runs = dst.missing_runs()
            skipped = dst.num_units - sum(c for _, c in runs)
            for start, count in split_runs(runs, self.units_per_piece):
                if self.fail_after_units is not None and moved + count > self.fail_after_units:
                    self.fail_after_units = None
                    raise TransferError(f"injected failure after {moved} units of {transfer_id}")
                dst.units_view(start, count)[:] = src.units_view(start, count)
                dst.mark_units(start, count)
                moved += count
            finish_destination(dst)
            return TransferResult(transfer_id, self.name, "completed", moved * src.meta.block_bytes, moved, skipped,
                                  time.perf_counter() - t0, str(dst.path))
        finally:
            src.close()
            dst.close()


def default_dir(directory: pathlib.Path | str | None) -> pathlib.Path:
    return pathlib.Path(directory) if directory is not None else kv_dir()


def runs_of(units: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unit indices → (start, count) runs."""
    runs: list[tuple[int, int]] = []
    for u in sorted(set(units)):
        if runs and runs[-1][0] + runs[-1][1] == u:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((u, 1))
    return runs
