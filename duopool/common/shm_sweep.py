"""No shared-memory leftovers: what the cluster's processes leave in /dev/shm when they stop or are killed.

Two kinds of files are the cluster's:

* its KV segment directories, ``<kv_root>/duopool-kv-<launcher pid>-<time>`` (the launcher's; removed at
  a clean stop): one whose launcher is no longer alive is an orphan;
* the POSIX shared-memory files vLLM's processes create through Python's ``multiprocessing.shared_memory``
  (``psm_*``, ~160 MB each for the engine's message queues) and ``multiprocessing``'s named semaphores
  (``sem.mp-*``), which nothing unlinks after ``kill -9``.

``sweep`` removes the ones no live process holds (mapped or open, matched by inode: read from
``/proc/*/maps`` and ``/proc/*/fd``), that belong to this user and were not modified in the last
``min_age_s`` (a file being created right now is not mapped yet; Python maps it within the same call).
The launcher sweeps at start, after it restarts a killed worker and at stop. A ``psm_*``/``sem.mp-*``
file that no process maps or keeps open is unreachable shared memory (its creator is gone or let go of
it), whoever made it, so removing it frees memory nobody can use.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time

log = logging.getLogger(__name__)

SHM_PATTERNS = ("psm_*", "sem.mp-*")
KV_DIR_PREFIX = "duopool-kv-"


def _dev(st_dev: int) -> str:
    return f"{os.major(st_dev):02x}:{os.minor(st_dev):02x}"


def held_files() -> set[tuple[str, int]]:
    """(device, inode) of every file a process we can inspect has mapped (``/proc/*/maps``) or open
    (``/proc/*/fd``). By inode, not by path: glibc's ``sem_open`` maps a temporary file and then links it
    under its ``sem.*`` name, so a live semaphore's mapping never shows that name."""
    held: set[tuple[str, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) >= 5 and parts[4] != "0":
                        held.add((parts[3], int(parts[4])))
        except (OSError, ValueError):
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            held.add((_dev(st.st_dev), st.st_ino))
    return held


def is_held(st: os.stat_result, held: set[tuple[str, int]]) -> bool:
    return (_dev(st.st_dev), st.st_ino) in held


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(shm_dir: pathlib.Path = pathlib.Path("/dev/shm"), kv_root: pathlib.Path | None = None,
          min_age_s: float = 0.2, keep: set[pathlib.Path] | None = None) -> list[tuple[pathlib.Path, int]]:
    """Removes orphaned shared-memory files and KV directories (module docstring); returns what it removed
    with the bytes each held."""
    removed: list[tuple[pathlib.Path, int]] = []
    uid, now = os.getuid(), time.time()
    keep = {p.resolve() for p in keep or set()}
    candidates = [p for pattern in SHM_PATTERNS for p in shm_dir.glob(pattern)]
    if candidates:
        held = held_files()
        for p in candidates:
            try:
                st = p.lstat()
            except OSError:
                continue
            if st.st_uid != uid or now - st.st_mtime < min_age_s or is_held(st, held) or p.resolve() in keep:
                continue
            try:
                p.unlink()
                removed.append((p, st.st_size))
            except OSError:
                pass
    for root in {shm_dir, kv_root or shm_dir}:
        for d in root.glob(f"{KV_DIR_PREFIX}*"):
            pid = d.name[len(KV_DIR_PREFIX):].split("-", 1)[0]
            try:
                if not d.is_dir() or d.stat().st_uid != uid or not pid.isdigit() or _alive(int(pid)) \
                        or d.resolve() in keep:
                    continue
            except OSError:
                continue
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d, ignore_errors=True)
            removed.append((d, size))
    if removed:
        log.info("removed %d orphaned shared-memory file(s)/KV dir(s): %s", len(removed),
                 ", ".join(p.name for p, _ in removed[:8]) + (" ..." if len(removed) > 8 else ""))
    return removed
