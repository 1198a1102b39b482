"""The fake Ollama server speaks the real protocol: checked with the official client."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import pytest

from tests.fakes.ollama import (
    DEFAULT_JSON_ANSWER,
    MID_STREAM_ERROR,
    PULL_NOT_FOUND,
    FakeOllama,
    fake_embedding,
    split_chunks,
)

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
    assert any((p.status or "").startswith("pulling ") and p.completed == p.total for p in progress)
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


# -------------------------------------------------------------------------- pull


async def test_pull_progress_has_ollamas_shape(fake: FakeOllama) -> None:
    async with (
        httpx.AsyncClient(base_url=fake.url) as http,
        http.stream("POST", "/api/pull", json={"model": "llava"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    assert lines[0] == {"status": "pulling manifest"}
    assert [line["status"] for line in lines[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layers: dict[str, list[dict[str, object]]] = {}
    for line in lines[1:-3]:
        layers.setdefault(str(line["digest"]), []).append(line)
    assert len(layers) >= 2
    for digest, progress in layers.items():
        assert digest.startswith("sha256:") and len(digest) == 7 + 64
        assert {p["status"] for p in progress} == {f"pulling {digest[7:19]}"}
        assert "completed" not in progress[0]  # Ollama omits a zero
        done = [int(str(p["completed"])) for p in progress[1:]]
        assert done == sorted(done) and done[-1] == progress[0]["total"]
    assert fake.has_model("llava:latest")


async def test_pull_adds_the_model_only_at_success(fake: FakeOllama) -> None:
    fake.pull_delay = 0.01
    async with ollama.AsyncClient(host=fake.url) as client:
        statuses = []
        async for part in await client.pull("llava", stream=True):
            statuses.append(part.status)
            assert fake.has_model("llava") is (part.status == "success")
        assert statuses[-1] == "success"
        assert "llava:latest" in [m.model for m in (await client.list()).models]


async def test_pull_unknown_name_fails_like_ollama(fake: FakeOllama) -> None:
    fake.pullable = {"llava:latest", "qwen2:0.5b"}
    async with ollama.AsyncClient(host=fake.url) as client:
        seen: list[str | None] = []
        with pytest.raises(ollama.ResponseError) as info:
            async for part in await client.pull("nosuchmodel", stream=True):
                seen.append(part.status)
        assert seen == ["pulling manifest"]
        assert info.value.error == PULL_NOT_FOUND
        with pytest.raises(ollama.ResponseError) as info:
            await client.pull("nosuchmodel", stream=False)
        assert info.value.status_code == 500
        assert info.value.error == PULL_NOT_FOUND
        assert [m.model for m in (await client.list()).models] == ["llama2:latest"]

        # Names are compared as Ollama does: "llava" is "llava:latest".
        assert (await client.pull("llava")).status == "success"
        assert (await client.pull("qwen2:0.5b", stream=False)).status == "success"
        names = [m.model for m in (await client.list()).models]
        assert names == ["llama2:latest", "llava:latest", "qwen2:0.5b"]


async def test_pull_without_a_name_is_400(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        r = await http.post("/api/pull", json={"stream": True})
    assert r.status_code == 400
    assert r.json() == {"error": "model is required"}


# ------------------------------------------------------------------------ images

# The smallest valid PNG (1x1, transparent): real image bytes, padded base64.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PNG_B64 = base64.b64encode(PNG).decode()


async def test_chat_images_are_recorded_intact(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    other = base64.b64encode(b"\x00\xff" * 100).decode()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "describe"},
        {"role": "user", "content": "what is this", "images": [PNG_B64, other]},
    ]
    resp = await client.chat("llama2", messages)
    assert resp.message.content == "Echo: what is this"
    assert fake.images == [PNG_B64, other]
    assert fake.requests[-1]["body"]["messages"][1]["images"] == [PNG_B64, other]
    # The official client encodes raw bytes itself: they arrive as the same base64.
    await client.chat("llama2", [{"role": "user", "content": "again", "images": [PNG]}])
    assert fake.images == [PNG_B64, other, PNG_B64]
    assert base64.b64decode(fake.images[-1]) == PNG


async def test_generate_images_are_recorded(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    resp = await client.generate("llama2", "what is this", images=[PNG_B64])
    assert resp.response == "Echo: what is this"
    assert fake.requests[-1]["body"]["images"] == [PNG_B64]
    assert fake.images == [PNG_B64]
    fake.reset()
    assert fake.images == []


@pytest.mark.parametrize(
    ("image", "at"),
    [("not base64!", 3), ("data:image/png;base64,AAAA", 4), ("abc", 3), ("ab=c", 4)],
)
async def test_image_that_is_not_strict_base64_is_400(
    fake: FakeOllama, image: str, at: int
) -> None:
    message = {"role": "user", "content": "x", "images": [image]}
    async with httpx.AsyncClient(base_url=fake.url) as http:
        r = await http.post("/api/chat", json={"model": "llama2", "messages": [message]})
        assert r.status_code == 400
        assert r.json() == {"error": f"illegal base64 data at input byte {at}"}
        assert fake.images == [image], "recorded as received, refused or not"
        r = await http.post("/api/generate", json={"model": "llama2", "prompt": "x", "images": 5})
        assert r.status_code == 400
    # Go's decoder skips line breaks, as the fake does.
    wrapped = PNG_B64[:20] + "\r\n" + PNG_B64[20:]
    async with httpx.AsyncClient(base_url=fake.url) as http:
        ok = await http.post(
            "/api/generate", json={"model": "llama2", "prompt": "x", "images": [wrapped]}
        )
    assert ok.status_code == 200


# ------------------------------------------------------------------ format (JSON)


async def test_format_json_answers_json_answer(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    resp = await client.chat("llama2", [USER_MSG], format="json")
    assert json.loads(resp.message.content or "") == DEFAULT_JSON_ANSWER
    assert fake.requests[-1]["body"]["format"] == "json"
    plain = await client.chat("llama2", [USER_MSG])
    assert plain.message.content == "Echo: hello there fake"


async def test_format_schema_answers_the_configured_json(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city"],
    }
    fake.json_answer = {"city": "Paris", "population": 2_102_650, "tags": ["a b", "c"]}
    resp = await client.chat("llama2", [USER_MSG], format=schema)
    assert json.loads(resp.message.content or "") == fake.json_answer
    assert fake.requests[-1]["body"]["format"] == schema
    parts = [p async for p in await client.chat("llama2", [USER_MSG], format=schema, stream=True)]
    assert len(parts) > 2, "streamed in pieces like any answer"
    assert json.loads("".join(p.message.content or "" for p in parts)) == fake.json_answer
    generated = await client.generate("llama2", "x", format="json")
    assert json.loads(generated.response or "") == fake.json_answer


async def test_invalid_format_is_ollamas_error(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        r = await http.post(
            "/api/chat", json={"model": "llama2", "messages": [USER_MSG], "format": "xml"}
        )
        assert r.status_code == 500
        assert "invalid format" in r.json()["error"]
        # An empty format is no format.
        r = await http.post(
            "/api/chat",
            json={"model": "llama2", "messages": [USER_MSG], "format": "", "stream": False},
        )
        assert r.json()["message"]["content"] == "Echo: hello there fake"
