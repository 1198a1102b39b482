"""The idempotency store: SQLite by default, Redis (the real server) with REDIS_URL."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.settings import Settings
from chatprocessor.stores import build_reply_store, replies
from chatprocessor.stores.replies import (
    NoReplyStore,
    RedisReplyStore,
    ReplyStore,
    SQLiteReplyStore,
    StoredReply,
)
from tests.conftest import REDIS_URL

REPLY = StoredReply(b'{"conversation_id": 1, "message": "hi \\u00e9"}', "mid-1", "corr-1", "T")


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    stores: list[ReplyStore] = []

    def factory(ttl: float = 60) -> ReplyStore:
        store: ReplyStore
        if request.param == "sqlite":
            store = SQLiteReplyStore(tmp_path / "replies.sqlite3", ttl)
        else:
            store = RedisReplyStore(REDIS_URL, ttl)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


def key() -> str:
    return f"test-queue:{uuid.uuid4()}"


async def test_a_stored_reply_comes_back_intact(open_store: Callable[..., Any]) -> None:
    store = open_store()
    k = key()
    assert await store.get(k) is None
    await store.put(k, REPLY)
    assert await store.get(k) == REPLY
    assert await store.ping()


async def test_another_worker_sees_the_reply(open_store: Callable[..., Any]) -> None:
    first, second = open_store(), open_store()
    k = key()
    await first.put(k, REPLY)
    assert await second.get(k) == REPLY


async def test_replies_expire_after_the_ttl(open_store: Callable[..., Any]) -> None:
    store = open_store(ttl=0.3)
    k = key()
    await store.put(k, REPLY)
    assert await store.get(k) == REPLY
    await asyncio.sleep(0.5)
    assert await store.get(k) is None


async def test_an_unreachable_redis_is_a_store_error() -> None:
    store = RedisReplyStore("redis://127.0.0.1:1/0", 60)
    try:
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        with pytest.raises(StoreUnavailable):
            await store.put("k", REPLY)
        assert not await store.ping()
    finally:
        await store.close()


async def test_an_unwritable_sqlite_file_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SQLiteReplyStore(blocker / "replies.sqlite3", 60)
    try:
        with pytest.raises(StoreUnavailable):
            await store.put("k", REPLY)
    finally:
        await store.close()


async def test_settings_choose_the_store(tmp_path: Path) -> None:
    local = build_reply_store(Settings.load(data_dir=tmp_path))
    redis = build_reply_store(Settings.load(data_dir=tmp_path, redis_url=REDIS_URL))
    off = build_reply_store(Settings.load(data_dir=tmp_path, idempotency_ttl=0))
    try:
        assert isinstance(local, SQLiteReplyStore) and local.path.parent == tmp_path
        assert isinstance(redis, RedisReplyStore)
        assert isinstance(off, NoReplyStore)
        await off.put("k", REPLY)
        assert await off.get("k") is None
    finally:
        for store in (local, redis, off):
            await store.close()


async def test_the_first_reply_stored_wins(open_store: Callable[..., Any]) -> None:
    """Two copies of one request answered at once must publish one body."""
    store = open_store(ttl=0.3)
    k = key()
    other = StoredReply(b'{"conversation_id": 1, "message": "second"}', "mid-1", "corr-1", "T")
    assert await store.put(k, REPLY) == REPLY
    assert await store.put(k, other) == REPLY  # kept the first, and says so
    assert await store.get(k) == REPLY
    await asyncio.sleep(0.5)  # once expired, a new reply takes the place
    assert await store.put(k, other) == other
    assert await store.get(k) == other


async def test_a_write_lock_held_by_another_process_waits_off_the_loop(tmp_path: Path) -> None:
    """Reads and writes run on the loop, but never wait there for another worker's lock."""
    path = tmp_path / "replies.sqlite3"
    store = SQLiteReplyStore(path, 60)
    try:
        await store.put(key(), REPLY)  # creates the file
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another worker is writing
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "COMMIT")
        k = key()
        assert await store.put(k, REPLY) == REPLY  # waited for the lock on the thread
        ticking.cancel()
        assert ticks >= 10, "the event loop was blocked while the store waited for a lock"
        assert await store.get(k) == REPLY
        other.close()
    finally:
        await store.close()


async def test_upkeep_drops_expired_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replies, "UPKEEP_EVERY", 5)
    path = tmp_path / "replies.sqlite3"
    store = SQLiteReplyStore(path, 0.05)
    try:
        for _ in range(4):
            await store.put(key(), REPLY)
        await asyncio.sleep(0.1)  # those four expire
        await store.put(key(), REPLY)  # the fifth write starts the upkeep
        assert store._upkeep is not None
        await store._upkeep
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM replies").fetchone() == (1,)
    finally:
        await store.close()


async def test_under_load_requests_share_one_transaction() -> None:
    """Group commit: the first request goes at once, those made within the spacing of the
    last batch go together in the next one."""
    batches: list[list[str]] = []

    async def serve(items: list[str]) -> list[bytes | None]:
        batches.append(items)
        return [item.encode() for item in items]

    group = replies._TurnBatch(serve, spacing=0.05)
    assert await group.submit("a") == b"a"  # idle: served at once, alone
    results = await asyncio.gather(*(group.submit(k) for k in ("b", "c", "d")))
    assert results == [b"b", b"c", b"d"]
    assert batches == [["a"], ["b", "c", "d"]]
    await group.close()


async def test_a_closed_store_answers_with_an_error_instead_of_hanging(tmp_path: Path) -> None:
    store = SQLiteReplyStore(tmp_path / "replies.sqlite3", 60)
    await store.put(key(), REPLY)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.get(key()), 5)


async def test_an_unexpected_failure_fails_the_batch_instead_of_leaving_it_waiting() -> None:
    async def serve(items: list[str]) -> list[bytes | None]:
        raise RuntimeError("cannot schedule new futures after shutdown")

    group = replies._TurnBatch(serve)
    with pytest.raises(StoreUnavailable, match="cannot schedule"):
        await asyncio.wait_for(group.submit("a"), 5)
    await group.close()
