"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client (sync and async), on a live
cluster (real Redis, real services, SIMULATED workers) with API keys configured.

The simulated engine's tokens are a known function of the sequence, so every answer is checked exactly.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import openai
import pytest

from duopool.launcher import LocalCluster
from duopool.topology import Topology
from duopool.v1 import common_pb2, router_pb2, router_pb2_grpc
from duopool.worker.engines.sim import sim_tokenize
from tests.conftest import sim_expected_tokens

pytestmark = pytest.mark.integration

KEY = "test-key-3f9a"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    c = LocalCluster(Topology(engine="sim"), tmp_path_factory.mktemp("run"),
                     redis_url=redis_server.url.replace("/0", "/5"), router_port=0,
                     extra_env={"DUOPOOL_API_KEYS": f"other-key,{KEY}", "OTEL_TRACES_EXPORTER": "none"})
    c.log = lambda m: None
    c.start(timeout=120)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def sim_text(prompt_ids: list[int], n: int) -> str:
    return "".join(f" sim{t}" for t in sim_expected_tokens(prompt_ids, n))


def chat_ids(messages: list[dict]) -> list[int]:
    return sim_tokenize(" ".join(f"{m['role']}: {m['content']}" for m in messages))


def test_models_list_and_retrieve(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == ["sim:llama-3.1-8b"]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_exact_answer_and_usage(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why is the sky blue"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=7, temperature=0)
    ids = chat_ids(messages)
    assert r.object == "chat.completion" and r.model == model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == sim_text(ids, 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 7, len(ids) + 7)


def test_chat_stream_matches_non_stream_and_reports_usage(client, model):
    messages = [{"role": "user", "content": [{"type": "text", "text": "tell me"}, {"type": "text", "text": " more"}]}]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_completion_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == sim_text(chat_ids([{"role": "user", "content": "tell me more"}]), 6)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completions_text_and_token_prompt_async(cluster, model):
    async def run():
        client = openai.AsyncOpenAI(base_url=cluster.http_url, api_key=KEY, max_retries=0, timeout=30)
        r = await client.completions.create(model=model, prompt="hello world", max_tokens=5)
        stream = await client.completions.create(model=model, prompt=[11, 22, 33], max_tokens=4, stream=True)
        pieces = [c.choices[0].text async for c in stream if c.choices]
        await client.close()
        return r, "".join(pieces)

    r, streamed = asyncio.run(run())
    assert r.object == "text_completion"
    assert r.choices[0].text == sim_text(sim_tokenize("hello world"), 5)
    assert r.usage.prompt_tokens == len(sim_tokenize("hello world"))
    assert streamed == sim_text([11, 22, 33], 4)


def test_stop_sequence_ends_the_answer(client, model):
    ids = sim_tokenize("stop here")
    full = sim_text(ids, 8).split(" ")[1:]  # [simA, simB, ...]
    r = client.completions.create(model=model, prompt="stop here", max_tokens=8, stop=[full[2]])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3


def test_no_max_tokens_fills_the_context(client, model):
    messages = [{"role": "user", "content": "go on"}]
    r = client.chat.completions.create(model=model, messages=messages)
    assert r.usage.total_tokens == 2048  # the simulated workers' context
    assert r.choices[0].finish_reason == "length"


def test_flex_tier_is_offline_and_answers(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "batchy"}],
                                       max_tokens=3, service_tier="flex")
    assert r.service_tier == "flex" and r.usage.completion_tokens == 3


def test_api_key_required(cluster, model):
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=cluster.http_url, api_key=key or "x", max_retries=0, timeout=10)
        if not key:
            bad = openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=10,
                                default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"), ({"temperature": 5}, "temperature"), ({"top_p": -1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"presence_penalty": 1.0}, "presence_penalty"), ({"service_tier": "gold"}, "service_tier"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"logprobs": True}, "logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_parameters_are_400_naming_the_param(client, model, extra, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_raw_http_errors(cluster, model):
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=cluster.http_url, headers=h, timeout=30) as http:
        r = http.post("/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.post("/chat/completions", content=b"x" * (33 * 1024 * 1024))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = (b"x" * (1 << 20) for _ in range(40))  # no Content-Length: counted as it arrives
        r = http.post("/chat/completions", content=chunked)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = http.post("/chat/completions", json=body, headers={"x-duopool-ttft-ms": "nan"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-duopool-ttft-ms"
        r = http.post("/chat/completions", json=body, headers={"x-duopool-ttft-ms": "500", "x-duopool-tpot-ms": "80"})
        assert r.status_code == 200 and r.headers["x-request-id"]
        r = http.post("/completions", json={"model": model, "prompt": ["a", "b"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.get("/no/such/route")
        assert r.status_code == 404 and "error" in r.json()
        # the server still serves after all of that
        assert http.post("/completions", json={"model": model, "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_sse_wire_format_ends_with_done(cluster, model):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": model, "prompt": "wire", "max_tokens": 3, "stream": True}
    with httpx.Client(base_url=cluster.http_url, headers=h, timeout=30) as http, \
            http.stream("POST", "/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["text_completion"] * 4


def test_grpc_uses_the_same_keys_and_defaults_class_to_online(cluster):
    req = router_pb2.GenerateRequest(text="grpc hello", max_tokens=3)  # no request_class: online
    with grpc.insecure_channel(cluster.router_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=10, metadata=[("authorization", "Bearer nope")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = list(stub.Generate(req, timeout=10, metadata=[("authorization", f"Bearer {KEY}")]))
        assert out[-1].summary.output_tokens == 3
        chat = router_pb2.GenerateRequest(max_tokens=2, messages=common_pb2.ChatMessages(messages=[
            common_pb2.ChatMessage(role="user", content="from grpc")]))
        out = list(stub.Generate(chat, timeout=10, metadata=[("authorization", f"Bearer {KEY}")]))
        ids = chat_ids([{"role": "user", "content": "from grpc"}])
        assert [t for m in out[:-1] for t in m.chunk.token_ids] == sim_expected_tokens(ids, 2)
