"""Property-based tests of the decoders' promise.

"Size checked before parsing; deeply nested or huge JSON rejected; invalid UTF-8
rejected; nothing in a message can make the worker crash or log a secret."

Bodies are written with the standard library's ``json`` (not orjson) so they can
hold what orjson refuses to write: integers past 64 bits, NaN, lone surrogates.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import string
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from chatprocessor.contracts.base import MAX_JSON_DEPTH
from chatprocessor.contracts.chat import (
    REPLY_NAMESPACE,
    ChatCodec,
    reply_message_id,
)
from chatprocessor.contracts.naming import Naming, to_camel, to_pascal
from chatprocessor.core.errors import MalformedMessage, MessageRejected, MessageTooLarge
from chatprocessor.core.job import Job, Result
from chatprocessor.core.worker import REPLY_TYPE, Worker, WorkerConfig
from chatprocessor.ops.logging import setup_logging
from chatprocessor.providers.mock import MockProvider
from chatprocessor.transports.base import DLQ_REASON, REJECTED
from tests.fakes.memory import MemoryDelivery, MemoryTransport

MAX_BYTES = 4096
NAMINGS: tuple[Naming, ...] = ("snake", "camel", "pascal")
FIELDS = (
    "conversation_id",
    "message",
    "user_id",
    "timestamp",
    "model",
    "system_prompt",
    "options",
    "stream",
)
OPTION_FIELDS = ("temperature", "max_tokens")


def spellings(field: str) -> tuple[str, str, str]:
    return field, to_camel(field), to_pascal(field)


def spelled(field: str, naming: Naming) -> str:
    return {"snake": field, "camel": to_camel(field), "pascal": to_pascal(field)}[naming]


ID_KEYS = spellings("conversation_id")
CONTRACT_KEYS = [key for field in FIELDS for key in spellings(field)]
OPTION_KEYS = [key for field in OPTION_FIELDS for key in spellings(field)]
# Near misses a sloppy publisher might send, plus names other chat contracts use.
NOISE_KEYS = ["content", "Content", "conversation", "Conversation_Id", "CONVERSATION_ID", "msg"]


#: Stateless, so one codec serves every example (a fixture would not be reset between them).
CODEC = ChatCodec(max_bytes=MAX_BYTES)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put everything back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


# ------------------------------------------------------------------------- strategies

INTERESTING_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\n\t ",
        "\x00",
        "0",
        "123",
        "-1",
        "1.5",
        "true",
        "null",
        "2025-12-16T10:30:00Z",
        "\U0001f600",
        "\u202eevil\u202c",
        "\ufeff",
        "\ud800",  # a lone surrogate: json writes it as an escape, orjson must refuse it
    ]
)
# Any code point, surrogates included.
ANY_TEXT = st.text(st.characters(), max_size=12) | INTERESTING_TEXT
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: past 64 bits too
    | st.floats()  # NaN and infinities too (json writes NaN / Infinity)
    | ANY_TEXT
)
FINITE_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT
)


def json_trees(leaves: st.SearchStrategy[Any], keys: st.SearchStrategy[str]) -> Any:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=8,
    )


JSON_VALUES = json_trees(JSON_SCALARS, ANY_TEXT | st.sampled_from(CONTRACT_KEYS))
FINITE_VALUES = json_trees(FINITE_SCALARS, ANY_TEXT | st.sampled_from(CONTRACT_KEYS))


def dump(value: Any, style: str) -> bytes:
    """JSON text of ``value``: ASCII with escapes, raw UTF-8 (surrogates as bytes), or compact."""
    if style == "utf8":
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if style == "compact":
        return json.dumps(value, separators=(",", ":")).encode()
    return json.dumps(value).encode()


STYLES = st.sampled_from(["ascii", "utf8", "compact"])


#: Values of the right type for each field (and of wrong types for others).
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "conversation_id": st.integers() | st.text(),
    "message": st.text() | INTERESTING_TEXT,
    "user_id": st.none() | st.integers() | st.text(max_size=8),
    "timestamp": st.datetimes().map(lambda d: d.isoformat())
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    "model": st.none() | st.text(max_size=8),
    "system_prompt": st.none() | st.text(max_size=8),
    "options": st.none()
    | st.dictionaries(
        st.sampled_from(OPTION_KEYS) | st.text(max_size=4),
        st.none() | st.integers() | st.floats() | st.text(max_size=4) | st.booleans(),
        max_size=4,
    ),
    "stream": st.booleans() | st.none() | st.integers(0, 2) | st.text(max_size=4),
}


@st.composite
def contract_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Objects built around the contract's field names, in any spelling, with any values."""
    data: dict[str, Any] = {}
    for field in FIELDS:
        # conversation_id and message usually there, so the schema gets past them.
        present = 9 if field in ("conversation_id", "message") else 4
        if not draw(st.sampled_from([True] * present + [False] * (10 - present))):
            continue
        # Mostly one spelling; sometimes two or three, with different values.
        for key in draw(st.lists(st.sampled_from(spellings(field)), min_size=1, max_size=3)):
            # Mostly a value of the right type, sometimes any JSON value.
            wild = draw(st.sampled_from([True] + [False] * 5))
            data[key] = draw(FINITE_VALUES if wild else PLAUSIBLE[field])
    for key in draw(st.lists(st.sampled_from(NOISE_KEYS) | ANY_TEXT, max_size=3)):
        data[key] = draw(FINITE_VALUES)
    return data


def check_decoded(codec: ChatCodec, body: bytes) -> Job | None:
    """decode returns a usable Job or raises MessageRejected; nothing else escapes."""
    try:
        job = codec.decode(body)
    except MessageRejected as exc:
        event(f"rejected: {type(exc).__name__}: {str(exc).split(':')[0]}")
        assert isinstance(exc, MessageTooLarge | MalformedMessage), type(exc)
        assert str(exc), "a rejection must say why"
        assert not exc.transient
        return None
    event("accepted")
    assert isinstance(job, Job)
    assert type(job.conversation_id) in (int, str)
    assert type(job.user_id) in (int, str, type(None))
    assert isinstance(job.prompt, str)
    assert job.prompt.strip()
    # The id a chat can be told about is the one decode found.
    peeked = codec.peek_conversation_id(body)
    assert peeked == job.conversation_id
    assert type(peeked) is type(job.conversation_id)
    # Whatever decode accepts, the worker must be able to answer.
    reply = orjson.loads(codec.encode(job.conversation_id, Result(job.prompt, "m")))
    assert reply["conversation_id"] == job.conversation_id
    assert reply["message"] == job.prompt
    return job


# --------------------------------------------------------- 1. decode never crashes


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=200))
@example(body=b"")
@example(body=b"\xff\xfe{}")
@example(body=b'{"conversation_id": 1, "message": "hi"}\x00')
@example(body=b'{"conversation_id": 1, "message": "hi"} {}')
def test_any_bytes_decode_to_a_job_or_a_rejection(body: bytes) -> None:
    check_decoded(CODEC, body)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, style=STYLES)
@example(value=2**64, style="ascii")
@example(value={"conversation_id": 2**64, "message": "hi"}, style="ascii")
@example(value={"conversation_id": -(2**63) - 1, "message": "hi"}, style="ascii")
@example(value={"conversation_id": "\ud800", "message": "hi"}, style="ascii")
@example(value={"conversation_id": "\ud800", "message": "hi"}, style="utf8")
@example(value={"conversation_id": 1, "message": "\udfff"}, style="ascii")
@example(value={"conversation_id": 1, "message": "hi", "timestamp": float("nan")}, style="ascii")
def test_any_json_decodes_to_a_job_or_a_rejection(value: Any, style: str) -> None:
    check_decoded(CODEC, dump(value, style))


@settings(max_examples=150, deadline=None)
@given(data=contract_dicts(), style=STYLES)
@example(data={"conversation_id": 1, "ConversationId": "x", "message": "hi"}, style="ascii")
@example(data={"conversation_id": None, "ConversationId": 5, "message": "hi"}, style="ascii")
@example(data={"ConversationId": True, "Message": "hi"}, style="ascii")
@example(data={"conversationId": 1, "message": "hi", "Options": {"temperature": 3}}, style="utf8")
@example(data={"conversation_id": 1, "message": "hi", "timestamp": 10**20}, style="ascii")
@example(data={"conversation_id": 1, "message": "hi", "timestamp": "9999-99-99"}, style="ascii")
def test_contract_shaped_objects_decode_to_a_job_or_a_rejection(
    data: dict[str, Any], style: str
) -> None:
    check_decoded(CODEC, dump(data, style))


# ------------------------------------------------------------- 2. peek never crashes


def check_peek(body: bytes) -> None:
    peeked = CODEC.peek_conversation_id(body)
    if peeked is None:
        return
    assert type(peeked) in (int, str)  # never a bool, float, list or dict
    # Only an id decode itself would accept, and one an error reply can carry.
    job = CODEC.decode(orjson.dumps({"conversation_id": peeked, "message": "x"}))
    assert job.conversation_id == peeked
    assert type(job.conversation_id) is type(peeked)
    error = orjson.loads(CODEC.encode(peeked, Result("", "m", error="rejected")))
    assert error["conversation_id"] == peeked


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_peek_never_raises_on_any_bytes(body: bytes) -> None:
    check_peek(body)


@settings(max_examples=100, deadline=None)
@given(data=contract_dicts() | JSON_VALUES, style=STYLES)
@example(data={"conversation_id": 2**64 - 1}, style="ascii")
@example(data={"conversation_id": -(2**63)}, style="ascii")
@example(data={"ConversationId": 2**64}, style="ascii")
@example(data={"conversationId": "\ud800"}, style="ascii")
def test_peek_returns_only_ids_decode_accepts(data: Any, style: str) -> None:
    check_peek(dump(data, style))


# ---------------------------------------------------------------------------- 3. size


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Garbage, valid messages, and valid-looking messages cut short."""
    valid = orjson.dumps(
        {"conversation_id": draw(st.integers(0, 10**6)), "message": draw(st.text(min_size=1))}
    )
    return draw(
        st.sampled_from([valid, valid[: len(valid) // 2], b"{" * len(valid)])
        | st.binary(min_size=1, max_size=300)
    )


@settings(max_examples=200, deadline=None)
@given(body=bodies(), over=st.integers(1, 300))
def test_oversized_bodies_are_too_large_before_any_parsing(body: bytes, over: int) -> None:
    codec = ChatCodec(max_bytes=max(len(body) - over, 0))
    with mock.patch("chatprocessor.contracts.chat.orjson") as fake:
        fake.JSONDecodeError = orjson.JSONDecodeError
        fake.loads.side_effect = AssertionError("the body was parsed before its size was checked")
        with pytest.raises(MessageTooLarge) as info:
            codec.decode(body)
        assert codec.peek_conversation_id(body) is None
        assert not fake.loads.called
    assert not isinstance(info.value, MalformedMessage)
    assert str(codec.max_bytes) in str(info.value)


@settings(max_examples=200, deadline=None)
@given(body=bodies(), room=st.integers(0, 300))
def test_bodies_within_the_limit_are_never_too_large(body: bytes, room: int) -> None:
    codec = ChatCodec(max_bytes=len(body) + room)
    with contextlib.suppress(MalformedMessage):
        codec.decode(body)  # MessageTooLarge (or anything else) fails the test


@settings(max_examples=50, deadline=None)
@given(size=st.integers(MAX_BYTES + 1, 4 * MAX_BYTES), fill=st.sampled_from(b'{[" x\xff'))
def test_huge_invalid_body_is_too_large_not_malformed(size: int, fill: int) -> None:
    huge = bytes([fill]) * size
    with pytest.raises(MessageTooLarge):
        CODEC.decode(huge)


# --------------------------------------------------------------------------- 4. depth


def container_depth(value: Any) -> int:
    """Depth as the contract counts it: objects and arrays, the top-level object being 1."""
    if isinstance(value, dict):
        return 1 + max((container_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((container_depth(v) for v in value), default=0)
    return 0


SMALL_SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3)


@st.composite
def chains(draw: st.DrawFn, levels: int) -> Any:
    """Exactly ``levels`` containers one inside the other, with scalar and shallow siblings."""
    value: Any = draw(st.sampled_from([[], {}]))
    if draw(st.booleans()):
        value = [draw(SMALL_SCALARS)] if isinstance(value, list) else {"v": draw(SMALL_SCALARS)}
    for level in range(1, levels):
        siblings: list[Any] = draw(st.lists(SMALL_SCALARS, max_size=2))
        if level > 2 and draw(st.booleans()):
            siblings.append([[draw(SMALL_SCALARS)]])  # a shallower branch beside the deep one
        if draw(st.booleans()):
            at = draw(st.integers(0, len(siblings)))
            value = [*siblings[:at], value, *siblings[at:]]
        else:
            key = "k" + draw(st.text(max_size=3))
            value = {**{f"s{i}": s for i, s in enumerate(siblings)}, key: value}
    return value


#: Where the deep value goes, and how many containers that placement adds around it.
PLACEMENTS = {
    "extra": (1, lambda v: {"extra": v}),  # an unknown field, ignored by the schema
    "options": (2, lambda v: {"options": {"pad": v}}),  # inside a valid contract field
    "Options": (2, lambda v: {"Options": {"Temperature": 0.5, "x": v}}),
    "list": (2, lambda v: {"extra": [1, v, {"a": [2]}]}),
}


@st.composite
def nested_messages(draw: st.DrawFn, depth: int) -> bytes:
    overhead, place = PLACEMENTS[draw(st.sampled_from(sorted(PLACEMENTS)))]
    data = {"conversation_id": 1, "message": "hi", **place(draw(chains(depth - overhead)))}
    assert container_depth(data) == depth  # the generator itself is right
    return dump(data, draw(STYLES))


@settings(max_examples=60, deadline=None)
@given(body=nested_messages(MAX_JSON_DEPTH))
def test_nesting_at_the_depth_limit_is_accepted(body: bytes) -> None:
    assert CODEC.decode(body).prompt == "hi"


@settings(max_examples=60, deadline=None)
@given(body=nested_messages(MAX_JSON_DEPTH + 1))
def test_nesting_one_past_the_depth_limit_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedMessage, match="nested deeper"):
        CODEC.decode(body)


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from("lo"), min_size=MAX_JSON_DEPTH, max_size=3000),
    field=st.sampled_from(["extra", "message", "conversation_id", "options", "Options"]),
)
def test_any_deeper_nesting_is_malformed(kinds: list[str], field: str) -> None:
    # ``len(kinds)`` containers inside the top-level object: always past the limit.
    opened = "".join("[" if k == "l" else '{"k":' for k in kinds)
    closed = "".join("]" if k == "l" else "}" for k in reversed(kinds))
    body = f'{{"conversation_id": 1, "message": "hi", "{field}": {opened}1{closed}}}'.encode()
    with pytest.raises(MalformedMessage):
        CODEC.decode(body)


# ------------------------------------------------------------------- 5. invalid UTF-8


def _four_bytes(cp: int) -> bytes:
    return bytes(
        [0xF0 | cp >> 18, 0x80 | (cp >> 12) & 0x3F, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F]
    )


INVALID_UTF8 = st.one_of(
    # a lone continuation byte
    st.integers(0x80, 0xBF).map(lambda b: bytes([b])),
    # overlong encodings: 2, 3 and 4 bytes for what fits in fewer
    st.integers(0, 0x7F).map(lambda cp: bytes([0xC0 | cp >> 6, 0x80 | cp & 0x3F])),
    st.integers(0, 0x7FF).map(lambda cp: bytes([0xE0, 0x80 | cp >> 6, 0x80 | cp & 0x3F])),
    st.integers(0, 0xFFFF).map(_four_bytes),
    # a UTF-16 surrogate written as UTF-8 (CESU-8 / WTF-8), e.g. \xed\xa0\x80
    st.integers(0xD800, 0xDFFF).map(
        lambda cp: bytes([0xE0 | cp >> 12, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F])
    ),
    # past U+10FFFF, and bytes that never start a sequence
    st.integers(0x110000, 0x1FFFFF).map(_four_bytes),
    st.sampled_from([0xC0, 0xC1, *range(0xF5, 0x100)]).map(lambda b: bytes([b])),
    # a multibyte character cut short
    st.characters(min_codepoint=0x80, exclude_categories=["Cs"]).flatmap(
        lambda c: st.integers(1, len(c.encode()) - 1).map(lambda n, c=c: c.encode()[:n])
    ),
)
MARK = "@@MARK@@"
NO_MARK_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="@"), max_size=8)


@st.composite
def marked_messages(draw: st.DrawFn) -> bytes:
    """A valid message with MARK somewhere: in a value, a key, an id, nested, or between tokens."""
    around = draw(NO_MARK_TEXT)
    where = draw(
        st.sampled_from(["message", "id", "key", "system_prompt", "nested", "between", "first"])
    )
    cid: Any = draw(st.integers(0, 99))
    message = "hi " + draw(NO_MARK_TEXT)
    data: dict[str, Any] = {}
    if where == "message":
        message = f"hi {around}{MARK}{around}"
    elif where == "id":
        cid = f"{around}{MARK}"
    elif where == "key":
        data[f"x{around}{MARK}"] = 1
    elif where == "system_prompt":
        data["systemPrompt"] = f"{MARK}{around}"
    elif where == "nested":
        data["extra"] = {"a": [1, {"b": f"{around}{MARK}"}]}
    data = {draw(st.sampled_from(ID_KEYS)): cid, "message": message, **data}
    raw = dump(data, draw(st.sampled_from(["ascii", "utf8"])))
    if where == "between":
        raw = raw.replace(b", ", f",{MARK} ".encode(), 1)
    elif where == "first":
        raw = MARK.encode() + raw
    return raw


@settings(max_examples=200, deadline=None)
@given(template=marked_messages(), bad=INVALID_UTF8)
@example(template=b'{"conversation_id": 1, "message": "hi @@MARK@@"}', bad=b"\xed\xa0\x80")
@example(template=b'{"conversation_id": 1, "message": "hi @@MARK@@"}', bad=b"\xc0\x80")
@example(template=b'{"conversation_id": 1, "message": "hi @@MARK@@"}', bad=b"\xe2\x82")
@example(template=b'{"conversation_id": "@@MARK@@", "message": "hi"}', bad=b"\xf4\x90\x80\x80")
def test_invalid_utf8_anywhere_is_malformed(template: bytes, bad: bytes) -> None:
    clean = template.replace(MARK.encode(), b"")
    assert CODEC.decode(clean).prompt.startswith("hi")  # valid but for the bad bytes
    body = template.replace(MARK.encode(), bad)
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")  # the generator really made invalid UTF-8
    with pytest.raises(MalformedMessage):
        CODEC.decode(body)
    assert CODEC.peek_conversation_id(body) is None


# --------------------------------------------------------------------- 6. round trips

CONVERSATION_IDS = st.integers(-(2**63), 2**64 - 1) | st.text()
UNICODE = st.text()  # any code point but surrogates: controls, NUL, emoji, RTL...
NASTY = "\x00\x01\x1b[31m\u202e\u200f\u05e9\u05dc\u05d5\u05dd\U0001f600\U0001f1eb\U0001f1f7\r\n\t"


@settings(max_examples=300, deadline=None)
@given(
    naming=st.sampled_from(NAMINGS),
    conversation_id=CONVERSATION_IDS,
    text=UNICODE,
    model=st.text(min_size=1),
    error=st.none() | UNICODE,
    counts=st.tuples(*[st.none() | st.integers(0, 2**31)] * 3),
)
@example(naming="pascal", conversation_id=0, text=NASTY, model="m", error=None, counts=(1, 2, 3))
@example(
    naming="snake", conversation_id="\x00", text="\x00", model="\x00", error="", counts=(0,) * 3
)
def test_reply_round_trips(
    *,
    naming: Naming,
    conversation_id: int | str,
    text: str,
    model: str,
    error: str | None,
    counts: tuple[int | None, int | None, int | None],
) -> None:
    codec = ChatCodec(max_bytes=10**6, naming=naming)
    result = Result(text, model, *counts, error=error)
    raw = codec.encode(conversation_id, result)
    reply = orjson.loads(raw)
    assert reply[spelled("conversation_id", naming)] == conversation_id
    assert type(reply[spelled("conversation_id", naming)]) is type(conversation_id)
    assert reply[spelled("message", naming)] == text
    assert reply[spelled("model_used", naming)] == model
    assert reply.get(spelled("error", naming)) == error
    assert reply.get(spelled("prompt_tokens", naming)) == counts[0]
    # The reply, read back by the codec as a prompt: same conversation, same text.
    assert codec.peek_conversation_id(raw) == conversation_id
    if text.strip():
        job = codec.decode(raw)
        assert (job.conversation_id, job.prompt) == (conversation_id, text)
    chunk = orjson.loads(codec.encode_chunk(conversation_id, 3, text))
    assert chunk[spelled("conversation_id", naming)] == conversation_id
    assert chunk[spelled("delta", naming)] == text


@settings(max_examples=300, deadline=None)
@given(
    naming=st.sampled_from(NAMINGS),
    conversation_id=CONVERSATION_IDS,
    user_id=st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(),
    content=UNICODE.filter(str.strip),
    system_prompt=st.none() | UNICODE,
    style=st.sampled_from(["orjson", "ascii", "utf8"]),
)
@example(
    naming="camel",
    conversation_id="\u202e1",
    user_id=None,
    content=NASTY,
    system_prompt=None,
    style="ascii",
)
@example(
    naming="snake",
    conversation_id=0,
    user_id=0,
    content="\x00",
    system_prompt="\x00",
    style="orjson",
)
def test_request_round_trips_in_every_spelling(
    *,
    naming: Naming,
    conversation_id: int | str,
    user_id: int | str | None,
    content: str,
    system_prompt: str | None,
    style: str,
) -> None:
    fields = {
        "conversation_id": conversation_id,
        "message": content,
        "user_id": user_id,
        "system_prompt": system_prompt,
    }
    data = {spelled(name, naming): value for name, value in fields.items() if value is not None}
    raw = orjson.dumps(data) if style == "orjson" else dump(data, style)
    job = ChatCodec(max_bytes=10**6).decode(raw)
    assert job.conversation_id == conversation_id
    assert type(job.conversation_id) is type(conversation_id)
    assert job.prompt == content
    assert job.user_id == user_id
    assert type(job.user_id) is type(user_id)
    assert job.system_prompt == system_prompt


# --------------------------------------------------- 7. the worker: no crash, no secret


SECRET_CHARS = string.ascii_letters + string.digits + "!#$%&+-./:;<=>?@[]^_{|}~\"'\\ "
SECRETS = st.text(SECRET_CHARS, min_size=6, max_size=16).map(lambda s: f"Pw{s}") | st.text(
    string.digits, min_size=8, max_size=10
).map(lambda s: f"7{s}")  # digits only, so an integer id can carry it too


@st.composite
def secret_deliveries(draw: st.DrawFn, secret: str) -> MemoryDelivery:
    """Messages that carry ``secret`` in any field, valid or broken in any way."""
    carrying = st.builds(lambda a, b: f"{a}{secret}{b}", st.text(max_size=3), st.text(max_size=3))
    texts = carrying | st.text(max_size=6)
    ids: st.SearchStrategy[Any] = st.one_of(texts, st.integers(0, 99), texts, SMALL_SCALARS)
    if secret.isdigit():
        ids |= st.sampled_from([int(secret), int(f"9{secret}"), int(f"{secret}0")])
    data: dict[str, Any] = {}
    if draw(st.sampled_from([True] * 9 + [False])):
        data[draw(st.sampled_from(ID_KEYS))] = draw(ids)
    if draw(st.sampled_from([True] * 9 + [False])):
        data[draw(st.sampled_from(spellings("message")))] = draw(
            st.one_of(texts, texts, SMALL_SCALARS)
        )
    optional = {
        "user_id": texts | st.integers(0, 99) | SMALL_SCALARS,
        "model": texts,
        "system_prompt": texts,
        "timestamp": st.just("2025-12-16T10:30:00Z") | texts,
        "options": st.dictionaries(
            st.sampled_from(OPTION_KEYS), texts | st.integers(0, 9) | SMALL_SCALARS, max_size=2
        ),
        "stream": st.booleans() | SMALL_SCALARS,  # streamed to reply_to in chunks
    }
    for field, values in optional.items():
        if draw(st.sampled_from([True, False, False, False])):
            data[draw(st.sampled_from(spellings(field)))] = draw(values)
    if draw(st.booleans()):
        data[draw(carrying)] = draw(texts)
    raw = dump(data, draw(STYLES))
    damage = draw(st.sampled_from(["none"] * 4 + ["cut", "utf8", "deep", "huge", "bytes"]))
    if damage == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(INVALID_UTF8) + raw[at:]
    elif damage == "deep":
        raw = raw[:-1] + b', "d": ' + b"[" * 40 + b"]" * 40 + b"}"
    elif damage == "huge":
        raw = raw[:-1] + b', "pad": "' + secret.encode() * (MAX_BYTES // 8) + b'"}'
    elif damage == "bytes":
        raw = draw(st.binary(max_size=20)) + secret.encode() + draw(st.binary(max_size=20))
    return MemoryDelivery(
        raw,
        message_id=draw(st.none() | carrying),
        reply_to=draw(st.none() | st.just("reply.q")),
        correlation_id=draw(st.none() | carrying),
    )


def leaked(secret: str, output: str) -> bool:
    """The secret as written, or as a JSON log line escapes it."""
    return secret in output or json.dumps(secret)[1:-1] in output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), secret=SECRETS, fmt=st.sampled_from(["text", "json"]))
def test_worker_settles_every_message_once_and_never_logs_the_secret(
    data: st.DataObject, secret: str, fmt: str
) -> None:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):  # the handler writes to the stdout of this moment
        setup_logging(level="DEBUG", fmt=fmt, secrets=[secret])
    codec = ChatCodec(max_bytes=MAX_BYTES)
    transport = MemoryTransport()
    worker = Worker(transport, MockProvider(), codec, WorkerConfig("in", "out"))  # type: ignore[arg-type]
    delivery = data.draw(secret_deliveries(secret))

    asyncio.run(worker.handle(delivery))  # raising here is a crash

    assert len(delivery.settlements) == 1, delivery.settlements
    kind, headers = delivery.settlements[0]
    destination = delivery.reply_to or "out"
    try:
        job = codec.decode(delivery.body)
    except MessageRejected as exc:
        event("rejected: " + ("too large" if isinstance(exc, MessageTooLarge) else str(exc)[:28]))
        assert kind == "dead_letter"
        assert headers[DLQ_REASON] == REJECTED
        peeked = codec.peek_conversation_id(delivery.body)
        replies = [orjson.loads(m.body) for d, m in transport.published if d == destination]
        if peeked is None:
            event("no error reply")
            assert replies == []
        else:  # the chat is told
            [reply] = replies  # an error reply is never streamed
            assert reply["conversation_id"] == peeked
            assert reply["error"]
    else:
        event("answered")
        assert kind == "ack"
        assert {where for where, _ in transport.published} == {destination}
        [reply] = [orjson.loads(m.body) for _, m in transport.published if m.type == REPLY_TYPE]
        assert reply["conversation_id"] == job.conversation_id
        assert "error" not in reply

    logged = output.getvalue()
    if "[ConversationId: " in logged and "***" in logged.split("[ConversationId: ")[1][:40]:
        event("secret in the conversation tag, masked")
    assert "chatprocessor.core.worker" in logged  # the worker logged about this message
    assert not leaked(secret, logged), logged


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("conversation_id", ["conv-Pw-hunter2", 7123456789])
def test_secret_in_the_conversation_tag_is_masked(fmt: str, conversation_id: int | str) -> None:
    """Found by the property above: the ``[ConversationId: ...]`` tag comes from the body."""
    secret = "Pw-hunter2" if isinstance(conversation_id, str) else "12345678"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        setup_logging(level="INFO", fmt=fmt, secrets=[secret])
    worker = Worker(MemoryTransport(), MockProvider(), CODEC, WorkerConfig("in", "out"))  # type: ignore[arg-type]
    delivery = MemoryDelivery(orjson.dumps({"conversation_id": conversation_id}))  # no message
    asyncio.run(worker.handle(delivery))
    assert [kind for kind, _ in delivery.settlements] == ["dead_letter"]
    assert "rejected message" in output.getvalue()
    assert secret not in output.getvalue()


@given(job_id=st.text(max_size=80), error=st.booleans())
def test_reply_message_id_is_the_uuid5_of_the_request(job_id: str, error: bool) -> None:
    """The hand-rolled UUIDv5 (no UUID object per reply) is exactly uuid.uuid5's."""
    name = f"{job_id}#error" if error else job_id
    assert reply_message_id(job_id, error=error) == str(uuid.uuid5(REPLY_NAMESPACE, name))
