"""A KV segment: one request's KV blocks in a host-memory file (a shared-memory segment under /dev/shm).

The vLLM connector of a prefill worker writes the blocks of a prompt here (one copy out of the paged KV
cache); the decode worker's connector maps the same file and copies the blocks into its own cache (one
copy in). Across hosts a transport moves the file's bytes into a segment on the destination host.

Layout (little-endian)::

    [0, 4096)        header: magic b"DPKV", u32 version, u32 json length, then UTF-8 JSON (SegmentMeta)
    [4096, ...)      data: for layer l and block b, block bytes at 4096 + (l * num_blocks + b) * block_bytes

A segment is written then sealed (``seal``): a reader refuses an unsealed one, so a writer that died half
way never hands out torn KV. Files are plain files (no multiprocessing resource tracker): the kvtransfer
service owns their lifetime and unlinks them on completion, release or lease expiry.

No torch here: blocks are exposed as ``memoryview`` of bytes; callers view them with their own dtype.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from dataclasses import asdict, dataclass, field

MAGIC = b"DPKV"
VERSION = 1
HEADER_BYTES = 4096
_HEAD = struct.Struct("<4sII")

DEFAULT_KV_DIR = "/dev/shm/duopool-kv"


def kv_dir() -> pathlib.Path:
    """Where segments live on this host (``DUOPOOL_KV_DIR``; default /dev/shm/duopool-kv)."""
    return pathlib.Path(os.environ.get("DUOPOOL_KV_DIR", DEFAULT_KV_DIR))


def segment_path(transfer_id: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    if not transfer_id or "/" in transfer_id or transfer_id.startswith("."):
        raise ValueError(f"invalid transfer_id {transfer_id!r}")
    return (directory or kv_dir()) / f"{transfer_id}.kv"


@dataclass(frozen=True)
class SegmentMeta:
    transfer_id: str
    num_layers: int
    num_blocks: int
    block_bytes: int  # bytes of one block of one layer
    dtype: str  # torch dtype name, e.g. "float32"
    block_shape: tuple[int, ...]  # shape of one block of one layer, in dtype elements
    block_size: int  # tokens per block
    num_tokens: int  # tokens covered (num_blocks * block_size)
    layer_names: tuple[str, ...] = ()
    sealed: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return self.num_layers * self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return HEADER_BYTES + self.data_bytes

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SegmentMeta:
        d = json.loads(raw)
        d["block_shape"] = tuple(d["block_shape"])
        d["layer_names"] = tuple(d["layer_names"])
        return cls(**d)


class SegmentError(RuntimeError):
    pass


class KvSegment:
    """An open segment (writer or reader). Use as a context manager or call ``close``."""

    def __init__(self, path: pathlib.Path, meta: SegmentMeta, mm: mmap.mmap, writable: bool) -> None:
        self.path = path
        self.meta = meta
        self._mm = mm
        self._writable = writable

    # -- creation / opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: pathlib.Path, meta: SegmentMeta) -> KvSegment:
        raw = meta.to_json()
        if _HEAD.size + len(raw) > HEADER_BYTES:
            raise SegmentError(f"segment header too large ({len(raw)} bytes of metadata)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, meta.total_bytes)
            mm = mmap.mmap(fd, meta.total_bytes)
        finally:
            os.close(fd)
        seg = cls(path, meta, mm, writable=True)
        seg._write_header(meta)
        os.replace(tmp, path)  # visible under its name only once sized and headed
        return seg

    @classmethod
    def open(cls, path: pathlib.Path, *, require_sealed: bool = True) -> KvSegment:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SegmentError(f"KV segment {path} does not exist (released, expired or never written)") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise SegmentError(f"KV segment {path} is truncated ({size} bytes)")
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        meta = cls._read_header(mm, path)
        if size < meta.total_bytes:
            mm.close()
            raise SegmentError(f"KV segment {path} is truncated ({size} < {meta.total_bytes} bytes)")
        if require_sealed and not meta.sealed:
            mm.close()
            raise SegmentError(f"KV segment {path} is not sealed (writer unfinished or dead)")
        return cls(path, meta, mm, writable=False)

    # -- header ---------------------------------------------------------------------------------------
    def _write_header(self, meta: SegmentMeta) -> None:
        raw = meta.to_json()
        self._mm[: _HEAD.size] = _HEAD.pack(MAGIC, VERSION, len(raw))
        self._mm[_HEAD.size : _HEAD.size + len(raw)] = raw
        self.meta = meta

    @staticmethod
    def _read_header(mm: mmap.mmap, path: pathlib.Path) -> SegmentMeta:
        magic, version, length = _HEAD.unpack(mm[: _HEAD.size])
        if magic != MAGIC or version != VERSION:
            raise SegmentError(f"{path} is not a duopool KV segment (magic {magic!r}, version {version})")
        return SegmentMeta.from_json(mm[_HEAD.size : _HEAD.size + length])

    def seal(self, **extra: object) -> None:
        """Marks the data complete (after every block is written)."""
        if not self._writable:
            raise SegmentError("segment opened read-only")
        self._mm.flush()
        meta = SegmentMeta(**{**asdict(self.meta), "sealed": True, "extra": {**self.meta.extra, **extra}})
        meta = SegmentMeta.from_json(meta.to_json())
        self._write_header(meta)

    # -- data -----------------------------------------------------------------------------------------
    def offset(self, layer: int, block: int) -> int:
        m = self.meta
        if not (0 <= layer < m.num_layers and 0 <= block < m.num_blocks):
            raise IndexError(f"block ({layer}, {block}) outside segment of {m.num_layers}x{m.num_blocks}")
        return HEADER_BYTES + (layer * m.num_blocks + block) * m.block_bytes

    def layer_view(self, layer: int) -> memoryview:
        """All blocks of one layer, contiguous: num_blocks * block_bytes bytes."""
        start = self.offset(layer, 0)
        return memoryview(self._mm)[start : start + self.meta.num_blocks * self.meta.block_bytes]

    def data_view(self) -> memoryview:
        return memoryview(self._mm)[HEADER_BYTES : HEADER_BYTES + self.meta.data_bytes]

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does

    def __enter__(self) -> KvSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unlink_segment(path: pathlib.Path) -> bool:
    """Removes a segment file (and a leftover .tmp); True if something was removed."""
    removed = False
    for p in (path, path.with_suffix(".tmp")):
        try:
            p.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed
