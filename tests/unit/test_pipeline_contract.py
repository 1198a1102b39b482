"""Seed 004's wire contract: AIJob bytes to a Job, a Result to AIResponse bytes, lanes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatprocessor.contracts.pipeline import (
    JOB_TYPES,
    LANES,
    PipelineCodec,
    ai_job,
    lane_for,
    response_message_id,
    system_prompt,
)
from chatprocessor.core.errors import MalformedMessage, MessageTooLarge
from chatprocessor.core.job import ChatMessage, Job, Result

MAX_BYTES = 65536


@pytest.fixture
def codec() -> PipelineCodec:
    return PipelineCodec(max_bytes=MAX_BYTES, currency="EUR")


def dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "job-1",
        "tenantId": "acme",
        "conversationId": "conv-1",
        "messageId": "msg-1",
        "type": "chat_response",
        "payload": {"content": "Where is my order?"},
    }
    data.update(overrides)
    return data


FULL: dict[str, Any] = {
    "id": "job-42",
    "tenantId": "acme",
    "conversationId": 1234,
    "messageId": 987,
    "type": "sentiment_analysis",
    "priority": 9,
    "payload": {
        "content": "The parcel never came.",
        "context": [
            {"sender": "visitor", "content": "Hi"},
            {"sender": "bot", "content": "Hello! How can I help?"},
            {"role": "customer", "content": "I ordered last week"},
            {"sender": "agent", "content": "Let me check"},
            {"sender": "System", "content": "Order 17 shipped"},
            {"sender": "robot-x", "content": "beep"},
        ],
        "chatbotConfig": {
            "model": "gpt-4",
            "temperature": 0.3,
            "maxTokens": 256,
            "systemPrompt": "You are Acme's support assistant.",
            "personality": "friendly",
            "cache": False,
            "intents": ["refund", "tracking"],
            "classify": True,
            "someOtherSetting": "ignored",
        },
        "visitorMetadata": {"country": "FR", "visits": 3},
    },
    "metadata": {"retryCount": 1, "costEstimate": 0.002},
    "unknownTopLevel": {"x": 1},
}


# --- decode ---------------------------------------------------------------------------------


def test_decode_full_job(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(FULL), reply_to="replies", correlation_id="corr-1")

    assert job.id == "job-42"
    assert job.tenant == "acme"
    assert job.conversation_id == 1234  # an int stays an int
    assert job.kind == "sentiment_analysis"
    assert job.priority == 9
    assert job.prompt == "The parcel never came."
    assert job.model == "gpt-4"
    assert job.temperature == 0.3
    assert job.max_tokens == 256
    assert job.system_prompt == (
        "You are Acme's support assistant.\n\nPersonality: answer in a friendly manner."
    )
    assert job.user_id is None
    assert job.stream is False
    assert job.format is None
    assert job.reply_to == "replies"
    assert job.correlation_id == "corr-1"
    assert job.meta["type"] == "sentiment_analysis"
    assert job.meta["message_id"] == "987"  # a numeric id becomes text
    assert job.meta["personality"] == "friendly"
    assert job.meta["cache"] is False
    assert job.meta["intents"] == ["refund", "tracking"]
    assert job.meta["classify"] is True
    assert job.meta["visitor_metadata"] == {"country": "FR", "visits": 3}
    assert job.meta["cost_estimate"] == 0.002
    assert job.meta["retry_count"] == 1
    assert "timeout" not in job.meta


def test_decode_minimal_job_uses_defaults(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(minimal()))

    assert (job.id, job.tenant, job.conversation_id) == ("job-1", "acme", "conv-1")
    assert job.priority == 5
    assert job.kind == "chat_response"
    assert job.context == ()
    assert job.model is None
    assert job.temperature is None
    assert job.max_tokens is None
    assert job.system_prompt is None
    assert job.meta == {
        "type": "chat_response",
        "message_id": "msg-1",
        "personality": None,
        "cache": None,
        "intents": None,
        "classify": None,
        "visitor_metadata": None,
        "cost_estimate": 0.0,
        "retry_count": 0,
    }


def test_null_optional_sections_are_defaults(codec: PipelineCodec) -> None:
    data = minimal(metadata=None)
    data["payload"].update(context=None, chatbotConfig=None, visitorMetadata=None)
    job = codec.decode(dumps(data))
    assert job.context == ()
    assert job.system_prompt is None
    assert job.meta["cost_estimate"] == 0.0


def test_snake_case_names_are_accepted(codec: PipelineCodec) -> None:
    deadline = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    body = {
        "id": 77,
        "tenant_id": "acme",
        "conversation_id": "c-9",
        "message_id": "m-9",
        "type": "intent_classification",
        "priority": 2,
        "payload": {
            "content": "cancel my plan",
            "chatbot_config": {"max_tokens": 64, "system_prompt": "Be brief.", "cache": True},
            "visitor_metadata": ["a"],
        },
        "metadata": {"cost_estimate": 1.5, "processing_deadline": deadline},
    }
    job = codec.decode(dumps(body))
    assert job.id == "77"
    assert job.tenant == "acme"
    assert job.conversation_id == "c-9"
    assert job.meta["message_id"] == "m-9"
    assert job.max_tokens == 64
    assert job.system_prompt == "Be brief."
    assert job.meta["cache"] is True
    assert job.meta["visitor_metadata"] == ["a"]
    assert job.meta["cost_estimate"] == 1.5
    assert 0 < job.meta["timeout"] <= 300


def test_context_senders_map_to_model_roles(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(FULL))
    assert job.context == (
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello! How can I help?"),
        ChatMessage("user", "I ordered last week"),
        ChatMessage("assistant", "Let me check"),
        ChatMessage("system", "Order 17 shipped"),
        ChatMessage("user", "beep"),  # an unknown sender is the user
    )


def test_messages_order_is_system_context_then_user(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(FULL))
    messages = job.messages("default prompt")
    assert [m.role for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "system",
        "user",
        "user",
    ]
    assert messages[0].content.startswith("You are Acme's support assistant.")
    assert messages[1].content == "Hi"
    assert messages[-1] == ChatMessage("user", "The parcel never came.")


def test_personality_alone_becomes_the_system_prompt(codec: PipelineCodec) -> None:
    data = minimal()
    data["payload"]["chatbotConfig"] = {"personality": "formal"}
    job = codec.decode(dumps(data))
    assert job.system_prompt == "Personality: answer in a formal manner."
    assert job.messages()[0] == ChatMessage("system", "Personality: answer in a formal manner.")


@pytest.mark.parametrize(
    ("prompt", "personality", "expected"),
    [
        (None, None, None),
        ("Be kind.", None, "Be kind."),
        (None, "cheerful", "Personality: answer in a cheerful manner."),
        ("Be kind.", "cheerful", "Be kind.\n\nPersonality: answer in a cheerful manner."),
        ("Be kind.", "   ", "Be kind."),
        ("", None, ""),  # an explicit empty prompt still overrides the worker's default
    ],
)
def test_system_prompt(prompt: str | None, personality: str | None, expected: str | None) -> None:
    assert system_prompt(prompt, personality) == expected


def test_processing_deadline_becomes_a_timeout(codec: PipelineCodec) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=90)
    job = codec.decode(dumps(minimal(metadata={"processingDeadline": deadline.isoformat()})))
    assert 60 < job.meta["timeout"] <= 90


def test_naive_deadline_is_utc(codec: PipelineCodec) -> None:
    naive = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    job = codec.decode(dumps(minimal(metadata={"processingDeadline": naive})))
    assert 3500 < job.meta["timeout"] <= 3600


def test_past_processing_deadline_is_rejected(codec: PipelineCodec) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    with pytest.raises(MalformedMessage, match="processingDeadline has passed"):
        codec.decode(dumps(minimal(metadata={"processingDeadline": past})))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "summarize"}, "type"),
        ({"priority": 0}, "priority"),
        ({"priority": 11}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"payload": {"content": "   "}}, "payload.content"),
        ({"payload": {}}, "payload.content"),
        ({"payload": {"content": "hi", "context": [{"sender": "bot"}]}}, "payload.context.0"),
        ({"payload": {"content": "hi", "chatbotConfig": {"temperature": 3}}}, "temperature"),
        ({"payload": {"content": "hi", "chatbotConfig": {"maxTokens": 0}}}, "maxTokens"),
        ({"id": ""}, "id"),
        ({"id": "x" * 201}, "id"),
        ({"tenantId": None}, "tenantId"),
        ({"conversationId": True}, "conversationId"),
        ({"metadata": {"costEstimate": -1}}, "costEstimate"),
        ({"metadata": {"processingDeadline": "tomorrow"}}, "processingDeadline"),
    ],
)
def test_invalid_fields_are_rejected_naming_the_field(
    codec: PipelineCodec, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(MalformedMessage, match="not an AIJob") as caught:
        codec.decode(dumps(minimal(**change)))
    assert field in str(caught.value)


@pytest.mark.parametrize("missing", ["id", "tenantId", "conversationId", "messageId", "type"])
def test_required_fields(codec: PipelineCodec, missing: str) -> None:
    data = minimal()
    del data[missing]
    with pytest.raises(MalformedMessage, match=f"{missing}: Field required"):
        codec.decode(dumps(data))


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_not_a_json_object(codec: PipelineCodec, body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        codec.decode(body)


def test_too_large_is_refused_before_parsing() -> None:
    codec = PipelineCodec(max_bytes=100)
    with pytest.raises(MessageTooLarge, match="over MAX_MESSAGE_BYTES=100"):
        codec.decode(b"{" + b" " * 200 + b"}")


def test_deeply_nested_visitor_metadata_is_refused(codec: PipelineCodec) -> None:
    deep: Any = 1
    for _ in range(60):
        deep = {"k": deep}
    data = minimal()
    data["payload"]["visitorMetadata"] = deep
    with pytest.raises(MalformedMessage, match="nested deeper"):
        codec.decode(dumps(data))


# --- error_job ------------------------------------------------------------------------------


def test_error_job_from_a_bad_request(codec: PipelineCodec) -> None:
    body = dumps(minimal(priority=42, conversationId=5, messageId=8))
    with pytest.raises(MalformedMessage):
        codec.decode(body)
    job = codec.error_job(body, reply_to="replies", correlation_id="c")
    assert job is not None
    assert (job.id, job.conversation_id, job.tenant) == ("job-1", 5, "acme")
    assert job.meta == {"message_id": "8", "type": "chat_response"}
    assert (job.reply_to, job.correlation_id) == ("replies", "c")

    reply = orjson.loads(codec.reply(job, Result("", "", error="bad priority", status="rejected")))
    assert reply["status"] == "rejected"
    assert reply["inReplyTo"] == "8"
    assert reply["conversationId"] == 5
    assert reply["error"] == {"code": "rejected", "message": "bad priority"}


def test_error_job_defaults_and_snake_case(codec: PipelineCodec) -> None:
    job = codec.error_job(dumps({"id": 3, "conversation_id": "c", "type": "nonsense"}))
    assert job is not None
    assert (job.id, job.conversation_id, job.tenant) == ("3", "c", "default")
    assert job.meta == {}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        dumps({"conversationId": "c"}),  # no id
        dumps({"id": "j"}),  # no conversation
        dumps({"id": "j", "conversationId": True}),
        dumps({"id": "j", "conversationId": ""}),
        dumps({"id": "x" * 201, "conversationId": "c"}),
    ],
)
def test_error_job_needs_id_and_conversation(codec: PipelineCodec, body: bytes) -> None:
    assert codec.error_job(body) is None


def test_error_job_of_an_oversized_body_is_none() -> None:
    codec = PipelineCodec(max_bytes=50)
    assert codec.error_job(dumps(minimal())) is None


# --- reply ----------------------------------------------------------------------------------


def test_reply_for_a_completed_job(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(FULL))
    result = Result(
        text='{"sentiment": "negative"}',
        model_used="gpt-4",
        prompt_tokens=120,
        completion_tokens=30,
        latency_ms=850,
        provider="openai",
        cost=0.0054,
        cached=True,
        analysis={
            "intent": "tracking",
            "sentiment": "negative",
            "confidence": 0.82,
            "suggestedActions": ["escalate"],
        },
    )
    reply = orjson.loads(codec.reply(job, result))
    assert reply == {
        "jobId": "job-42",
        "tenantId": "acme",
        "conversationId": 1234,
        "messageId": "job-42:response",
        "inReplyTo": "987",
        "type": "sentiment_analysis",
        "status": "completed",
        "content": '{"sentiment": "negative"}',
        "intent": "tracking",
        "sentiment": "negative",
        "confidence": 0.82,
        "suggestedActions": ["escalate"],
        "metadata": {
            "model": "gpt-4",
            "provider": "openai",
            "processingTime": 850,
            "cached": True,
            "tokenUsage": {"promptTokens": 120, "completionTokens": 30, "totalTokens": 150},
            "cost": 0.0054,
            "currency": "EUR",
        },
        "error": None,
    }


def test_reply_without_analysis_or_usage(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(minimal()))
    reply = orjson.loads(codec.reply(job, Result("Hello", "m")))
    assert reply["content"] == "Hello"
    assert reply["conversationId"] == "conv-1"
    assert (reply["intent"], reply["sentiment"], reply["confidence"]) == (None, None, None)
    assert reply["suggestedActions"] == []
    assert reply["metadata"]["tokenUsage"] == {
        "promptTokens": 0,
        "completionTokens": 0,
        "totalTokens": 0,
    }
    assert reply["metadata"]["processingTime"] == 0
    assert reply["metadata"]["cost"] is None
    assert reply["metadata"]["cached"] is False


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("over_budget", "over_budget"),
        ("forbidden", "forbidden"),
        ("rejected", "rejected"),
        ("failed", "failed"),
        ("completed", "failed"),
        ("timeout", "failed"),
    ],
)
def test_reply_for_an_error(codec: PipelineCodec, status: str, expected: str) -> None:
    job = codec.decode(dumps(minimal()))
    result = Result("partial text", "m", error="tenant acme is over its budget", status=status)
    reply = orjson.loads(codec.reply(job, result))
    assert reply["status"] == expected
    assert reply["content"] == ""
    assert reply["error"] == {"code": expected, "message": "tenant acme is over its budget"}
    assert reply["messageId"] == "job-1:error"
    assert reply["inReplyTo"] == "msg-1"
    assert reply["metadata"]["currency"] == "EUR"


def test_reply_ids_are_deterministic_and_distinct_for_errors() -> None:
    assert response_message_id("j") == response_message_id("j") == "j:response"
    assert response_message_id("j", error=True) != response_message_id("j")


def test_partial_answer_keeps_its_status(codec: PipelineCodec) -> None:
    job = codec.decode(dumps(minimal()))
    reply = orjson.loads(codec.reply(job, Result("Half an ans", "m", status="timeout")))
    assert (reply["status"], reply["content"], reply["error"]) == ("timeout", "Half an ans", None)


def test_encode_chunk(codec: PipelineCodec) -> None:
    assert orjson.loads(codec.encode_chunk(7, 2, "lo")) == {
        "conversationId": 7,
        "index": 2,
        "delta": "lo",
    }


def test_codec_flags(codec: PipelineCodec) -> None:
    assert codec.decode_in_thread is False
    assert codec.emits_events is False


# --- lanes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "job_type", "lane"),
    [
        (7, "chat_response", "standard"),
        (8, "chat_response", "high"),
        (10, "sentiment_analysis", "high"),
        (1, "intent_classification", "standard"),
        (9, "batch_processing", "high"),
        (3, "batch_processing", "batch"),
        (7, "batch_processing", "batch"),
    ],
)
def test_lane_for(priority: int, job_type: str, lane: str) -> None:
    assert lane_for(priority, job_type) == lane


def test_lane_for_custom_threshold() -> None:
    assert lane_for(6, "chat_response", high_min=6) == "high"
    assert lane_for(5, "chat_response", high_min=6) == "standard"


def test_codec_lane(codec: PipelineCodec) -> None:
    assert codec.lane(codec.decode(dumps(FULL))) == "high"
    assert codec.lane(codec.decode(dumps(minimal(type="batch_processing")))) == "batch"
    assert codec.lane(Job(id="j", conversation_id=1, prompt="p")) == "standard"  # no priority
    assert PipelineCodec(max_bytes=MAX_BYTES, high_min=5).lane(Job("j", 1, "p")) == "high"


# --- ai_job ---------------------------------------------------------------------------------


def test_ai_job_round_trip(codec: PipelineCodec) -> None:
    data = ai_job(
        id="row-17",
        tenant_id="acme",
        conversation_id=55,
        message_id="m-17",
        type="batch_processing",
        content="Summarise this ticket",
        priority=3,
        context=[{"sender": "visitor", "content": "ticket text"}],
        chatbot_config={"model": "small", "personality": "concise"},
        cost_estimate=0.01,
    )
    assert data["tenantId"] == "acme"
    assert data["payload"]["chatbotConfig"] == {"model": "small", "personality": "concise"}
    job = codec.decode(dumps(data))
    assert (job.id, job.tenant, job.conversation_id) == ("row-17", "acme", 55)
    assert job.meta["message_id"] == "m-17"
    assert job.kind == "batch_processing"
    assert job.priority == 3
    assert job.prompt == "Summarise this ticket"
    assert job.context == (ChatMessage("user", "ticket text"),)
    assert job.model == "small"
    assert job.system_prompt == "Personality: answer in a concise manner."
    assert job.meta["cost_estimate"] == 0.01
    assert codec.lane(job) == "batch"


def test_ai_job_minimal_has_no_optional_sections() -> None:
    data = ai_job(
        id="j",
        tenant_id="t",
        conversation_id="c",
        message_id="m",
        type="chat_response",
        content="x",
    )
    assert "context" not in data["payload"]
    assert data["metadata"] == {"retryCount": 0}
    assert data["priority"] == 5


@given(
    priority=st.integers(min_value=1, max_value=10),
    job_type=st.sampled_from(JOB_TYPES),
    content=st.text(min_size=1).filter(str.strip),
    conversation_id=st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(min_size=1, max_size=200)
    ),
)
def test_any_valid_job_decodes_into_a_lane(
    priority: int, job_type: str, content: str, conversation_id: int | str
) -> None:
    codec = PipelineCodec(max_bytes=MAX_BYTES)
    data = ai_job(
        id="j",
        tenant_id="t",
        conversation_id=conversation_id,
        message_id="m",
        type=job_type,
        content=content,
        priority=priority,
    )
    job = codec.decode(dumps(data))
    assert (job.priority, job.kind, job.prompt) == (priority, job_type, content)
    assert job.conversation_id == conversation_id
    lane = codec.lane(job)
    assert lane in LANES
    assert (lane == "high") == (priority >= 8)
