"""``/v1/files`` and ``/v1/batches`` with the official ``openai`` client on a live cluster (real Redis, real
services, SIMULATED workers): uploads, batches end to end with exact answers, validation, cancel of a
50,000-request batch, and restarts of the scheduler and of the router mid-batch (every request answered
exactly once).
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import openai
import pytest
import redis

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens, wait_for

pytestmark = pytest.mark.integration

KEY, OTHER = "batch-key-1", "batch-key-2"
MAX_FILE_MB = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    c = LocalCluster(Topology(engine="sim"), tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url.replace("/0", "/7"), router_port=0,
                     extra_env={"DUOPOOL_API_KEYS": f"{KEY},{OTHER}", "OTEL_TRACES_EXPORTER": "none",
                                "DUOPOOL_MAX_FILE_MB": str(MAX_FILE_MB)})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def store(redis_server):
    return redis.Redis.from_url(redis_server.url.replace("/0", "/7"), decode_responses=True)


def chat_line(cid: str, model: str, content: str, max_tokens: int | None = 5, **body) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    if max_tokens is not None:
        b["max_tokens"] = max_tokens
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": b}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(ln) + "\n" for ln in lines).encode()


def upload(client, lines: list[dict] | bytes, name: str = "in.jsonl"):
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def wait_status(client, batch_id: str, statuses: tuple[str, ...], timeout: float = 120, seen: list | None = None):
    def check():
        b = client.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != b.status):
            seen.append(b.status)
        return b if b.status in statuses else None
    return wait_for(check, timeout, interval=0.2, what=f"batch {batch_id} to reach {statuses}")


def sim_chat(content: str, n: int) -> str:
    ids = sim_tokenize(f"user: {content}")
    return "".join(f" sim{t}" for t in sim_expected_tokens(ids, n))


def output_lines(client, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(ln) for ln in client.files.content(file_id).text.splitlines() if ln]


def test_file_upload_retrieve_list_content_delete(client, cluster):
    data = jsonl([{"custom_id": "a", "x": 1}]) + b"\xff not utf-8 is stored as is\n"
    f = upload(client, data, "mine.jsonl")
    assert (f.object, f.purpose, f.filename, f.bytes, f.status) == ("file", "batch", "mine.jsonl", len(data),
                                                                    "processed")
    assert client.files.retrieve(f.id).bytes == len(data)
    assert client.files.content(f.id).content == data
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    other = openai.OpenAI(base_url=cluster.http_url, api_key=OTHER, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)  # another key's files are invisible
    assert f.id not in [x.id for x in other.files.list()]
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)


def test_file_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", io.BytesIO(b"")), purpose="batch")
    assert err.value.body["param"] == "file"
    big = io.BytesIO(b"x" * (MAX_FILE_MB * 1_000_000 + 10))
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", big), purpose="batch")
    assert err.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    f = upload(client, [chat_line("a", "m", "hi")])
    for kw, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1w"}, "completion_window")):
        args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(**args)
        assert err.value.body["param"] == param


def test_chat_batch_end_to_end_async_client(cluster, client, model, store):
    contents = [f"question number {i} about batches" for i in range(12)]
    lines = [chat_line(f"q{i}", model, c, max_tokens=4 + i % 3, temperature=0) for i, c in enumerate(contents)]

    async def run():
        ac = openai.AsyncOpenAI(base_url=cluster.http_url, api_key=KEY, max_retries=0, timeout=60)
        f = await ac.files.create(file=("chat.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = await ac.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"team": "search"})
        seen = [b.status]
        for _ in range(600):
            b = await ac.batches.retrieve(b.id)
            if b.status != seen[-1]:
                seen.append(b.status)
            if b.status in ("completed", "failed", "cancelled", "expired"):
                break
            await asyncio.sleep(0.1)
        await ac.close()
        return f, b, seen

    f, b, seen = asyncio.run(run())
    assert seen[0] == "validating" and seen[-1] == "completed", seen
    assert set(seen) <= {"validating", "in_progress", "finalizing", "completed"}
    assert b.request_counts.total == 12 and b.request_counts.completed == 12 and b.request_counts.failed == 0
    assert b.input_file_id == f.id and b.metadata == {"team": "search"} and b.model == model
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.error_file_id is None
    out = output_lines(client, b.output_file_id)
    assert [ln["custom_id"] for ln in out] == [f"q{i}" for i in range(12)]
    for i, ln in enumerate(out):
        assert ln["error"] is None and ln["response"]["status_code"] == 200
        body = ln["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == model
        assert body["choices"][0]["message"]["content"] == sim_chat(contents[i], 4 + i % 3)
        assert body["usage"]["completion_tokens"] == 4 + i % 3
    meta = client.files.retrieve(b.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(client.files.content(b.output_file_id).content)
    assert b.usage.output_tokens == sum(4 + i % 3 for i in range(12))
    # the batch is a job of the durable queue: every request ran once
    assert int(store.hget(f"duopool:job:{b.id}", "done")) == 12


def test_completions_batch_with_a_request_failing_at_run_time(client, model):
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": "short prompt", "max_tokens": 3}},
             {"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": "word " * 2100, "max_tokens": 3}}]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/completions",
                              completion_window="24h")
    b = wait_status(client, b.id, ("completed", "failed"))
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    ok = output_lines(client, b.output_file_id)
    assert [ln["custom_id"] for ln in ok] == ["ok"]
    assert ok[0]["response"]["body"]["choices"][0]["text"] == "".join(
        f" sim{t}" for t in sim_expected_tokens(sim_tokenize("short prompt"), 3))
    bad = output_lines(client, b.error_file_id)
    assert [ln["custom_id"] for ln in bad] == ["too-long"]
    assert bad[0]["response"]["status_code"] == 400 and "context" in bad[0]["response"]["body"]["error"]["message"]


def test_invalid_lines_fail_the_batch_and_nothing_runs(client, model, store):
    good = chat_line("g", model, "fine")
    data = b"".join([
        json.dumps(good).encode() + b"\n",
        b"{not json\n",
        json.dumps({**chat_line("u", model, "x"), "url": "/v1/completions"}).encode() + b"\n",
        json.dumps(chat_line("g", model, "again")).encode() + b"\n",
        json.dumps(chat_line("m", "no-such-model", "x")).encode() + b"\n",
        json.dumps(chat_line("n", model, "x", n=2)).encode() + b"\n",
        json.dumps(chat_line("t", model, "x", temperature=9)).encode() + b"\n",
    ])
    b = client.batches.create(input_file_id=upload(client, data).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = wait_status(client, b.id, ("failed", "completed", "in_progress"))
    assert b.status == "failed" and b.failed_at
    errs = [(e.line, e.code, e.param) for e in b.errors.data]
    assert errs == [(2, "invalid_json", None), (3, "invalid_url", "url"), (4, "duplicate_custom_id", "custom_id"),
                    (5, "model_not_found", "body.model"), (6, "unsupported_parameter", "body.n"),
                    (7, "invalid_request", "body.temperature")], errs
    assert not store.exists(f"duopool:job:{b.id}"), "a batch that failed validation must not enqueue anything"


def test_cancel_a_50000_request_batch_then_a_later_batch_runs(client, model):
    from duopool.bench.batch_accept import make_file

    data = make_file(50_000, 8.0, model, 16)
    f = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "validating"
    b = wait_status(client, b.id, ("in_progress", "failed"), timeout=300)
    accepted_s = time.perf_counter() - t0
    assert b.status == "in_progress" and b.request_counts.total == 50_000
    b = wait_for(lambda: (x := client.batches.retrieve(b.id)).request_counts.completed >= 5 and x,
                 timeout=120, what="the big batch to make progress")
    c = client.batches.cancel(b.id)
    assert c.status == "cancelling" and c.cancelling_at
    c = wait_status(client, b.id, ("cancelled",), timeout=120)
    rc = c.request_counts
    out, err = output_lines(client, c.output_file_id), output_lines(client, c.error_file_id)
    assert len(out) == rc.completed >= 5 and rc.failed == 0
    assert len(out) + len(err) == rc.total == 50_000, "every request is answered or reported cancelled"
    assert {ln["error"]["code"] for ln in err} == {"batch_cancelled"}
    assert len({ln["custom_id"] for ln in out + err}) == 50_000
    assert client.files.retrieve(c.error_file_id).bytes == len(client.files.content(c.error_file_id).content)
    print(f"50,000 requests ({len(data) / 1e6:.1f} MB) accepted in {accepted_s:.1f} s")
    # its ~50,000 queued entries must not hold a later batch back
    later = client.batches.create(input_file_id=upload(client, [chat_line("after", model, "later")]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    later = wait_status(client, later.id, ("completed",), timeout=60)
    assert later.request_counts.completed == 1


def test_batch_survives_a_scheduler_restart(cluster, client, model):
    contents = [f"restart {i} " * 3 for i in range(16)]
    lines = [chat_line(f"s{i}", model, c, max_tokens=40) for i, c in enumerate(contents)]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    wait_for(lambda: client.batches.retrieve(b.id).request_counts.completed >= 1, 60, what="first results")
    cluster.kill("scheduler")
    time.sleep(0.5)
    mid = client.batches.retrieve(b.id)  # the router answers from Redis while the scheduler is down
    assert mid.status in ("in_progress", "finalizing", "completed")
    cluster.restart("scheduler")
    b = wait_status(client, b.id, ("completed",), timeout=180)
    assert (b.request_counts.completed, b.request_counts.failed) == (16, 0)
    out = output_lines(client, b.output_file_id)
    assert [ln["custom_id"] for ln in out] == [f"s{i}" for i in range(16)], "each request exactly once"
    for i, ln in enumerate(out):
        assert ln["response"]["body"]["choices"][0]["message"]["content"] == sim_chat(contents[i], 40)


def test_batch_survives_a_router_restart_while_validating(cluster, client, model, store):
    from duopool.bench.batch_accept import make_file

    n = 20_000
    data = make_file(n, 3.0, model, 2)
    f = client.files.create(file=("mid.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.3)
    cluster.kill("router")  # mid-validation or mid-enqueue: the next router takes over when the lease lapses
    cluster.restart("router")
    fresh = openai.OpenAI(base_url=cluster.http_url, api_key=KEY, max_retries=0, timeout=60)
    b = wait_status(fresh, b.id, ("in_progress", "finalizing", "completed", "failed"), timeout=120)
    assert b.status != "failed" and b.request_counts.total == n
    job = store.hgetall(f"duopool:job:{b.id}")
    assert int(job["enqueued"]) == n and store.hlen(f"duopool:job:{b.id}:items") == n
    fresh.batches.cancel(b.id)
    c = wait_status(fresh, b.id, ("cancelled", "completed"), timeout=120)
    out, err = output_lines(fresh, c.output_file_id), output_lines(fresh, c.error_file_id)
    ids = [ln["custom_id"] for ln in out + err]
    assert len(ids) == len(set(ids)) == n, "no request enqueued twice or lost"


def test_list_batches_paginates_newest_first(client, model):
    f = upload(client, [chat_line("p", model, "page", max_tokens=1)])
    made = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == made[0]
    every = [b.id for b in client.batches.list(limit=2)]  # iterating a page follows has_more / after
    assert every[:3] == made[::-1] and len(every) == len(set(every)) >= 3
    other = openai.OpenAI(base_url=client.base_url, api_key=OTHER, max_retries=0)
    assert not set(made) & {b.id for b in other.batches.list(limit=100).data}
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(made[0])
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(made[0])


def test_grpc_jobs_belong_to_their_key_too(cluster, client, model):
    import grpc

    from duopool.v1 import router_pb2, router_pb2_grpc

    def md(key):
        return (("authorization", f"Bearer {key}"),)

    with grpc.insecure_channel(cluster.router_address) as ch:
        router = router_pb2_grpc.RouterStub(ch)
        items = [router_pb2.BatchItem(custom_id="k", text="owned job", max_tokens=2)]
        st = router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id="owned-1"), metadata=md(KEY),
                                timeout=10)
        assert st.job_id == "owned-1"
        for call in (router.GetBatch, router.CancelBatch):
            with pytest.raises(grpc.RpcError) as err:
                call(router_pb2.GetBatchRequest(job_id="owned-1"), metadata=md(OTHER), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            list(router.GetBatchResults(router_pb2.GetBatchRequest(job_id="owned-1"), metadata=md(OTHER), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:  # nor can another key take over its id
            router.SubmitBatch(router_pb2.SubmitBatchRequest(requests=items, job_id="owned-1"), metadata=md(OTHER),
                               timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert router.GetBatch(router_pb2.GetBatchRequest(job_id="owned-1"), metadata=md(KEY), timeout=10).total == 1
        # an OpenAI batch is a job of the same queue, with the same owner
        b = client.batches.create(input_file_id=upload(client, [chat_line("o", model, "mine")]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
        b = wait_status(client, b.id, ("completed",))
        assert router.GetBatch(router_pb2.GetBatchRequest(job_id=b.id), metadata=md(KEY), timeout=10).done == 1
        with pytest.raises(grpc.RpcError):
            router.GetBatch(router_pb2.GetBatchRequest(job_id=b.id), metadata=md(OTHER), timeout=10)


def test_keys_share_the_workers_fairly(client, model):
    """A key with a long batch does not hold back another key's short one: the dispatcher serves the owners of
    active jobs in turn (with one FIFO, the short batch would wait for every request of the long one to start)."""
    big = [chat_line(f"big{i}", model, f"long backlog {i}", max_tokens=16) for i in range(300)]
    a = client.batches.create(input_file_id=upload(client, big).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    wait_status(client, a.id, ("in_progress",), timeout=60)
    other = openai.OpenAI(base_url=client.base_url, api_key=OTHER, max_retries=0, timeout=60)
    small = [chat_line(f"small{i}", model, f"short job {i}", max_tokens=16) for i in range(8)]
    b = other.batches.create(input_file_id=upload(other, small).id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    b = wait_status(other, b.id, ("completed",), timeout=120)
    a_then = client.batches.retrieve(a.id).request_counts.completed
    print(f"the other key's 8-request batch completed while the 300-request one had {a_then} done")
    assert b.request_counts.completed == 8
    assert a_then < 150, f"the short batch waited behind the long one ({a_then} of 300 done first)"
    a = wait_status(client, a.id, ("completed",), timeout=300)
    assert a.request_counts.completed == 300
