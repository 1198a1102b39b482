"""Seed 001 end to end: requests on the Kafka topic, the fake Ollama, replies on their topics.

Kafka is the in-memory cluster of tests/fakes/kafka.py (no Kafka broker can be installed on
these machines); the worker, the contract, the sanitizer and the vision checks are the real
ones, wired by the app from settings as a user would set them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from chatprocessor.app import build_codec
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers import build_providers
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.settings import Settings
from chatprocessor.transports.kafka import KafkaTransport, dead_letter_topic
from tests.fakes.kafka import FakeKafka
from tests.fakes.ollama import FakeOllama

pytestmark = pytest.mark.timeout(60)

TOPIC = "eater-send-photo"
PHOTO_TOPIC = "photo-analysis-response"
TEXT_TOPIC = "gemini-response"
MODEL = "llava:latest"
#: The seed's own example of a photo analysis.
PIZZA = {
    "dish_name": "Pizza",
    "estimated_avg_calories": 285,
    "ingredients": ["cheese", "tomato sauce", "dough"],
    "total_avg_weight": 200,
    "contains": {"protein": 12.0, "carbs": 36.0, "fat": 10.0},
}


def png_base64(size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 80, 40)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Lab:
    def __init__(self, cluster: FakeKafka, fake: FakeOllama) -> None:
        self.cluster = cluster
        self.fake = fake

    def send(self, key: str, value: dict[str, Any] | bytes) -> None:
        body = value if isinstance(value, bytes) else orjson.dumps(value)
        self.cluster.append(TOPIC, body, key.encode(), [])

    def replies(self, topic: str) -> list[tuple[bytes | None, dict[str, Any]]]:
        return [(r.key, orjson.loads(r.value)) for r in self.cluster.records(topic)]

    def chat_calls(self) -> list[dict[str, Any]]:
        return [r for r in self.fake.requests if r["path"] == "/api/chat"]


@pytest.fixture
async def start(fake_ollama: FakeOllama) -> AsyncIterator[Callable[..., Any]]:
    fake_ollama.add_model(MODEL)
    running: list[tuple[asyncio.Event, asyncio.Task[None], Worker]] = []

    async def factory(**settings: Any) -> Lab:
        cluster = FakeKafka()
        config = Settings.load(transport="kafka", ollama_model=MODEL, **settings)
        worker = Worker(
            KafkaTransport(cluster.clients(), group_id=config.consumer_group),
            OllamaProvider(fake_ollama.url, model=MODEL, timeout=5, connect_timeout=1),
            build_codec(config),
            WorkerConfig(
                input_queue=config.local_model_kafka_topic,
                output_queue=config.text_response_topic,
                prefetch=4,
                retry=RetryPolicy(max_retries=1, base=0.05, cap=0.1),
            ),
        )
        await worker.start()
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(worker.run(stop)), worker))
        return Lab(cluster, fake_ollama)

    yield factory
    for stop, task, worker in running:
        stop.set()
        await task
        await worker.transport.close()
        await worker.provider.close()


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_text_request_is_answered_on_the_text_topic_with_its_key(
    start: Callable[..., Any],
) -> None:
    lab: Lab = await start()
    lab.send("req-1", {"user_email": "user@example.com", "prompt": "Say hello"})
    await until(lambda: len(lab.replies(TEXT_TOPIC)) == 1)
    [(key, reply)] = lab.replies(TEXT_TOPIC)
    assert key == b"req-1"
    assert reply == {
        "user_email": "user@example.com",
        "response": "Echo: Say hello",
        "model": MODEL,
    }
    assert lab.replies(PHOTO_TOPIC) == []


async def test_a_photo_is_analysed_and_the_analysis_is_the_models_json(
    start: Callable[..., Any],
) -> None:
    lab: Lab = await start()
    lab.fake.json_answer = PIZZA
    photo = png_base64()
    seed_request = {
        "key": "unique-request-id",
        "value": {
            "user_email": "user@example.com",
            "prompt": "Analyze this food image and provide nutritional information",
            "photo": photo,
        },
    }
    lab.send("unique-request-id", seed_request)
    await until(lambda: len(lab.replies(PHOTO_TOPIC)) == 1)
    [(key, reply)] = lab.replies(PHOTO_TOPIC)
    assert key == b"unique-request-id"
    assert reply["user_email"] == "user@example.com"
    assert isinstance(reply["analysis"], str)  # a JSON string, as the seed shows
    assert orjson.loads(reply["analysis"]) == PIZZA
    [call] = lab.chat_calls()
    [message] = call["body"]["messages"]
    assert message["images"] == [photo]  # the image arrived intact
    assert call["body"]["format"]["required"]  # the food-analysis schema was asked for


async def test_a_photo_is_downscaled_before_it_is_sent(start: Callable[..., Any]) -> None:
    lab: Lab = await start(image_max_side=100)
    lab.fake.json_answer = PIZZA
    lab.send(
        "big",
        {"user_email": "u@example.com", "prompt": "What is it?", "photo": png_base64((400, 200))},
    )
    await until(lambda: len(lab.replies(PHOTO_TOPIC)) == 1)
    [sent] = lab.chat_calls()[0]["body"]["messages"][0]["images"]
    assert Image.open(io.BytesIO(base64.b64decode(sent))).size == (100, 50)


async def test_other_users_records_are_skipped_and_counted(start: Callable[..., Any]) -> None:
    lab: Lab = await start(expected_user_email="me@example.com")
    skipped = metric("chatprocessor_messages_total", outcome="skipped")
    lab.send("a", {"user_email": "someone@else.com", "prompt": "hi"})
    lab.send("b", {"user_email": "ME@example.com", "prompt": "mine"})
    await until(lambda: len(lab.replies(TEXT_TOPIC)) == 1)
    await until(lambda: metric("chatprocessor_messages_total", outcome="skipped") == skipped + 1)
    [(key, reply)] = lab.replies(TEXT_TOPIC)
    assert key == b"b" and reply["response"] == "Echo: mine"
    assert len(lab.chat_calls()) == 1  # the other user's record never reached the model


async def test_a_bad_photo_is_dead_lettered_and_the_user_told(start: Callable[..., Any]) -> None:
    lab: Lab = await start()
    lab.send("bad", {"user_email": "user@example.com", "prompt": "Food?", "photo": "not base64!"})
    await until(lambda: len(lab.cluster.records(dead_letter_topic(TOPIC))) == 1)
    await until(lambda: len(lab.replies(PHOTO_TOPIC)) == 1)
    [(key, reply)] = lab.replies(PHOTO_TOPIC)
    assert key == b"bad" and reply["user_email"] == "user@example.com"
    assert "base64" in reply["error"]
    [letter] = lab.cluster.records(dead_letter_topic(TOPIC))
    assert dict(letter.headers)["x-dead-letter-reason"] == b"rejected"
    assert lab.chat_calls() == []


async def test_an_answer_without_json_is_asked_again_once_then_fails_clearly(
    start: Callable[..., Any],
) -> None:
    lab: Lab = await start()
    lab.fake.json_answer = "I cannot see any food here."  # a bare string, twice
    lab.send("p", {"user_email": "user@example.com", "prompt": "Food?", "photo": png_base64()})
    await until(lambda: len(lab.replies(PHOTO_TOPIC)) == 1)
    [(_, reply)] = lab.replies(PHOTO_TOPIC)
    assert "even after one repair attempt" in reply["error"]
    calls = lab.chat_calls()
    assert len(calls) == 2  # the answer, then one repair; permanent: no retries
    repair = calls[1]["body"]["messages"]
    assert repair[-2]["role"] == "assistant" and repair[-1]["role"] == "user"
    assert len(lab.cluster.records(dead_letter_topic(TOPIC))) == 1


async def test_a_text_request_without_a_prompt_is_rejected(start: Callable[..., Any]) -> None:
    lab: Lab = await start()
    lab.send("empty", {"user_email": "user@example.com"})
    await until(lambda: len(lab.replies(TEXT_TOPIC)) == 1)
    [(_, reply)] = lab.replies(TEXT_TOPIC)
    assert "needs a prompt" in reply["error"] and reply["model"] == MODEL


async def test_ready_says_when_the_model_is_missing_and_start_up_can_pull_it(
    fake_ollama: FakeOllama,
) -> None:
    """/ready checks the model is in /api/tags; PULL_MISSING_MODELS pulls it at start-up."""
    missing = "llava:13b"

    def worker(pull: bool) -> Worker:
        return Worker(
            KafkaTransport(FakeKafka().clients(), group_id="g"),
            build_providers(
                Settings.load(
                    providers=["ollama"], ollama_base_url=fake_ollama.url, ollama_model=missing
                )
            ),
            build_codec(Settings.load(transport="kafka")),
            WorkerConfig(input_queue=TOPIC, output_queue=TEXT_TOPIC, pull_missing_models=pull),
        )

    plain = worker(pull=False)
    await plain.start()
    assert await plain.readiness() == {"broker": True, "provider": True, "model": False}
    pulling = worker(pull=True)
    await pulling.start()
    assert fake_ollama.has_model(missing)
    assert await pulling.readiness() == {"broker": True, "provider": True, "model": True}
    for w in (plain, pulling):
        await w.transport.close()
        await w.provider.close()
