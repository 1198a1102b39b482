"""The fake Ollama server speaks the real protocol: checked with the official client."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator

import httpx
import ollama
import pytest

from tests.fakes.ollama import MID_STREAM_ERROR, FakeOllama, fake_embedding, split_chunks

pytestmark = pytest.mark.timeout(30)

USER_MSG = {"role": "user", "content": "hello there fake"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    """A default fake (model llama2, echo replies)."""
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    """Official async client pointed at the fake."""
    async with ollama.AsyncClient(host=fake.url) as c:
        yield c


async def test_url_and_lifecycle() -> None:
    server = FakeOllama()
    with pytest.raises(RuntimeError):
        _ = server.url
    await server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.port > 0
        async with httpx.AsyncClient(base_url=server.url) as http:
            root = await http.get("/")
            assert root.status_code == 200
            assert root.text == "Ollama is running"
            assert root.headers["content-type"].startswith("text/plain")
            version = await http.get("/api/version")
            assert version.json() == {"version": "0.0.0-fake"}
    finally:
        await server.stop()
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(server.url)


async def test_chat_non_stream(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        USER_MSG,
    ]
    resp = await client.chat(model="llama2", messages=messages, stream=False)
    assert resp.message.role == "assistant"
    assert resp.message.content == "Echo: hello there fake"
    assert resp.done is True
    assert resp.done_reason == "stop"
    assert resp.model == "llama2"
    assert resp.prompt_eval_count == 5  # "be brief" + "hello there fake"
    assert resp.eval_count == 4  # "Echo: ", "hello ", "there ", "fake"
    assert resp.total_duration is not None and resp.total_duration > 0
    assert resp.created_at is not None and resp.created_at.endswith("Z")
    assert fake.requests[-1]["path"] == "/api/chat"
    assert fake.requests[-1]["method"] == "POST"
    assert fake.requests[-1]["body"]["messages"] == messages
    assert fake.requests[-1]["body"]["stream"] is False


async def test_chat_stream(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    parts = [part async for part in await client.chat("llama2", [USER_MSG], stream=True)]
    text = "".join(p.message.content or "" for p in parts)
    assert text == "Echo: hello there fake"
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    assert last.done is True
    assert last.message.content == ""
    assert last.done_reason == "stop"
    assert last.eval_count == len(parts) - 1 == 4
    assert last.prompt_eval_count == 3


async def test_chat_stream_raw_ndjson(fake: FakeOllama) -> None:
    async with (
        httpx.AsyncClient(base_url=fake.url) as http,
        # "stream" omitted: Ollama streams by default.
        http.stream("POST", "/api/chat", json={"model": "llama2", "messages": [USER_MSG]}) as r,
    ):
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert lines[0]["message"] == {"role": "assistant", "content": "Echo: "}


async def test_custom_reply_and_num_predict() -> None:
    async with (
        FakeOllama(models=["mistral:7b"], reply=lambda p: p.upper() + " !") as fake,
        ollama.AsyncClient(host=fake.url) as client,
    ):
        full = await client.chat("mistral:7b", [{"role": "user", "content": "a b c"}])
        assert full.message.content == "A B C !"
        cut = await client.chat(
            "mistral:7b", [{"role": "user", "content": "a b c"}], options={"num_predict": 2}
        )
        assert cut.message.content == "A B "
        assert cut.eval_count == 2
        assert cut.done_reason == "length"
        parts = [
            p
            async for p in await client.generate(
                "mistral:7b", "x y z", stream=True, options={"num_predict": 1}
            )
        ]
        assert [p.response for p in parts] == ["X ", ""]
        assert parts[-1].eval_count == 1


async def test_generate(client: ollama.AsyncClient) -> None:
    resp = await client.generate(model="llama2:latest", prompt="why is the sky blue")
    assert resp.response == "Echo: why is the sky blue"
    assert resp.done is True
    assert resp.prompt_eval_count == 5
    assert resp.eval_count == 6
    parts = [p async for p in await client.generate("llama2", "one two", stream=True)]
    assert "".join(p.response or "" for p in parts) == "Echo: one two"
    assert parts[-1].done is True
    assert parts[-1].eval_count == 3


async def test_embed(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    single = await client.embed(model="llama2", input="hello")
    assert len(single.embeddings) == 1
    vec = list(single.embeddings[0])
    assert len(vec) == 8
    assert math.isclose(math.sqrt(sum(v * v for v in vec)), 1.0, rel_tol=1e-9)
    assert vec == pytest.approx(fake_embedding("hello"))
    batch = await client.embed(model="llama2", input=["hello", "world"])
    assert len(batch.embeddings) == 2
    assert list(batch.embeddings[0]) == pytest.approx(vec)  # deterministic
    assert list(batch.embeddings[1]) != pytest.approx(vec)
    assert fake.requests[-1]["body"]["input"] == ["hello", "world"]


async def test_list_and_pull(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama2:latest"]
    details = listed.models[0].details
    assert details is not None and details.family == "llama"
    assert listed.models[0].digest

    with pytest.raises(ollama.ResponseError):
        await client.chat("phi3", [USER_MSG])

    progress = [p async for p in await client.pull("phi3", stream=True)]
    assert progress[0].status == "pulling manifest"
    assert any(p.status == "downloading" and p.completed == 50 for p in progress)
    assert progress[-1].status == "success"
    done = await client.pull("qwen2:0.5b")
    assert done.status == "success"

    names = [m.model for m in (await client.list()).models]
    assert names == ["llama2:latest", "phi3:latest", "qwen2:0.5b"]
    resp = await client.chat("phi3:latest", [USER_MSG])
    assert resp.message.content == "Echo: hello there fake"


async def test_unknown_model_404(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("nope", [USER_MSG])
    assert info.value.status_code == 404
    assert info.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as info:
        async for _ in await client.generate("nope:7b", "hi", stream=True):
            pytest.fail("no chunk expected")
    assert info.value.status_code == 404


async def test_mid_stream_error(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.fail_mid_stream_next(1)
    # Non-streaming requests do not consume the mid-stream fault.
    ok = await client.chat("llama2", [USER_MSG], stream=False)
    assert ok.done is True
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as info:
        async for part in await client.chat("llama2", [USER_MSG], stream=True):
            received.append(part.message.content or "")
    assert info.value.error == MID_STREAM_ERROR
    assert 1 <= len(received) <= 2
    assert "".join(received) == "".join(split_chunks("Echo: hello there fake")[: len(received)])
    # Next stream is healthy again.
    parts = [p async for p in await client.chat("llama2", [USER_MSG], stream=True)]
    assert parts[-1].done is True


async def test_fail_next_then_recover(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.fail_next(1, 503)
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("llama2", [USER_MSG])
    assert info.value.status_code == 503
    resp = await client.chat("llama2", [USER_MSG])
    assert resp.message.content == "Echo: hello there fake"

    fake.fail_next(2, 500, body="boom")
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as info:
            await client.generate("llama2", "hi")
        assert info.value.status_code == 500
        assert info.value.error == "boom"
    assert (await client.generate("llama2", "hi")).done is True


async def test_fail_next_429_retry_after() -> None:
    async with FakeOllama(retry_after=2) as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.fail_next(1, 429)
        r = await http.post("/api/generate", json={"model": "llama2", "prompt": "x"})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2"
        assert "error" in r.json()
        fake.fail_next(1, 500)
        r = await http.post("/api/generate", json={"model": "llama2", "prompt": "x"})
        assert r.status_code == 500
        assert "Retry-After" not in r.headers


async def test_max_concurrency_queues_requests() -> None:
    async with (
        FakeOllama(max_concurrency=2, latency=0.2) as fake,
        ollama.AsyncClient(host=fake.url) as client,
    ):
        start = time.perf_counter()
        results = await asyncio.gather(
            *(client.chat("llama2", [{"role": "user", "content": f"q{i}"}]) for i in range(6))
        )
        elapsed = time.perf_counter() - start
        assert [r.message.content for r in results] == [f"Echo: q{i}" for i in range(6)]
        assert fake.max_in_flight == 2
        assert fake.in_flight == 0
        assert elapsed >= 0.55
        assert len(fake.requests) == 6


async def test_unbounded_concurrency() -> None:
    async with (
        FakeOllama(latency=0.2) as fake,
        ollama.AsyncClient(host=fake.url) as client,
    ):
        await asyncio.gather(*(client.generate("llama2", "x") for _ in range(4)))
        assert fake.max_in_flight == 4


async def test_hang_next_times_out(fake: FakeOllama) -> None:
    fake.hang_next(1)
    async with ollama.AsyncClient(host=fake.url, timeout=0.3) as client:
        start = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            await client.chat("llama2", [USER_MSG])
        assert time.perf_counter() - start < 5
        # The client gave up; the hung request's slot is freed and the next one works.
        resp = await client.chat("llama2", [USER_MSG])
        assert resp.done is True
    for _ in range(50):
        if fake.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert fake.in_flight == 0


async def test_stop_releases_hung_requests() -> None:
    fake = FakeOllama()
    await fake.start()
    fake.hang_next(1)
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as http:
        pending = asyncio.create_task(
            http.post("/api/chat", json={"model": "llama2", "messages": [USER_MSG]})
        )
        for _ in range(200):
            if fake.in_flight:
                break
            await asyncio.sleep(0.01)
        assert fake.in_flight == 1
        start = time.perf_counter()
        await fake.stop()
        assert time.perf_counter() - start < 3
        try:
            r = await pending
            assert r.status_code == 503
        except httpx.HTTPError:
            pass  # connection closed during shutdown is acceptable too


async def test_token_delay_spreads_chunks() -> None:
    async with (
        FakeOllama(token_delay=0.05) as fake,
        ollama.AsyncClient(host=fake.url) as client,
    ):
        stamps: list[float] = []
        async for _ in await client.generate("llama2", "a b c", stream=True):
            stamps.append(time.perf_counter())
        # 5 chunks ("Echo: ", "a ", "b ", "c") + final line => >= 4 gaps of 0.05 s.
        assert len(stamps) == 5
        assert stamps[-1] - stamps[0] >= 0.15


async def test_bad_requests(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        r = await http.post("/api/chat", content=b"{not json")
        assert r.status_code == 400
        assert "error" in r.json()
        r = await http.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 400
        assert r.json() == {"error": "model is required"}
        r = await http.post("/api/embed", json={"model": "nope", "input": "x"})
        assert r.status_code == 404
    assert [req["path"] for req in fake.requests] == ["/api/chat", "/api/generate", "/api/embed"]
    assert fake.requests[0]["body"] is None


def test_split_chunks_roundtrip() -> None:
    for text in ["", "one", "  lead and trail  ", "a\nb\tc", "Echo: hi there"]:
        assert "".join(split_chunks(text)) == text
    assert split_chunks("Echo: hi there") == ["Echo: ", "hi ", "there"]
