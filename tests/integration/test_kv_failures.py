"""KV transfer failures with real processes: a SIMULATED cluster (LocalCluster: Redis, kvtransfer, workers as
processes) with a short lease. Each scenario drives a worker's Prefill and Decode directly (so the test
controls what happens between them), injects the failure with real process kills, file loss or a
restarted kvtransfer, and checks the end state, what the client sees, and that nothing leaks: no segment
file in the kv dirs once leases pass, no worker or kvtransfer process holding a deleted segment (fd or
mapping).

Workers (one cluster for the module):
* prefill-0                          source of every transfer
* decode-0   recompute, same host
* decode-1   fail (``--kv-load-failure-policy fail``), same host
* decode-2   recompute, "another host" (``DUOPOOL_HOST_ID``) with its own kv dir: pulls through ``Read``
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import signal
import time

import grpc
import pytest

from duopool.kv.recycle import FREE_DIR
from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

LEASE_S = 2.0
S = kvtransfer_pb2
PROMPT_WORDS = 200  # sim tokens: 12 full blocks of 16 move (192 tokens), 768 bytes of simulated KV
SLOW_WORDS = 2000  # 125 full blocks: 7.8 KiB of simulated KV (a word per token)


def prompt(tag: str, words: int = PROMPT_WORDS) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


def respawn(cluster: LocalCluster, name: str, *, flags: dict | None = None, env: dict | None = None,
            sig: int = signal.SIGKILL) -> None:
    """Kills a service and starts it again on the same port, with extra flags / environment."""
    cluster.kill(name, sig)
    start(cluster, name, flags=flags, env=env)


def start(cluster: LocalCluster, name: str, *, flags: dict | None = None, env: dict | None = None) -> None:
    spec = next(s for s in cluster.specs if s.name == name)
    spec = dataclasses.replace(spec, flags={**spec.flags, **(flags or {})})
    saved = cluster.extra_env
    cluster.extra_env = {**saved, **(env or {})}
    try:
        proc = cluster._spawn(spec)
    finally:
        cluster.extra_env = saved
    asyncio.run(cluster._wait(proc, time.monotonic(), 60))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    run_dir = tmp_path_factory.mktemp("kvfail")
    c = LocalCluster(Topology(engine="sim", prefill_workers=1, decode_workers=3), run_dir,
                     redis_url=redis_server.url, router_port=0,
                     extra_env={"DUOPOOL_KV_LEASE_S": str(LEASE_S), "OTEL_TRACES_EXPORTER": "none",
                                "DUOPOOL_KV_RPC_TIMEOUT_S": "3", "DUOPOOL_KV_PULL_TIMEOUT_S": "4"})
    c.log = lambda m: None
    c.start(timeout=120)
    c.host_b_kv_dir = pathlib.Path(f"{c.kv_dir}-hostb")
    try:
        respawn(c, "decode-1", flags={"kv-load-failure-policy": "fail"})
        respawn(c, "decode-2", flags={"kv-dir": str(c.host_b_kv_dir)}, env={"DUOPOOL_HOST_ID": "host-b"})
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.host_b_kv_dir, ignore_errors=True)


def worker(cluster, name):
    return worker_pb2_grpc.WorkerStub(cluster.internal_channel(name))


def kvt(cluster):
    return kvtransfer_pb2_grpc.KvTransferStub(cluster.internal_channel("kvtransfer"))


def prefill(cluster, rid: str, text: str, decode: str = "decode-0", announced: bool = True) -> worker_pb2.PrefillResponse:
    """A prefill exporting its KV; with ``announced``, returns once the broker knows the transfer (the prefill
    announces it in the background, after its answer, and these tests ask the broker about it at once)."""
    pre = worker(cluster, "prefill-0").Prefill(worker_pb2.PrefillRequest(
        request_id=rid, text=text, max_tokens=8, export_kv=True, decode_worker=decode), timeout=15)
    if announced and pre.HasField("kv"):
        kvt(cluster).PollTransfer(S.PollTransferRequest(transfer_id=pre.kv.transfer_id, wait_ms=5000), timeout=10)
    return pre


def decode(cluster, name: str, pre: worker_pb2.PrefillResponse, rid: str, kv: common_pb2.KvHandle | None = None,
           with_kv: bool = True) -> tuple[list[int], int]:
    req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=pre.prompt_token_ids,
                                   generated_token_ids=[pre.first_token_id], max_tokens=7)
    if with_kv:
        req.kv.CopyFrom(kv if kv is not None else pre.kv)
    msgs = list(worker(cluster, name).Decode(req, timeout=30))
    return [pre.first_token_id] + [t for m in msgs for t in m.token_ids], msgs[0].cached_tokens


def reference(cluster, pre, rid) -> list[int]:
    """The tokens of the request computed without any transferred KV."""
    tokens, cached = decode(cluster, "decode-0", pre, rid + "-ref", with_kv=False)
    assert cached == 0
    return tokens


def state(cluster, tid: str) -> int:
    return kvt(cluster).PollTransfer(S.PollTransferRequest(transfer_id=tid), timeout=5).state


def stats(cluster) -> kvtransfer_pb2.KvStatsResponse:
    return kvt(cluster).Stats(S.KvStatsRequest(), timeout=5)


def segment_files(cluster) -> list[pathlib.Path]:
    files = []
    for d in (cluster.kv_dir, cluster.host_b_kv_dir):
        if d.exists():
            files += [p for p in d.rglob("*") if p.suffix in (".kv", ".tmp") and p.parent.name not in ("pool", FREE_DIR)]
    return files


def deleted_segments_held(pid: int, dirs: list[pathlib.Path]) -> list[str]:
    """fd links and memory mappings of ``pid`` to deleted files under the kv dirs."""
    held = []
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "(deleted)" in target and any(str(d) in target for d in dirs):
            held.append(f"fd {fd.name} -> {target}")
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "(deleted)" in line and any(str(d) in line for d in dirs):
            held.append(f"map {line}")
    return held


def assert_no_leaks(cluster) -> None:
    """Once leases (and the orphan sweep) have passed: no segment file left but the recycled ones, within
    their cap, and no process holding a deleted one (a reader's kept mappings let go within PRUNE_S)."""
    from duopool.kv.recycle import DEFAULT_RECYCLE_MIB, PRUNE_S

    wait_for(lambda: not segment_files(cluster), timeout=6 * LEASE_S + 5,
             what=lambda: f"kv dirs to be empty (left: {segment_files(cluster)})")
    dirs = [cluster.kv_dir, cluster.host_b_kv_dir]
    for d in dirs:
        for free in d.rglob(FREE_DIR) if d.exists() else ():
            assert sum(f.stat().st_size for f in free.glob("*.kv")) <= DEFAULT_RECYCLE_MIB << 20
    for name, proc in cluster.procs.items():
        if proc.spec.service in ("worker", "kvtransfer") and proc.popen.poll() is None:
            pid = proc.popen.pid
            wait_for(lambda pid=pid: not deleted_segments_held(pid, dirs), timeout=3 * PRUNE_S + 2,
                     what=lambda pid=pid, name=name: f"{name} to let go of deleted segments "
                                                     f"({deleted_segments_held(pid, dirs)})")


# -- the normal paths (the baseline the failures are compared with) --------------------------------------
def test_same_host_transfer_loads_and_frees_the_segment(cluster):
    pre = prefill(cluster, "ok-1", prompt("a"))
    assert pre.kv.num_tokens == 192 and pre.kv.source_host and pathlib.Path(pre.kv.location).exists()
    ref = reference(cluster, pre, "ok-1")
    tokens, cached = decode(cluster, "decode-0", pre, "ok-1")
    assert (tokens, cached) == (ref, 192)
    assert state(cluster, pre.kv.transfer_id) == S.COMPLETED
    assert not pathlib.Path(pre.kv.location).exists()
    assert_no_leaks(cluster)


def test_cross_host_decode_pulls_through_read_then_loads(cluster):
    before = stats(cluster)
    pre = prefill(cluster, "xh-1", prompt("b"), decode="decode-2")
    ref = reference(cluster, pre, "xh-1")
    tokens, cached = decode(cluster, "decode-2", pre, "xh-1")
    assert (tokens, cached) == (ref, 192)  # the KV arrived through the stream, byte for byte
    after = stats(cluster)
    assert after.bytes_streamed - before.bytes_streamed == 4096 + pre.kv.num_bytes
    assert after.completed == before.completed + 1
    assert state(cluster, pre.kv.transfer_id) == S.COMPLETED
    # Repeated pulls do not accumulate sockets in the decode worker.
    pid = cluster.procs["decode-2"].popen.pid

    def sockets() -> int:
        n = 0
        for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
            try:  # an fd may close between the listing and the readlink
                n += os.readlink(fd).startswith("socket:")
            except FileNotFoundError:
                pass
        return n

    n0 = sockets()
    for i in range(3):
        p = prefill(cluster, f"xh-s{i}", prompt(f"s{i}"), decode="decode-2")
        assert decode(cluster, "decode-2", p, f"xh-s{i}")[1] == 192
    wait_for(lambda: sockets() <= n0, timeout=5, what=lambda: f"decode-2's sockets back to {n0} (now {sockets()})")
    assert_no_leaks(cluster)


# -- (a) the destination never pulls --------------------------------------------------------------------
def test_destination_that_never_pulls_expires_and_late_decodes_fall_back(cluster):
    before = stats(cluster)
    pre = prefill(cluster, "nopull-1", prompt("c"))
    path = pathlib.Path(pre.kv.location)
    assert state(cluster, pre.kv.transfer_id) == S.READY and path.exists()
    wait_for(lambda: state(cluster, pre.kv.transfer_id) == S.EXPIRED, timeout=LEASE_S + 5, what="EXPIRED")
    assert not path.exists()
    after = stats(cluster)
    assert after.expired == before.expired + 1 and after.active_transfers == 0
    ref = reference(cluster, pre, "nopull-1")
    # recompute: the same tokens, nothing loaded
    assert decode(cluster, "decode-0", pre, "nopull-1") == (ref, 0)
    # fail: UNAVAILABLE naming kv and the end state
    with pytest.raises(grpc.RpcError) as err:
        decode(cluster, "decode-1", pre, "nopull-1b")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith("kv:") and "EXPIRED" in err.value.details()
    assert_no_leaks(cluster)


def test_abandoned_kv_is_released_at_once_by_the_source_worker(cluster):
    """A decode that will not happen (an offline request stepping back between its phases): Abort with the
    handle ends the transfer RELEASED and frees the segment now, not at the lease's end."""
    before = stats(cluster)
    pre = prefill(cluster, "abandon-1", prompt("c2"))
    path = pathlib.Path(pre.kv.location)
    assert path.exists()
    with pytest.raises(grpc.RpcError) as err:  # only the worker that exported it may abandon it
        worker(cluster, "decode-0").Abort(worker_pb2.AbortRequest(request_id="abandon-1", kv=pre.kv), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv.source_worker" in err.value.details()
    resp = worker(cluster, "prefill-0").Abort(worker_pb2.AbortRequest(request_id="abandon-1", kv=pre.kv),
                                              timeout=10)
    assert resp.found
    assert state(cluster, pre.kv.transfer_id) == S.RELEASED and not path.exists()
    after = stats(cluster)
    assert after.released == before.released + 1 and after.active_transfers == 0
    # Abandoning it again is harmless (the broker answers NOT_FOUND or the ended state).
    worker(cluster, "prefill-0").Abort(worker_pb2.AbortRequest(request_id="abandon-1", kv=pre.kv), timeout=10)
    assert_no_leaks(cluster)


# -- (b) the source dies --------------------------------------------------------------------------------
def test_source_killed_after_prefill_kv_outlives_it_on_the_same_host(cluster):
    pre = prefill(cluster, "src-1", prompt("d"))
    ref = reference(cluster, pre, "src-1")
    cluster.kill("prefill-0")
    try:
        # The segment is host memory owned by kvtransfer, not by the dead engine: it still loads.
        assert decode(cluster, "decode-0", pre, "src-1") == (ref, 192)
        assert state(cluster, pre.kv.transfer_id) == S.COMPLETED
    finally:
        start(cluster, "prefill-0")
    assert_no_leaks(cluster)


def test_source_memory_lost_decode_recomputes_or_fails(cluster):
    pre = prefill(cluster, "lost-1", prompt("e"))
    ref = reference(cluster, pre, "lost-1")
    pathlib.Path(pre.kv.location).unlink()  # the source host's copy is gone
    t0 = time.monotonic()
    assert decode(cluster, "decode-0", pre, "lost-1") == (ref, 0)
    assert time.monotonic() - t0 < 10
    assert state(cluster, pre.kv.transfer_id) == S.FAILED
    pre2 = prefill(cluster, "lost-2", prompt("f"))
    pathlib.Path(pre2.kv.location).unlink()
    with pytest.raises(grpc.RpcError) as err:
        decode(cluster, "decode-1", pre2, "lost-2")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details().startswith("kv:")
    assert state(cluster, pre2.kv.transfer_id) == S.FAILED
    assert_no_leaks(cluster)


def test_cross_host_pull_timeout_and_source_death_mid_stream_decode_recomputes(cluster):
    # Slow the Read stream down (bandwidth cap: the 4 KiB header takes ~2 s, the 7.8 KiB of KV ~4 s) so a
    # pull outlives decode-2's pull timeout (4 s), and so the test can kill the source side mid-stream.
    respawn(cluster, "kvtransfer", env={"DUOPOOL_KV_READ_MAX_MIB_S": "0.002"})
    try:
        # (1) timeout: the pull is cut at 4 s, the decode recomputes, the transfer ends FAILED.
        pre = prefill(cluster, "slow-1", prompt("m", SLOW_WORDS), decode="decode-2")
        ref = reference(cluster, pre, "slow-1")
        t0 = time.monotonic()
        assert decode(cluster, "decode-2", pre, "slow-1") == (ref, 0)
        assert 3.5 < time.monotonic() - t0 < 8
        assert state(cluster, pre.kv.transfer_id) == S.FAILED
        wait_for(lambda: stats(cluster).active_reads == 0, timeout=5, what="the server side of the stream to end")
        assert not [p for p in (cluster.host_b_kv_dir / "pull-decode-2").glob("*") if p.name != FREE_DIR]
        # (2) the source side dies mid-stream.
        pre = prefill(cluster, "mid-1", prompt("g", SLOW_WORDS), decode="decode-2")
        ref = reference(cluster, pre, "mid-1")
        pull_dir = cluster.host_b_kv_dir / "pull-decode-2"
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            t0 = time.monotonic()
            fut = ex.submit(decode, cluster, "decode-2", pre, "mid-1")
            # The header has arrived (the partial destination exists), the data has not.
            partial = wait_for(lambda: list(pull_dir.glob("*.kv")), timeout=10, interval=0.02, what="a partial pull")
            assert not fut.done()
            cluster.kill("kvtransfer")
            assert fut.result(timeout=20) == (ref, 0)
            assert time.monotonic() - t0 < 15
        assert not partial[0].exists()  # the unsealed partial copy was removed, never loaded
    finally:
        start(cluster, "kvtransfer")
    # The source segment of the dead kvtransfer's transfer is an orphan: the new kvtransfer removes it.
    assert_no_leaks(cluster)


# -- (c) kvtransfer unreachable / restarted -------------------------------------------------------------
def test_kvtransfer_down_prefill_frees_its_kv_and_decodes_fall_back_without_hanging(cluster):
    old = prefill(cluster, "down-0", prompt("h"))
    ref_old = reference(cluster, old, "down-0")
    cluster.kill("kvtransfer")
    try:
        t0 = time.monotonic()
        pre = prefill(cluster, "down-1", prompt("i"), announced=False)
        first_s = time.monotonic() - t0
        # The first token never waits for the broker: the KV is announced in the background; that fails
        # (after one reconnect attempt, 1.5 s) and the segment is freed, so nobody loads what nobody tracks.
        assert pre.HasField("kv")
        wait_for(lambda: not segment_path_exists(cluster, "down-1"), 10, what="the unannounced segment freed")
        t0 = time.monotonic()
        assert not prefill(cluster, "down-2", prompt("k"), announced=False).HasField("kv")  # known down: freed
        later_s = time.monotonic() - t0
        print(f"prefill while kvtransfer is down: first {first_s * 1e3:.0f} ms, next {later_s * 1e3:.0f} ms")
        assert first_s < 1.0 and later_s < 1.0, "a prefill must not wait for kvtransfer's reconnect"
        assert not segment_path_exists(cluster, "down-2")
        # KV exported before the broker died sits in this host's shared memory: the decode loads it straight
        # from there (the broker is bookkeeping, not the data path) and frees it.
        t0 = time.monotonic()
        assert decode(cluster, "decode-0", old, "down-0") == (ref_old, 192)
        assert time.monotonic() - t0 < 8
        assert not pathlib.Path(old.kv.location).exists()
        # A decode of KV that is gone asks the broker: it is down, so recompute (decode-0) or fail (decode-1).
        assert decode(cluster, "decode-0", old, "down-0a") == (ref_old, 0)
        with pytest.raises(grpc.RpcError) as err:
            decode(cluster, "decode-1", old, "down-0b")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details().startswith("kv:")
        assert "kvtransfer" in err.value.details()
    finally:
        start(cluster, "kvtransfer")
    # Restarted: the transfer table is gone; the old transfer is unknown -> recompute, same tokens.
    assert decode(cluster, "decode-0", old, "down-0c") == (ref_old, 0)
    # And the cluster is healthy again: each worker's channel reconnects within its backoff (<= ~1.2 s); a
    # call before that fails fast and recomputes (same tokens), so wait for a prefill exporting KV and a
    # decode-0 loading it, each try with fresh ids.
    tries = iter(range(1000))

    def round_trip():
        n = next(tries)
        pre = prefill(cluster, f"up-{n}", prompt("j"))
        return pre.HasField("kv") and decode(cluster, "decode-0", pre, f"up-{n}")[1] == 192
    wait_for(round_trip, timeout=10, interval=0.3, what="prefill exporting KV and decode-0 loading it again")
    assert_no_leaks(cluster)


def segment_path_exists(cluster, rid: str) -> bool:
    return any(p.name.startswith(rid) for p in cluster.kv_dir.glob("*.kv"))


# -- the host KV pool ---------------------------------------------------------------------------------
def test_parked_kv_is_taken_by_another_worker_and_loaded(cluster):
    stub = kvt(cluster)
    before = stats(cluster)
    pre = prefill(cluster, "park-1", prompt("k"))
    ref = reference(cluster, pre, "park-1")
    parked = stub.Park(S.ParkRequest(key="park-1", transfer_id=pre.kv.transfer_id, priority=1), timeout=5)
    assert parked.num_tokens == 192 and not pathlib.Path(pre.kv.location).exists()
    assert state(cluster, pre.kv.transfer_id) == S.PARKED
    time.sleep(LEASE_S + 1)  # parked KV does not expire with the transfer's lease
    mid = stats(cluster)
    assert mid.pool_entries == before.pool_entries + 1 and mid.pool_used_bytes >= parked.num_bytes
    # Resumed on a worker of "another host": Take makes a transfer, the worker pulls and loads it.
    taken = stub.Take(S.TakeRequest(key="park-1", new_transfer_id="park-1-r1", destination_worker="decode-2"),
                      timeout=5)
    assert taken.state == S.READY and taken.kv.num_tokens == 192
    assert decode(cluster, "decode-2", pre, "park-1", kv=taken.kv) == (ref, 192)
    assert state(cluster, "park-1-r1") == S.COMPLETED
    after = stats(cluster)
    assert after.pool_hits == before.pool_hits + 1 and after.pool_entries == before.pool_entries
    # Taken once: a second Take misses and the caller recomputes.
    with pytest.raises(grpc.RpcError) as err:
        stub.Take(S.TakeRequest(key="park-1", new_transfer_id="park-1-r2"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stats(cluster).pool_misses == before.pool_misses + 1
    assert_no_leaks(cluster)


def test_pool_survives_a_kvtransfer_restart(cluster):
    stub = kvt(cluster)
    pre = prefill(cluster, "park-2", prompt("l"))
    ref = reference(cluster, pre, "park-2")
    stub.Park(S.ParkRequest(key="park-2", transfer_id=pre.kv.transfer_id), timeout=5)
    respawn(cluster, "kvtransfer")
    stub = kvt(cluster)
    assert stats(cluster).pool_entries >= 1  # adopted from the pool directory
    taken = stub.Take(S.TakeRequest(key="park-2", new_transfer_id="park-2-r1"), timeout=5)
    assert decode(cluster, "decode-0", pre, "park-2", kv=taken.kv) == (ref, 192)
    assert not stub.Drop(S.DropRequest(key="park-2"), timeout=5).found
    assert stats(cluster).pool_entries == 0
    assert_no_leaks(cluster)


# -- preempted decodes park their KV (the workers' Preempt + Decode(park_key) path) -----------------------
def preempted_decode(cluster, name: str, rid: str, text: str, after: int = 20, max_tokens: int = 400):
    """An offline decode on ``name`` of ``text`` (recomputing its prompt), preempted after ``after`` tokens:
    (prompt ids, tokens so far, the stream's last message)."""
    pre = prefill(cluster, rid + "-p", text)  # only for the prompt's ids (and the first token)
    got, end, sent = [pre.first_token_id], None, False
    stub = worker(cluster, name)
    for m in stub.Decode(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=pre.prompt_token_ids, generated_token_ids=[pre.first_token_id],
            max_tokens=max_tokens - 1, request_class=common_pb2.OFFLINE), timeout=60):
        got += m.token_ids
        if len(got) >= after and not sent and not m.finished:
            sent = True
            stub.Preempt(worker_pb2.PreemptRequest(request_class=common_pb2.OFFLINE, request_ids=[rid]), timeout=10)
        end = m if m.finished else end
    worker(cluster, "prefill-0").Abort(worker_pb2.AbortRequest(request_id=rid + "-p", kv=pre.kv), timeout=10)
    return list(pre.prompt_token_ids), got, end


def resume(cluster, name: str, rid: str, prompt_ids, got, park_key: str, max_tokens: int = 400):
    msgs = list(worker(cluster, name).Decode(worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt_ids, generated_token_ids=got, max_tokens=max_tokens - len(got),
        request_class=common_pb2.OFFLINE, park_key=park_key), timeout=60))
    return got + [t for m in msgs for t in m.token_ids], msgs


def test_preempted_decode_parks_survives_a_kvtransfer_restart_and_resumes_on_another_host(cluster):
    """Preempted mid-decode on decode-0, the request's KV (prompt + generated tokens) is parked; kvtransfer is
    killed and restarted while it waits; the resume on a worker of another host pulls it and computes only
    the tail — exactly the uninterrupted tokens, once."""
    from tests.conftest import sim_expected_tokens

    prompt_ids, got, end = preempted_decode(cluster, "decode-0", "pk-1", prompt("pk"))
    assert end.finish_reason == "preempted" and end.parked_key == "pk-1", end
    assert end.parked_tokens == (len(prompt_ids) + len(got) - 1) // 16 * 16
    respawn(cluster, "kvtransfer")  # SIGKILL while the KV is parked: the pool's files are adopted
    out, msgs = resume(cluster, "decode-2", "pk-1-r", prompt_ids, got, "pk-1")
    assert msgs[0].park_failure == "" and msgs[0].cached_tokens == end.parked_tokens
    assert out == sim_expected_tokens(prompt_ids, 400)
    assert stats(cluster).pool_entries == 0
    assert_no_leaks(cluster)


def test_preempted_decode_with_the_pool_full_recomputes_once(cluster):
    """A pool too small for the KV refuses the park: the worker frees the segment and says why; the resume
    recomputes and still gives the uninterrupted tokens; a resume naming KV that is not there recomputes."""
    from tests.conftest import sim_expected_tokens

    respawn(cluster, "kvtransfer", flags={"kv-pool-gib": "0.000001"})  # ~1 KiB: no segment fits
    try:
        prompt_ids, got, end = preempted_decode(cluster, "decode-0", "pk-2", prompt("pf"))
        assert end.finish_reason == "preempted" and end.parked_key == "" and end.park_failure == "pool full"
        out, msgs = resume(cluster, "decode-0", "pk-2-r", prompt_ids, got, "")
        assert out == sim_expected_tokens(prompt_ids, 400) and msgs[0].cached_tokens == 0
        out, msgs = resume(cluster, "decode-0", "pk-2-r2", prompt_ids, got, "pk-2")
        assert msgs[0].park_failure == "parked KV not found" and msgs[0].cached_tokens == 0
        assert out == sim_expected_tokens(prompt_ids, 400)
    finally:
        respawn(cluster, "kvtransfer")
    assert_no_leaks(cluster)
