"""Recycled KV segment files: a segment that is done goes to a free list instead of being unlinked, and
the next segment written on the host reuses its pages; a reader keeps its mapping of a recycled file.

Why (4 KiB pages, /dev/shm; docs/kv-transfer.md §1.1, §5): a fresh tmpfs file gets every page allocated (and
zeroed) at its first write, and a reader pays for a page-table entry per 4 KiB when it maps it. A file
whose pages exist already is written without allocation, and a reader that mapped the same file before
copies out of its mapping at memcpy speed. Reuse is by file (inode), so it works across processes: the
prefill's connector takes a free file, the decode maps it, kvtransfer (or the decode) retires it, and the
next prefill takes it again.

* The free list: ``<dir>/.free/<bytes>-<unique>.kv`` beside the segments (same filesystem: taking and
  retiring are renames). Its size is capped (``DUOPOOL_KV_RECYCLE_MIB``, default 512; 0 turns recycling
  off): a file retired past the cap is unlinked, as before. A file is taken only for a segment that needs
  between half its size and its size, so a small segment does not pin a big file.
* Files never shrink (a mapping past a file's end faults with SIGBUS): a taken file keeps its size.
* A reader cannot tell a recycled file's new contents from its old by the mapping: a segment's header names
  its transfer and says whether it is sealed, the writer rewrites the header (unsealed) before its data,
  and a reader checks the header again after its copy (:meth:`KvSegment.unchanged`) — a segment retired
  and reused while it was read (its lease expired) is refused, not loaded torn.
* The mapping cache (:class:`MappingCache`, per process) is keyed by (device, inode, size), bounded in bytes
  and in entries; a background thread drops an entry whose file has been unlinked (no link left) within
  ``PRUNE_S``, so a cached mapping never keeps freed memory for long.

Pure Python, no torch.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pathlib
import threading
import time
from collections import OrderedDict

FREE_DIR = ".free"
DEFAULT_RECYCLE_MIB = 512
MIN_CLASS = 64 << 10  # below this a segment may take any free file up to twice this size
PRUNE_S = 1.0  # how often a mapping cache lets go of files unlinked meanwhile (a background thread)
_seq = itertools.count()


def recycle_cap_bytes() -> int:
    """Bytes the free list may hold (``DUOPOOL_KV_RECYCLE_MIB``; 0: recycling off)."""
    raw = os.environ.get("DUOPOOL_KV_RECYCLE_MIB", "")
    try:
        mib = float(raw) if raw else DEFAULT_RECYCLE_MIB
    except ValueError:
        mib = DEFAULT_RECYCLE_MIB
    return max(0, int(mib * 2**20))


def free_dir(directory: pathlib.Path) -> pathlib.Path:
    return directory / FREE_DIR


def _free_files(directory: pathlib.Path) -> list[tuple[int, str]]:
    """(bytes, name) of the free files under ``directory``'s free list."""
    out = []
    try:
        with os.scandir(free_dir(directory)) as it:
            for e in it:
                size, _, rest = e.name.partition("-")
                if rest.endswith(".kv") and size.isdigit():
                    out.append((int(size), e.name))
    except FileNotFoundError:
        pass
    return out


def take(directory: pathlib.Path, nbytes: int, dest: pathlib.Path) -> bool:
    """Renames a free file of at least ``nbytes`` (and at most twice as many) to ``dest``; True if one was
    taken. The file keeps its size and its pages; its modification time is set to now (an orphan sweep
    judges files by age)."""
    if recycle_cap_bytes() <= 0:
        return False
    fits = sorted(f for f in _free_files(directory) if nbytes <= f[0] <= 2 * max(nbytes, MIN_CLASS))
    for _, name in fits:
        src = free_dir(directory) / name
        try:
            os.rename(src, dest)  # atomic: of two takers, one wins, the other sees the file gone
        except FileNotFoundError:
            continue
        try:
            os.utime(dest)
        except OSError:
            pass
        return True
    return False


def retire(path: pathlib.Path) -> bool:
    """Puts a finished segment file on its directory's free list (True), or leaves it for the caller to
    unlink (False: recycling off, the file gone, or the free list full)."""
    cap = recycle_cap_bytes()
    if cap <= 0:
        return False
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return False
    if size <= 0 or sum(s for s, _ in _free_files(path.parent)) + size > cap:
        return False
    target = free_dir(path.parent) / f"{size}-{os.getpid()}-{next(_seq)}-{time.monotonic_ns()}.kv"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        try:
            target.parent.mkdir(exist_ok=True)
            os.rename(path, target)
        except FileNotFoundError:
            return False
    return True


class MappingCache:
    """Read-only mappings of segment files this process read, kept for the next read of the same file."""

    def __init__(self, max_bytes: int = 0, max_entries: int = 256) -> None:
        self.max_bytes = max_bytes or 2 * max(recycle_cap_bytes(), 64 << 20)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._maps: OrderedDict[tuple[int, int, int], tuple[int, mmap.mmap]] = OrderedDict()
        self._bytes = 0
        self._pruner: threading.Thread | None = None
        self.hits = self.misses = 0

    def get(self, fd: int, st: os.stat_result) -> mmap.mmap:
        """The mapping of the open file ``fd`` (stat ``st``): cached, or mapped now with every page populated.
        The caller keeps ``fd``'s ownership."""
        key = (st.st_dev, st.st_ino, st.st_size)
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None:
                self._maps.move_to_end(key)
                self.hits += 1
                return hit[1]
        from duopool.kv.segment import MAP_POPULATE

        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)
        with self._lock:
            if self._pruner is None:  # lets go of files unlinked meanwhile even while this process reads nothing
                self._pruner = threading.Thread(target=self._prune_loop, name="duopool-kv-maps", daemon=True)
                self._pruner.start()
            self.misses += 1
            self._prune()
            self._maps[key] = (os.dup(fd), mm)
            self._bytes += st.st_size
            while self._maps and (self._bytes > self.max_bytes or len(self._maps) > self.max_entries):
                self._drop(next(iter(self._maps)))
        return mm

    def _prune_loop(self) -> None:
        while True:
            time.sleep(PRUNE_S)
            with self._lock:
                self._prune()

    def _prune(self) -> None:
        """Drops mappings of files that are gone (no link left) or were resized."""
        for key, (fd, _) in list(self._maps.items()):
            try:
                st = os.fstat(fd)
                gone = st.st_nlink == 0 or st.st_size != key[2]
            except OSError:
                gone = True
            if gone:
                self._drop(key)

    def _drop(self, key) -> None:
        fd, mm = self._maps.pop(key)
        self._bytes -= key[2]
        os.close(fd)
        try:
            mm.close()
        except BufferError:
            pass  # a reader still holds a view: the mapping goes with it

    def clear(self) -> None:
        with self._lock:
            for key in list(self._maps):
                self._drop(key)

    def __len__(self) -> int:
        return len(self._maps)


_CACHE: MappingCache | None = None
_CACHE_LOCK = threading.Lock()


def mapping_cache() -> MappingCache | None:
    """This process's mapping cache (None while recycling is off: no file is read twice then)."""
    global _CACHE
    if recycle_cap_bytes() <= 0:
        return None
    if _CACHE is None:
        with _CACHE_LOCK:
            if _CACHE is None:
                _CACHE = MappingCache()
    return _CACHE
