"""Seed 002 end to end: the worker polls the fake task API (OAuth2 with tokens that expire in
a second), embeds through the fake Ollama, and reports every task by PATCH; each PATCH body is
checked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatprocessor.app import build_codec, build_worker
from chatprocessor.contracts.tasks import TaskCodec
from chatprocessor.core.errors import MalformedMessage
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.oauth import client_credentials
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.providers.router import RouterProvider
from chatprocessor.settings import Settings
from chatprocessor.transports.task_api import TaskAPITransport
from tests.fakes.ollama import FakeOllama
from tests.fakes.task_api import CLIENT_ID, CLIENT_SECRET, FakeTaskAPI

pytestmark = pytest.mark.timeout(60)

EMBED_MODEL = "nomic-embed-text"


class Lab:
    def __init__(self, api: FakeTaskAPI, fake: FakeOllama) -> None:
        self.api = api
        self.fake = fake

    def embed_calls(self) -> list[dict[str, Any]]:
        return [r for r in self.fake.requests if r["path"] == "/api/embed"]

    async def patched(self, n: int, timeout: float = 15) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.api.patches) < n:
            assert time.monotonic() < deadline, f"{len(self.api.patches)} of {n} PATCHes"
            await asyncio.sleep(0.02)
        return list(self.api.patches)


@pytest.fixture
async def start(fake_ollama: FakeOllama) -> AsyncIterator[Callable[..., Any]]:
    fake_ollama.add_model(EMBED_MODEL)
    running: list[tuple[asyncio.Event, asyncio.Task[None], Worker, FakeTaskAPI]] = []

    async def factory(*, supported_models: list[str] | None = None, expires_in: float = 1) -> Lab:
        api = FakeTaskAPI(expires_in=expires_in)
        await api.start()
        auth = client_credentials(api.token_url, CLIENT_ID, CLIENT_SECRET, early_expiry=0.2)
        provider = OllamaProvider(
            fake_ollama.url, model="llama2", embedding_model=EMBED_MODEL, timeout=5
        )
        worker = Worker(
            TaskAPITransport(api.url, auth, polling_interval=0.1, request_timeout=5),
            RouterProvider([provider], fail_max=5, reset_timeout=30),
            TaskCodec(max_bytes=1_048_576, supported_models=supported_models),
            WorkerConfig(
                input_queue="ai-tasks",
                output_queue="ai-tasks",
                prefetch=5,
                retry=RetryPolicy(max_retries=1, base=0.05, cap=0.1),
            ),
        )
        await worker.start()
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(worker.run(stop)), worker, api))
        return Lab(api, fake_ollama)

    yield factory
    for stop, task, worker, api in running:
        stop.set()
        await task
        await worker.transport.close()
        await worker.provider.close()
        await api.stop()


async def test_each_task_is_embedded_and_reported_once(start: Callable[..., Any]) -> None:
    lab: Lab = await start()
    ids = [lab.api.add_task(content={"text": f"text {i}", "model": EMBED_MODEL}) for i in range(3)]
    patches = dict(await lab.patched(3))
    assert sorted(patches) == sorted(ids)
    for body in patches.values():
        assert body["state"] == "succeeded"
        result = body["result"]
        assert result["model"] == EMBED_MODEL and result["provider"] == "ollama"
        assert len(result["embedding"]) == result["dimensions"] > 0
        assert all(isinstance(x, float) for x in result["embedding"])
        assert "mock" not in result
    assert len(lab.embed_calls()) == 3  # polled every 0.1 s, yet each task embedded once
    await asyncio.sleep(0.3)
    assert len(lab.api.patches) == 3


async def test_tokens_expire_and_are_fetched_again(start: Callable[..., Any]) -> None:
    lab: Lab = await start(expires_in=0.5)
    first = lab.api.add_task(content={"text": "one", "model": EMBED_MODEL})
    await lab.patched(1)
    await asyncio.sleep(0.8)  # the token expired meanwhile
    second = lab.api.add_task(content={"text": "two", "model": EMBED_MODEL})
    patches = dict(await lab.patched(2))
    assert patches[first]["state"] == patches[second]["state"] == "succeeded"
    assert lab.api.token_requests >= 2


async def test_a_401_gets_one_retry_with_a_fresh_token(start: Callable[..., Any]) -> None:
    lab: Lab = await start(expires_in=60)
    await asyncio.sleep(0.3)  # has a token
    lab.api.reject_next_requests(1)
    task = lab.api.add_task(content={"text": "x", "model": EMBED_MODEL})
    [(patched, body)] = await lab.patched(1)
    assert patched == task and body["state"] == "succeeded"


async def test_a_failed_patch_is_retried_and_the_task_not_processed_again(
    start: Callable[..., Any],
) -> None:
    lab: Lab = await start()
    lab.api.fail_next_patches(2, status=503)
    task = lab.api.add_task(content={"text": "keep trying", "model": EMBED_MODEL})
    [(patched, body)] = await lab.patched(1, timeout=20)
    assert patched == task and body["state"] == "succeeded"
    statuses = [attempt[-1] for attempt in lab.api.patch_attempts]
    assert statuses.count(503) == 2
    assert len(lab.embed_calls()) == 1  # polled meanwhile, never embedded twice


async def test_bad_tasks_are_reported_failed_with_a_clear_error(start: Callable[..., Any]) -> None:
    lab: Lab = await start(supported_models=[EMBED_MODEL])
    unknown = lab.api.add_task(type="image_caption", content={"text": "x"})
    not_allowed = lab.api.add_task(content={"text": "x", "model": "all-minilm"})
    patches = dict(await lab.patched(2))
    assert patches[unknown]["state"] == "failed"
    assert "unknown task type 'image_caption'" in patches[unknown]["error"]
    assert patches[not_allowed]["state"] == "failed"
    assert "SUPPORTED_MODELS" in patches[not_allowed]["error"]
    assert lab.embed_calls() == []


async def test_configured_from_settings_and_over_the_rate_limit_a_task_waits(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """The app builds the door from seed 002's variables; with 2 tasks a minute allowed, the
    third waits (it is not failed) while the first two are reported."""
    fake_ollama.add_model(EMBED_MODEL)
    async with FakeTaskAPI(expires_in=60) as api:
        settings = Settings.load(
            transport="tasks",
            api_base_url=api.url,
            oauth2_token_url=api.token_url,
            oauth2_client_id=CLIENT_ID,
            oauth2_client_secret=CLIENT_SECRET,
            processing_mode="ollama",
            ollama_base_url=fake_ollama.url,
            supported_models='["nomic-embed-text","all-minilm"]',
            polling_interval_seconds=0.1,
            rate_limit_per_minute=2,
            graceful_timeout=0.5,  # the waiting task goes back to the API at the stop
            data_dir=tmp_path,
            ops_port=0,
        )
        worker = build_worker(settings)
        await worker.start()
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            for i in range(3):
                api.add_task(content={"text": f"text {i}", "model": EMBED_MODEL})
            lab = Lab(api, fake_ollama)
            await lab.patched(2)
            await asyncio.sleep(1.0)
            assert len(api.patches) == 2  # the third waits for the next minute
            assert all(body["state"] == "succeeded" for _, body in api.patches)
            health = await worker.health_details()  # what /health adds
            assert health["rate_limits"]["minute"]["used"] == 2
            assert health["rate_limits"]["minute"]["limit"] == 2
            assert (
                REGISTRY.get_sample_value("chatprocessor_rate_limit_used", {"period": "minute"})
                == 2
            )
        finally:
            stop.set()
            await running
            await worker.transport.close()
            await worker.provider.close()
            await worker.store.close()
            if worker.limiter is not None:
                await worker.limiter.close()


async def test_in_ollama_mode_the_supported_models_are_pulled_at_start(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    async with FakeTaskAPI() as api:
        settings = Settings.load(
            transport="tasks",
            api_base_url=api.url,
            oauth2_token_url=api.token_url,
            oauth2_client_id=CLIENT_ID,
            oauth2_client_secret=CLIENT_SECRET,
            processing_mode="hybrid",
            ollama_base_url=fake_ollama.url,
            supported_models="nomic-embed-text, all-minilm",
            data_dir=tmp_path,
        )
        worker = build_worker(settings)
        await worker.start()
        try:
            assert fake_ollama.has_model("nomic-embed-text") and fake_ollama.has_model("all-minilm")
        finally:
            await worker.transport.close()
            await worker.provider.close()
            await worker.store.close()


async def run_one_task(settings: Settings, api: FakeTaskAPI, content: dict[str, Any]) -> Any:
    worker = build_worker(settings)
    await worker.start()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        task = api.add_task(content=content)
        deadline = time.monotonic() + 60
        while not api.patches:
            assert time.monotonic() < deadline, "no PATCH"
            await asyncio.sleep(0.05)
        [(patched, body)] = api.patches
        assert patched == task
        return body
    finally:
        stop.set()
        await running
        await worker.transport.close()
        await worker.provider.close()
        await worker.store.close()


@pytest.mark.embedded
@pytest.mark.timeout(180)
async def test_real_embeddings_from_the_embedded_model_and_from_llama_cpp_server(
    tmp_path: Path,
) -> None:
    """The seed 002 flow with real vectors: the bundled model in process, then the official
    openai client against python -m llama_cpp.server serving the same model."""
    from tests.integration.test_openai_llama_server import llama_server

    async with FakeTaskAPI(expires_in=60) as api:
        base = {"transport": "tasks", "api_base_url": api.url, "polling_interval_seconds": 0.1}
        base |= {"oauth2_token_url": api.token_url, "oauth2_client_id": CLIENT_ID}
        base |= {"oauth2_client_secret": CLIENT_SECRET, "data_dir": tmp_path}
        local = await run_one_task(
            Settings.load(providers=["embedded"], **base), api, {"text": "The capital of France"}
        )
        assert local["state"] == "succeeded", local
        assert local["result"]["provider"] == "embedded" and local["result"]["dimensions"] > 100
        api.patches.clear()
        with llama_server(tmp_path, "--embedding", "true") as (url, model):
            served = await run_one_task(
                Settings.load(
                    processing_mode="openai",
                    openai_base_url=url,
                    openai_embedding_model=model,
                    idempotency_ttl=0,
                    **base,
                ),
                api,
                {"text": "The capital of France"},
            )
        assert served["state"] == "succeeded", served
        assert served["result"]["provider"] == "openai"
        a, b = local["result"]["embedding"], served["result"]["embedding"]
        assert len(a) == len(b)
        assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.99  # the same model, unit vectors


def test_supported_models_guard_local_providers_only() -> None:
    models = "nomic-embed-text"

    def codec(mode: str) -> Any:
        return build_codec(
            Settings.load(transport="tasks", processing_mode=mode, supported_models=models)
        )

    local, cloud = codec("hybrid"), codec("openai")
    task = b'{"_id": "t1", "type": "text_embedding", '
    task += b'"content": {"text": "x", "model": "text-embedding-3-large"}}'
    with pytest.raises(MalformedMessage, match="SUPPORTED_MODELS"):
        local.decode(task)
    assert cloud.decode(task).model == "text-embedding-3-large"
