"""Seed 000's wire contract: UserPromptReceived bytes to a Job, a Result to BotResponseCreated."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from chatprocessor.contracts.base import MAX_JSON_DEPTH
from chatprocessor.contracts.chat import (
    ChatCodec,
    format_timestamp,
    reply_message_id,
    request_id,
)
from chatprocessor.core.errors import MalformedMessage, MessageRejected, MessageTooLarge
from chatprocessor.core.job import Result

SEED_INPUT = (
    b'{"conversation_id": 123, "message": "What is the capital of France?", '
    b'"user_id": 456, "timestamp": "2025-12-16T10:30:00Z"}'
)
SEED_OUTPUT_KEYS = {"conversation_id", "message", "user_id", "timestamp", "model_used"}
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def codec() -> ChatCodec:
    return ChatCodec(max_bytes=65536)


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def nested(levels: int, leaf: Any) -> Any:
    """``levels`` dicts one inside the other, the innermost holding ``leaf`` under "k"."""
    value: Any = leaf
    for _ in range(levels):
        value = {"k": value}
    return value


def deep_text(levels: int) -> bytes:
    """JSON text of ``levels`` nested arrays around a number (orjson cannot dump that deep)."""
    return b"[" * levels + b"1" + b"]" * levels


# --------------------------------------------------------------------------- decode


def test_seed_input_decodes_to_a_job(codec: ChatCodec) -> None:
    job = codec.decode(SEED_INPUT, message_id="m-1", reply_to="rq", correlation_id="c-1")
    assert job.conversation_id == 123
    assert job.prompt == "What is the capital of France?"
    assert job.user_id == 456
    assert job.id == "m-1"
    assert job.reply_to == "rq"
    assert job.correlation_id == "c-1"
    assert job.model is None
    assert job.system_prompt is None
    assert job.temperature is None
    assert job.max_tokens is None
    assert job.stream is False


@pytest.mark.parametrize(
    "fields",
    [
        {"ConversationId": 7, "Message": "hi", "UserId": 9, "Timestamp": "2025-12-16T10:30:00Z"},
        {"conversationId": 7, "message": "hi", "userId": 9, "timestamp": "2025-12-16T10:30:00Z"},
    ],
    ids=["pascal", "camel"],
)
def test_dotnet_names_are_accepted(codec: ChatCodec, fields: dict[str, Any]) -> None:
    job = codec.decode(orjson.dumps(fields))
    assert (job.conversation_id, job.prompt, job.user_id) == (7, "hi", 9)


@pytest.mark.parametrize("spelling", ["max_tokens", "maxTokens", "MaxTokens"])
def test_max_tokens_option_in_every_spelling(codec: ChatCodec, spelling: str) -> None:
    job = codec.decode(
        body(conversation_id=1, message="hi", options={spelling: 12, "Temperature": 0.5})
    )
    assert job.max_tokens == 12
    assert job.temperature == 0.5


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", "3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
        ("123", "123"),
        (123, 123),
        (0, 0),
    ],
)
def test_conversation_id_keeps_its_type(codec: ChatCodec, given: Any, expected: Any) -> None:
    job = codec.decode(body(conversation_id=given, message="hi", user_id=given))
    assert job.conversation_id == expected
    assert type(job.conversation_id) is type(expected)
    assert type(job.user_id) is type(expected)


def test_optional_fields(codec: ChatCodec) -> None:
    job = codec.decode(
        body(
            conversation_id=1,
            message="hi",
            model="mistral:7b",
            system_prompt="Be brief.",
            options={"temperature": 0.2, "max_tokens": 3},
            stream=True,
        )
    )
    assert job.model == "mistral:7b"
    assert job.system_prompt == "Be brief."
    assert job.temperature == 0.2
    assert job.max_tokens == 3
    assert job.stream is True


def test_optional_fields_in_pascal_case(codec: ChatCodec) -> None:
    job = codec.decode(
        body(
            ConversationId=1,
            Message="hi",
            Model="mistral",
            SystemPrompt="sys",
            Options={"MaxTokens": 4},
            Stream=True,
        )
    )
    assert (job.model, job.system_prompt, job.max_tokens, job.stream) == ("mistral", "sys", 4, True)


def test_unknown_fields_are_ignored(codec: ChatCodec) -> None:
    job = codec.decode(body(conversation_id=1, message="hi", tenant="acme", extra={"a": 1}))
    assert job.prompt == "hi"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'[{"conversation_id": 1, "message": "hi"}]', "JSON object"),
        (b'"just a string"', "JSON object"),
        (body(conversation_id=1, message="   \n\t"), "message"),
        (body(conversation_id=1, message=""), "message"),
        (body(message="hi"), "conversation_id"),
        (body(conversation_id=None, message="hi"), "conversation_id"),
        (body(conversation_id=1.5, message="hi"), "conversation_id"),
        (body(conversation_id=1, message="hi", options={"temperature": 5}), "temperature"),
        (body(conversation_id=1, message="hi", options={"max_tokens": 0}), "max_tokens"),
        (body(conversation_id=1, message="hi", timestamp="yesterday"), "timestamp"),
    ],
    ids=[
        "invalid-json",
        "empty-body",
        "json-array",
        "json-string",
        "blank-message",
        "empty-message",
        "missing-conversation-id",
        "null-conversation-id",
        "float-conversation-id",
        "temperature-5",
        "max-tokens-0",
        "bad-timestamp",
    ],
)
def test_malformed_messages(codec: ChatCodec, raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        codec.decode(raw)
    assert reason in str(info.value)
    assert not info.value.transient


def test_too_large_is_checked_before_parsing() -> None:
    codec = ChatCodec(max_bytes=1024)
    huge_invalid = b"{" + b"x" * 5000  # would be MalformedMessage if it were parsed
    with pytest.raises(MessageTooLarge) as info:
        codec.decode(huge_invalid)
    assert not isinstance(info.value, MalformedMessage)
    assert isinstance(info.value, MessageRejected)
    assert "MAX_MESSAGE_BYTES=1024" in str(info.value)


def test_body_of_exactly_max_bytes_is_accepted() -> None:
    raw = body(conversation_id=1, message="hi")
    padded = raw[:-1] + b" " * 10 + b"}"
    job = ChatCodec(max_bytes=len(padded)).decode(padded)
    assert job.prompt == "hi"
    with pytest.raises(MessageTooLarge):
        ChatCodec(max_bytes=len(padded) - 1).decode(padded)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 8, 500])
def test_nesting_deeper_than_the_limit_is_malformed(codec: ChatCodec, levels: int) -> None:
    raw = b'{"conversation_id": 1, "message": "hi", "extra": ' + deep_text(levels) + b"}"
    with pytest.raises(MalformedMessage, match="nested deeper"):
        codec.decode(raw)


def test_nesting_beyond_the_json_parser_limit_is_malformed(codec: ChatCodec) -> None:
    raw = b'{"conversation_id": 1, "message": "hi", "extra": ' + deep_text(5000) + b"}"
    with pytest.raises(MalformedMessage):
        codec.decode(raw)


def test_moderate_nesting_is_fine(codec: ChatCodec) -> None:
    raw = body(conversation_id=1, message="hi", extra=nested(10, [1, {"a": 2}]))
    assert codec.decode(raw).prompt == "hi"


def test_exactly_max_depth_containers_are_accepted(codec: ChatCodec) -> None:
    # The top-level object plus 31 nested objects: 32 levels of containers.
    empty_inside = body(conversation_id=1, message="hi", extra=nested(MAX_JSON_DEPTH - 2, {}))
    assert codec.decode(empty_inside).prompt == "hi"  # accepted today
    with_value = body(conversation_id=1, message="hi", extra=nested(MAX_JSON_DEPTH - 1, 1))
    # Same container depth, the innermost object holds a number: must be accepted too.
    assert codec.decode(with_value).prompt == "hi"


@pytest.mark.parametrize("value", [True, False])
def test_boolean_conversation_id_is_malformed(codec: ChatCodec, value: bool) -> None:
    with pytest.raises(MalformedMessage):
        codec.decode(body(conversation_id=value, message="hi"))


# ------------------------------------------------------------------ ids and peeking


def test_request_id_uses_message_id_when_given() -> None:
    assert request_id(SEED_INPUT, "broker-id-1") == "broker-id-1"


def test_request_id_digest_is_stable_and_body_dependent() -> None:
    first = request_id(SEED_INPUT, None)
    assert first == request_id(bytes(SEED_INPUT), None)
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != request_id(SEED_INPUT + b" ", None)


def test_decode_job_id_is_stable_across_redeliveries(codec: ChatCodec) -> None:
    assert codec.decode(SEED_INPUT).id == codec.decode(SEED_INPUT).id
    assert codec.decode(SEED_INPUT).id == request_id(SEED_INPUT, None)
    assert codec.decode(SEED_INPUT, message_id="abc").id == "abc"


def test_reply_message_id_is_deterministic_and_per_request() -> None:
    first = reply_message_id("req-1")
    assert first == reply_message_id("req-1")
    assert first != reply_message_id("req-2")
    assert first != "req-1"
    assert uuid.UUID(first).version == 5


@pytest.mark.parametrize("key", ["conversation_id", "conversationId", "ConversationId"])
def test_peek_conversation_id_reads_every_spelling(codec: ChatCodec, key: str) -> None:
    assert codec.peek_conversation_id(orjson.dumps({key: 77})) == 77
    assert codec.peek_conversation_id(orjson.dumps({key: "guid-x"})) == "guid-x"


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'{"message": "no id"}',
        b'{"conversation_id": null}',
        b'{"conversation_id": true}',
        b'{"conversation_id": {"a": 1}}',
        b'{"conversation_id": [1]}',
    ],
)
def test_peek_conversation_id_returns_none_for_garbage(codec: ChatCodec, raw: bytes) -> None:
    assert codec.peek_conversation_id(raw) is None


def test_peek_conversation_id_ignores_oversized_bodies() -> None:
    codec = ChatCodec(max_bytes=256)
    raw = orjson.dumps({"conversation_id": 5, "pad": "x" * 500})
    assert codec.peek_conversation_id(raw) is None


def test_peek_conversation_id_works_on_a_schema_invalid_body(codec: ChatCodec) -> None:
    raw = body(conversation_id=5)  # no message
    with pytest.raises(MalformedMessage):
        codec.decode(raw)
    assert codec.peek_conversation_id(raw) == 5


# --------------------------------------------------------------------------- encode


def test_encode_has_exactly_the_seed_keys(codec: ChatCodec) -> None:
    data = orjson.loads(codec.encode(123, Result("Paris.", "llama2")))
    assert set(data) == SEED_OUTPUT_KEYS
    assert data["conversation_id"] == 123
    assert data["message"] == "Paris."
    assert data["user_id"] == 0
    assert data["model_used"] == "llama2"
    assert TIMESTAMP_RE.match(data["timestamp"])


def test_encode_timestamp_is_now_in_utc(codec: ChatCodec) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = orjson.loads(codec.encode(1, Result("x", "m")))["timestamp"]
    after = datetime.now(UTC)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= moment <= after


def test_encode_adds_only_the_optional_fields_that_are_set(codec: ChatCodec) -> None:
    data = orjson.loads(
        codec.encode("g-1", Result("", "llama2", prompt_tokens=6, latency_ms=12, error="boom"))
    )
    assert set(data) == SEED_OUTPUT_KEYS | {"prompt_tokens", "latency_ms", "error"}
    assert data["conversation_id"] == "g-1"
    assert (data["prompt_tokens"], data["latency_ms"], data["error"]) == (6, 12, "boom")


def test_encode_keeps_zero_counts(codec: ChatCodec) -> None:
    data = orjson.loads(codec.encode(1, Result("", "m", prompt_tokens=0, completion_tokens=0)))
    assert data["prompt_tokens"] == 0
    assert data["completion_tokens"] == 0


def test_bot_user_id_is_used() -> None:
    data = orjson.loads(ChatCodec(max_bytes=1024, bot_user_id=99).encode(1, Result("x", "m")))
    assert data["user_id"] == 99


def test_format_timestamp_converts_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    moment = datetime(2025, 12, 16, 11, 30, 5, 999999, tzinfo=paris)
    assert format_timestamp(moment) == "2025-12-16T10:30:05Z"


FULL_RESULT = Result("hi", "llama2", 1, 2, 3, "e")


@pytest.mark.parametrize(
    ("naming", "expected"),
    [
        (
            "camel",
            {
                "conversationId",
                "message",
                "userId",
                "timestamp",
                "modelUsed",
                "error",
                "promptTokens",
                "completionTokens",
                "latencyMs",
            },
        ),
        (
            "pascal",
            {
                "ConversationId",
                "Message",
                "UserId",
                "Timestamp",
                "ModelUsed",
                "Error",
                "PromptTokens",
                "CompletionTokens",
                "LatencyMs",
            },
        ),
    ],
)
def test_naming_renames_every_key(naming: Any, expected: set[str]) -> None:
    data = orjson.loads(ChatCodec(max_bytes=1024, naming=naming).encode(5, FULL_RESULT))
    assert set(data) == expected
    values = sorted(map(str, data.values()))
    snake = orjson.loads(ChatCodec(max_bytes=1024).encode(5, FULL_RESULT))
    assert values == sorted(map(str, snake.values()))


@pytest.mark.parametrize(
    ("naming", "keys"),
    [
        ("snake", {"conversation_id", "index", "delta"}),
        ("camel", {"conversationId", "index", "delta"}),
        ("pascal", {"ConversationId", "Index", "Delta"}),
    ],
)
def test_encode_chunk(naming: Any, keys: set[str]) -> None:
    data = orjson.loads(ChatCodec(max_bytes=1024, naming=naming).encode_chunk(8, 2, "Par"))
    assert set(data) == keys
    assert sorted(map(str, data.values())) == ["2", "8", "Par"]


def test_reply_round_trips_through_a_dotnet_peer() -> None:
    """A reply written in PascalCase is read back by the codec as a prompt would be."""
    out = orjson.loads(ChatCodec(max_bytes=1024, naming="pascal").encode(42, FULL_RESULT))
    assert ChatCodec(max_bytes=1024).peek_conversation_id(orjson.dumps(out)) == 42
