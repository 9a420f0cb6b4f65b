"""The shared-memory sweep removes only orphans: files no live process maps or keeps open, old enough, ours;
KV directories whose launcher is dead."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from duopool.common.shm_sweep import sweep


def _old(path, age_s: float = 60.0) -> None:
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_sweep_removes_orphans_and_keeps_what_is_held(tmp_path):
    orphan = tmp_path / "psm_orphan"
    orphan.write_bytes(b"x" * 4096)
    _old(orphan)
    sem = tmp_path / "sem.mp-dead"
    sem.write_bytes(b"s" * 32)
    _old(sem)
    young = tmp_path / "psm_young"  # being created right now: not yet mapped by its maker
    young.write_bytes(b"y")
    other = tmp_path / "unrelated.bin"
    other.write_bytes(b"z")
    _old(other)
    opened, mapped, linked = tmp_path / "psm_open", tmp_path / "psm_mapped", tmp_path / "sem.mp-linked"
    for p in (opened, mapped):
        p.write_bytes(b"h" * 4096)
        _old(p)
    # a live process holding one open and one mapped (its fd closed after mapping)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, os, sys, time\n"
        f"f = open({str(opened)!r}, 'rb')\n"
        f"fd = os.open({str(mapped)!r}, os.O_RDWR); m = mmap.mmap(fd, 4096); os.close(fd)\n"
        # as glibc's sem_open does: map a temporary file, then link it under its name (the mapping never
        # shows that name)
        f"fd = os.open({str(tmp_path / 'tmp-sem')!r}, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, 32)\n"
        "s = mmap.mmap(fd, 32); os.close(fd)\n"
        f"os.link({str(tmp_path / 'tmp-sem')!r}, {str(linked)!r}); os.unlink({str(tmp_path / 'tmp-sem')!r})\n"
        f"t = __import__('time').time() - 60; os.utime({str(linked)!r}, (t, t))\n"
        "print('ready', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        dead_dir = tmp_path / f"duopool-kv-{dead.pid}-1700000000"
        (dead_dir / "pool").mkdir(parents=True)
        (dead_dir / "pool" / "seg.kv").write_bytes(b"k" * 1000)
        live_dir = tmp_path / f"duopool-kv-{os.getpid()}-1700000000"
        live_dir.mkdir()
        kept_dir = tmp_path / f"duopool-kv-{dead.pid}-1700000001"
        kept_dir.mkdir()
        removed = dict(sweep(shm_dir=tmp_path, keep={kept_dir}, min_age_s=30))
        assert set(removed) == {orphan, sem, dead_dir}
        assert removed[orphan] == 4096 and removed[dead_dir] == 1000
        for p in (young, other, opened, mapped, linked, live_dir, kept_dir):
            assert p.exists(), p
        assert not orphan.exists() and not dead_dir.exists()
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone its files are orphans too
    assert set(dict(sweep(shm_dir=tmp_path, min_age_s=30))) == {opened, mapped, linked, kept_dir}


def test_sweep_of_nothing_is_quiet(tmp_path):
    assert sweep(shm_dir=tmp_path) == []
