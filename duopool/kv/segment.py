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
import zlib
from dataclasses import asdict, dataclass, field

from duopool.kv import recycle

MAGIC = b"DPKV"
VERSION = 1
HEADER_BYTES = 4096
_HEAD = struct.Struct("<4sII")

DEFAULT_KV_DIR = "/dev/shm/duopool-kv"
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: map (and read in) every page at mmap time


def kv_dir() -> pathlib.Path:
    """Where segments live on this host (``DUOPOOL_KV_DIR``; default /dev/shm/duopool-kv)."""
    return pathlib.Path(os.environ.get("DUOPOOL_KV_DIR", DEFAULT_KV_DIR))


def mount_of(path: pathlib.Path, mounts: str | None = None) -> tuple[str, str, str]:
    """(mount point, filesystem type, mount options) of the filesystem holding ``path`` (Linux
    /proc/self/mounts, or ``mounts`` in its format; the longest mount point that is a prefix of the path);
    ("", "", "") when unknown."""
    if mounts is None:
        try:
            mounts = pathlib.Path("/proc/self/mounts").read_text()
        except OSError:
            return "", "", ""
    lines = mounts.splitlines()
    target = str(path.resolve() if path.exists() else path.absolute())
    best = ("", "", "")
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, parts[2], parts[3])
    return best


def huge_pages(directory: pathlib.Path, mounts: str | None = None) -> str:
    """How segment files under ``directory`` are paged: ``"huge=<mode>"`` on a tmpfs mounted with
    transparent huge pages (``huge=always|within_size|advise``), else ``""`` (4 KiB pages). With 4 KiB pages
    a reader's first touch of a fresh segment costs a page fault per 4 KiB, which holds a same-host copy to
    ~55-60% of memcpy; on a huge-page tmpfs it runs at ~memcpy speed (docs/kv-transfer.md)."""
    _, fstype, options = mount_of(directory, mounts)
    if fstype != "tmpfs":
        return ""
    for opt in options.split(","):
        if opt.startswith("huge=") and opt not in ("huge=never", "huge=deny"):
            return opt
    return ""


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
        self._fd: int | None = None  # a segment made by create(): its file, for write_layer's pwrite
        self._cached = False  # the mapping belongs to the process's MappingCache (close leaves it)
        self.recycled = False  # create() reused a retired file (its pages exist already)

    # -- creation / opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: pathlib.Path, meta: SegmentMeta, *, block_map: bool = False) -> KvSegment:
        """Creates (or replaces) a segment, unsealed.

        ``block_map=True`` appends a per-unit "received" map after the data (one byte per (layer, block),
        recorded as ``extra["block_map"]``): a receiving transport marks units as they land, so an
        interrupted transfer resumes with only the missing blocks and a re-sent block is harmless.
        Readers ignore the trailer (the file is just longer than ``meta.total_bytes``).
        """
        if block_map:
            meta = SegmentMeta(
                **{**asdict(meta), "sealed": False, "extra": {**meta.extra, "block_map": meta.num_layers * meta.num_blocks}}
            )
            meta = SegmentMeta.from_json(meta.to_json())
        raw = meta.to_json()
        if _HEAD.size + len(raw) > HEADER_BYTES:
            raise SegmentError(f"segment header too large ({len(raw)} bytes of metadata)")
        tmp = path.with_suffix(".tmp")
        need = meta.total_bytes + _map_len(meta)
        try:  # never truncate a file that exists: a reader may have it mapped (recycle.py)
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = None
        if recycle.take(path.parent, need, tmp):
            try:
                fd = os.open(tmp, os.O_RDWR)
            except FileNotFoundError:  # swept away between the take and the open: a new file then
                pass
        recycled = fd is not None
        if fd is None:
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # the directory's first segment
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if recycled:
                size = os.fstat(fd).st_size
            else:
                size = need
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        seg = cls(path, meta, mm, writable=True)
        seg._fd = fd
        seg.recycled = recycled
        seg._write_header(meta)  # first: a reader of the file's previous contents sees them replaced
        if recycled and _map_len(meta):
            mm[meta.total_bytes : need] = bytes(_map_len(meta))  # nothing received yet
        os.replace(tmp, path)  # visible under its name only once sized and headed
        return seg

    @classmethod
    def open(cls, path: pathlib.Path, *, require_sealed: bool = True, writable: bool = False,
             populate: bool = False) -> KvSegment:
        """Maps an existing segment. ``writable=True`` (with ``require_sealed=False``) reopens a partly
        received segment to resume it. ``populate=True`` maps every page in one go (``MAP_POPULATE``) for a
        caller about to read all of it (a KV load): with 4 KiB pages, faulting them in one by one during the
        copy costs a third of memcpy speed (docs/kv-transfer.md). A read-only ``populate`` open of a file this
        process mapped before reuses that mapping (recycled files, :mod:`duopool.kv.recycle`); such a reader
        checks :meth:`unchanged` after its copy."""
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise SegmentError(f"KV segment {path} does not exist (released, expired or never written)") from None
        cache = recycle.mapping_cache() if populate and not writable else None
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size < HEADER_BYTES:
                raise SegmentError(f"KV segment {path} is truncated ({size} bytes)")
            if cache is not None:
                mm = cache.get(fd, st)
            else:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                flags = mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)
                mm = mmap.mmap(fd, size, flags=flags, prot=prot)
        finally:
            os.close(fd)
        try:
            meta = cls._read_header(mm, path)
            if size < meta.total_bytes + _map_len(meta):
                raise SegmentError(f"KV segment {path} is truncated ({size} < {meta.total_bytes} bytes)")
            if require_sealed and not meta.sealed:
                raise SegmentError(f"KV segment {path} is not sealed (writer unfinished or dead)")
        except BaseException:
            if cache is None:
                mm.close()
            raise
        seg = cls(path, meta, mm, writable=writable)
        seg._cached = cache is not None
        return seg

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

    def unchanged(self) -> bool:
        """True if the header still says what it said at open (same transfer, same seal): a reader checks
        after copying that the file was not retired and rewritten for another transfer meanwhile."""
        try:
            return self._read_header(self._mm, self.path) == self.meta
        except (SegmentError, ValueError):
            return False

    def data_crc32(self) -> int:
        """CRC-32 of the data (every block of every layer)."""
        return zlib.crc32(self.data_view()) & 0xFFFFFFFF

    def seal_with_checksum(self) -> None:
        """``seal``, recording the data's CRC-32 (``extra["crc32"]``) for ``verify``: KV that waits (parked)
        is checked before it is loaded."""
        self.seal(crc32=self.data_crc32())

    def verify(self) -> bool:
        """False if the segment records a checksum its data no longer matches (True when it records none)."""
        want = self.meta.extra.get("crc32")
        return want is None or int(want) == self.data_crc32()

    def retag(self, transfer_id: str) -> None:
        """Renames the transfer recorded in the header (a pool checkout becomes a new transfer). The data
        and the seal are unchanged; receivers check the header's id against the transfer they pull."""
        if not self._writable:
            raise SegmentError("segment opened read-only")
        meta = SegmentMeta.from_json(SegmentMeta(**{**asdict(self.meta), "transfer_id": transfer_id}).to_json())
        self._write_header(meta)
        self._mm.flush()

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

    def write_layer(self, layer: int, data) -> None:
        """Writes all blocks of one layer (``num_blocks * block_bytes`` bytes, any buffer) with ``pwrite``: on
        a fresh tmpfs file that skips the page faults and the zero-fill of each 4 KiB page that writing
        through the mapping costs (about twice as fast here; docs/kv-transfer.md). Falls back to the
        mapping for a segment reopened with ``open(writable=True)``."""
        if not self._writable:
            raise SegmentError("segment opened read-only")
        view = memoryview(data).cast("B")
        want = self.meta.num_blocks * self.meta.block_bytes
        if view.nbytes != want:
            raise ValueError(f"layer data is {view.nbytes} bytes, the segment's layer is {want}")
        start = self.offset(layer, 0)
        if self._fd is None:
            self._mm[start : start + want] = view
            return
        done = 0
        while done < want:
            done += os.pwrite(self._fd, view[done:], start + done)

    def data_view(self) -> memoryview:
        return memoryview(self._mm)[HEADER_BYTES : HEADER_BYTES + self.meta.data_bytes]

    # -- units and the received map -------------------------------------------------------------------
    # A unit is one block of one layer; unit u = layer * num_blocks + block, stored at
    # HEADER_BYTES + u * block_bytes, so consecutive units are contiguous bytes.
    @property
    def num_units(self) -> int:
        return self.meta.num_layers * self.meta.num_blocks

    @property
    def has_block_map(self) -> bool:
        return _map_len(self.meta) > 0

    def unit_offset(self, unit: int) -> int:
        if not 0 <= unit <= self.num_units:
            raise IndexError(f"unit {unit} outside segment of {self.num_units} units")
        return HEADER_BYTES + unit * self.meta.block_bytes

    def units_view(self, start: int, count: int = 1) -> memoryview:
        """``count`` consecutive units starting at unit ``start`` (contiguous bytes)."""
        if count < 0 or start + count > self.num_units:
            raise IndexError(f"units [{start}, {start + count}) outside segment of {self.num_units} units")
        begin = self.unit_offset(start)
        return memoryview(self._mm)[begin : begin + count * self.meta.block_bytes]

    def header_bytes(self) -> bytes:
        return bytes(self._mm[:HEADER_BYTES])

    def _map_view(self) -> memoryview:
        start = self.meta.total_bytes
        return memoryview(self._mm)[start : start + _map_len(self.meta)]

    def mark_units(self, start: int, count: int = 1) -> None:
        """Records units [start, start + count) as received (after their bytes are written)."""
        if not self.has_block_map:
            return
        if not self._writable:
            raise SegmentError("segment opened read-only")
        if count < 0 or start < 0 or start + count > self.num_units:
            raise IndexError(f"units [{start}, {start + count}) outside segment of {self.num_units} units")
        self._map_view()[start : start + count] = b"\x01" * count

    def missing_runs(self) -> list[tuple[int, int]]:
        """(start, count) runs of units not yet received. A segment without a map is complete iff sealed."""
        if not self.has_block_map:
            return [] if self.meta.sealed else ([(0, self.num_units)] if self.num_units else [])
        raw = bytes(self._map_view())
        runs: list[tuple[int, int]] = []
        i, n = 0, len(raw)
        while i < n:
            i = raw.find(b"\x00", i)
            if i < 0:
                break
            j = raw.find(b"\x01", i)
            j = n if j < 0 else j
            runs.append((i, j - i))
            i = j
        return runs

    def is_received(self, unit: int) -> bool:
        if not self.has_block_map:
            return self.meta.sealed
        return bool(self._map_view()[unit])

    def missing_units(self) -> list[int]:
        return [u for start, count in self.missing_runs() for u in range(start, start + count)]

    def is_complete(self) -> bool:
        return not self.missing_runs()

    def reset_received(self) -> None:
        """Forgets every received unit and unseals (reuse of a preallocated destination segment)."""
        if not self._writable:
            raise SegmentError("segment opened read-only")
        if self.has_block_map:
            self._map_view()[:] = bytes(_map_len(self.meta))
        if self.meta.sealed:
            self._write_header(SegmentMeta.from_json(
                SegmentMeta(**{**asdict(self.meta), "sealed": False}).to_json()))

    def _close_fd(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()
        if self._cached:
            return  # the process's MappingCache keeps it for the next read of this file
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does

    def __del__(self) -> None:
        self._close_fd()

    def __enter__(self) -> KvSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_len(meta: SegmentMeta) -> int:
    return int(meta.extra.get("block_map", 0)) if isinstance(meta.extra, dict) else 0


def same_layout(a: SegmentMeta, b: SegmentMeta) -> bool:
    """True if two metas describe the same bytes (ignoring seal state and extras)."""
    keys = ("transfer_id", "num_layers", "num_blocks", "block_bytes", "dtype", "block_shape", "block_size")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def is_sealed(path: pathlib.Path) -> bool | None:
    """Whether the segment at ``path`` says it is sealed (one small read of its header); None if there is no
    readable segment there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    try:
        return KvSegment._read_header(head, path).sealed
    except (SegmentError, struct.error, ValueError, TypeError):
        return None


def unlink_segment(path: pathlib.Path, *, recycle_file: bool = False) -> bool:
    """Removes a segment file (and a leftover .tmp); True if something was removed. ``recycle_file=True``
    (a segment whose transfer is over) puts the file on its directory's free list for the next segment
    written there, if recycling is on and the list has room (:mod:`duopool.kv.recycle`). Only a sealed
    segment is recycled: an unsealed one may still have its writer at it (the connector writes off the
    forward pass), and a writer must never write into a file another segment has taken; unlinked, its writes
    land in a file nobody else can open."""
    removed = recycle_file and recycle.recycle_cap_bytes() > 0 and bool(is_sealed(path)) and recycle.retire(path)
    for p in ((path.with_suffix(".tmp"),) if removed else (path, path.with_suffix(".tmp"))):
        try:
            p.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed
