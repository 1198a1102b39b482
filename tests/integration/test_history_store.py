"""Conversation history: one behaviour suite run against SQLite and the real Redis."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.core.job import ChatMessage
from chatprocessor.features.history import (
    ConversationKey,
    HistoryStore,
    RedisHistoryStore,
    SQLiteHistoryStore,
)
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.timeout(30)

Factory = Callable[..., HistoryStore]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Stores of one backend; Redis keys under a prefix of their own, deleted afterwards."""
    kind: str = request.param
    prefix = f"test:history:{uuid.uuid4().hex}"
    stores: list[HistoryStore] = []

    def factory(ttl: float = 60.0, max_messages: int = 50) -> HistoryStore:
        store: HistoryStore
        if kind == "sqlite":
            store = SQLiteHistoryStore(
                tmp_path / "history.sqlite3", ttl=ttl, max_messages=max_messages
            )
        else:
            store = RedisHistoryStore(REDIS_URL, ttl=ttl, max_messages=max_messages, prefix=prefix)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()
    if kind == "redis":
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def key(
    user: str = "alice", conversation: str | None = None, tenant: str = "acme"
) -> ConversationKey:
    return ConversationKey(tenant, user, conversation or uuid.uuid4().hex)


def turn(i: int) -> list[ChatMessage]:
    return [ChatMessage("user", f"question {i}"), ChatMessage("assistant", f"answer {i}")]


def texts(messages: list[ChatMessage]) -> list[str]:
    return [m.content for m in messages]


async def test_turns_come_back_in_order(open_store: Factory) -> None:
    store = open_store()
    k = key()
    assert await store.load(k, 50) == []
    for i in range(1, 4):
        await store.append(k, f"job-{i}", turn(i))
    loaded = await store.load(k, 50)
    assert loaded == [*turn(1), *turn(2), *turn(3)]
    assert texts(await store.load(k, 3)) == ["answer 2", "question 3", "answer 3"]
    assert await store.load(k, 0) == []
    assert await store.ping() is True


async def test_only_max_messages_are_kept(open_store: Factory) -> None:
    store = open_store(max_messages=4)
    k = key()
    for i in range(1, 5):
        await store.append(k, f"job-{i}", turn(i))
    assert texts(await store.load(k, 50)) == ["question 3", "answer 3", "question 4", "answer 4"]


async def test_a_redelivered_job_appends_once(open_store: Factory) -> None:
    store = open_store(max_messages=2)
    k = key()
    await store.append(k, "job-1", turn(1))
    await store.append(k, "job-1", turn(1))
    assert texts(await store.load(k, 50)) == ["question 1", "answer 1"]
    await store.append(k, "job-2", turn(2))
    # job-1's messages were trimmed away; its redelivery still must not bring them back.
    await store.append(k, "job-1", turn(1))
    assert texts(await store.load(k, 50)) == ["question 2", "answer 2"]


async def test_redeliveries_racing_append_once(open_store: Factory) -> None:
    store = open_store()
    other = open_store()  # a second worker on the same store
    k = key()
    await asyncio.gather(*(s.append(k, "job-1", turn(1)) for s in (store, other, store, other)))
    assert texts(await store.load(k, 50)) == ["question 1", "answer 1"]


async def test_the_first_user_owns_the_conversation(open_store: Factory) -> None:
    store = open_store()
    conversation = uuid.uuid4().hex
    alice, bob = key("alice", conversation), key("bob", conversation)
    assert await store.claim(alice) == "alice"
    assert await store.claim(bob) == "alice"
    assert await store.claim(alice) == "alice"
    # Two workers claiming a fresh conversation at once: one owner for both.
    fresh = uuid.uuid4().hex
    owners = await asyncio.gather(
        *(open_store().claim(key(user, fresh)) for user in ("u1", "u2", "u3", "u4"))
    )
    assert len(set(owners)) == 1 and owners[0] in {"u1", "u2", "u3", "u4"}


async def test_tenants_are_isolated(open_store: Factory) -> None:
    store = open_store()
    conversation = "42"
    acme, globex = key("alice", conversation, "acme"), key("bob", conversation, "globex")
    assert await store.claim(acme) == "alice"
    assert await store.claim(globex) == "bob"  # same id, another tenant: another conversation
    await store.append(acme, "job-1", turn(1))
    await store.append(globex, "job-1", turn(2))  # same job id too
    assert texts(await store.load(acme, 50)) == ["question 1", "answer 1"]
    assert texts(await store.load(globex, 50)) == ["question 2", "answer 2"]


async def test_users_never_read_each_others_turns(open_store: Factory) -> None:
    store = open_store()
    conversation = uuid.uuid4().hex
    await store.append(key("alice", conversation), "job-1", turn(1))
    assert await store.load(key("bob", conversation), 50) == []
    assert await store.load(key("", conversation), 50) == []


async def test_separators_in_ids_do_not_collide(open_store: Factory) -> None:
    store = open_store()
    suffix = uuid.uuid4().hex
    one = ConversationKey("t", "a:b", f"c{suffix}")
    two = ConversationKey("t", "a", f"b:c{suffix}")
    await store.append(one, "job-1", turn(1))
    assert await store.load(two, 50) == []
    assert await store.claim(ConversationKey("t:x", "u", f"y{suffix}")) == "u"
    assert await store.claim(ConversationKey("t", "v", f"x:y{suffix}")) == "v"


async def test_images_and_extra_fields_are_not_stored(open_store: Factory) -> None:
    store = open_store()
    k = key()
    await store.append(k, "job-1", [ChatMessage("user", "what is this?", ("aGVsbG8=",))])
    assert await store.load(k, 50) == [ChatMessage("user", "what is this?")]


async def test_history_expires_after_the_ttl(open_store: Factory) -> None:
    store = open_store(ttl=0.3)
    k = key()
    assert await store.claim(k) == "alice"
    await store.append(k, "job-1", turn(1))
    assert len(await store.load(k, 50)) == 2
    await asyncio.sleep(0.5)
    assert await store.load(k, 50) == []
    # The owner expired too: another user may start a conversation under that id.
    assert await store.claim(key("bob", k.conversation)) == "bob"


async def test_expiry_slides_with_each_turn(open_store: Factory) -> None:
    store = open_store(ttl=0.6)
    k = key()
    await store.append(k, "job-1", turn(1))
    await asyncio.sleep(0.4)
    await store.append(k, "job-2", turn(2))
    await asyncio.sleep(0.4)  # 0.8 s after the first turn, 0.4 s after the last
    assert len(await store.load(k, 50)) == 4


async def test_sqlite_prune_deletes_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SQLiteHistoryStore(path, ttl=0.2, max_messages=50)
    old, live = key(), key()
    await store.claim(old)
    await store.append(old, "job-1", turn(1))
    await asyncio.sleep(0.3)
    await store.append(live, "job-2", turn(2))
    assert await store.prune() == 2
    await store.close()
    with sqlite3.connect(path) as db:
        conversations = {row[0] for row in db.execute("SELECT conversation FROM history_messages")}
        owners = db.execute("SELECT count(*) FROM history_owners").fetchone()[0]
        jobs = {row[0] for row in db.execute("SELECT job_id FROM history_jobs")}
    assert conversations == {live.conversation}
    assert owners == 0
    assert jobs == {"job-2"}


async def test_sqlite_is_shared_by_two_stores_on_one_file(tmp_path: Path) -> None:
    """Worker processes of one machine share DATA_DIR's file."""
    path = tmp_path / "history.sqlite3"
    one = SQLiteHistoryStore(path, ttl=60, max_messages=50)
    two = SQLiteHistoryStore(path, ttl=60, max_messages=50)
    k = key()
    await one.append(k, "job-1", turn(1))
    assert texts(await two.load(k, 50)) == ["question 1", "answer 1"]
    await one.close()
    await two.close()


async def test_sqlite_unusable_path_is_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SQLiteHistoryStore(blocker / "history.sqlite3", ttl=60, max_messages=50)
    with pytest.raises(StoreUnavailable):
        await store.load(key(), 50)
    assert await store.ping() is False
    await store.close()


async def test_closed_sqlite_store_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "history.sqlite3", ttl=60, max_messages=50)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.claim(key())


async def test_unreachable_redis_is_store_unavailable() -> None:
    store = RedisHistoryStore("redis://127.0.0.1:1/0", ttl=60, max_messages=50)
    k = key()
    with pytest.raises(StoreUnavailable):
        await store.claim(k)
    with pytest.raises(StoreUnavailable):
        await store.load(k, 10)
    with pytest.raises(StoreUnavailable):
        await store.append(k, "job-1", turn(1))
    assert await store.ping() is False
    await store.close()
