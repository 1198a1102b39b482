"""The idempotency store: replies already produced, by request, for IDEMPOTENCY_TTL seconds.

A redelivered job (the worker died after its reply was confirmed but before
the ack, or the broker connection dropped) finds its reply here and gets it
again with the same message_id, without a second LLM call. SQLite in DATA_DIR
by default, shared by the workers of one machine; Redis when REDIS_URL is set,
shared by every worker. Both expire entries after the TTL.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from chatprocessor.core.errors import StoreUnavailable

T = TypeVar("T")
KEY_PREFIX = "chatprocessor:reply:"


@dataclass(slots=True)
class StoredReply:
    body: bytes
    message_id: str | None
    correlation_id: str | None
    type: str | None


class ReplyStore(Protocol):
    async def get(self, key: str) -> StoredReply | None:
        """The reply stored for ``key``, if it has not expired."""
        ...

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        """Remember ``reply`` for the TTL unless a live reply is stored already; return the one
        the store keeps. Two copies of a request answered at once thus publish one body."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class NoReplyStore:
    """IDEMPOTENCY_TTL=0: remember nothing (every redelivery reaches the LLM again)."""

    async def get(self, key: str) -> StoredReply | None:
        return None

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        return reply

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class SQLiteReplyStore:
    """``DATA_DIR/replies.sqlite3``; every call runs on one private thread."""

    def __init__(self, path: Path, ttl: float) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reply-store")
        self._db: sqlite3.Connection | None = None
        self._puts = 0

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL,"
                " expires_at REAL NOT NULL)"
            )
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._open())
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"reply store {self.path}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def get(self, key: str) -> StoredReply | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT reply FROM replies WHERE key = ? AND expires_at > ?", (key, time.time())
            ).fetchone()
            return bytes(row[0]) if row else None

        return _decode(await self._run(read))

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        self._puts += 1
        sweep = self._puts % 1000 == 1  # drop expired rows now and then, not on every write

        def write(db: sqlite3.Connection) -> bytes:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO replies (key, reply, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET reply = excluded.reply,"
                    " expires_at = excluded.expires_at WHERE replies.expires_at <= ?",
                    (key, _encode(reply), now + self.ttl, now),
                )
                kept = db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
                if sweep:
                    db.execute("DELETE FROM replies WHERE expires_at <= ?", (now,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return bytes(kept[0])

        return _decode(await self._run(write)) or reply

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=False)


class RedisReplyStore:
    """One key per reply (``chatprocessor:reply:<queue>:<request id>``) with an expiry."""

    def __init__(self, url: str, ttl: float) -> None:
        import redis.asyncio as redis

        self.ttl = ttl
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._redis: Any = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)

    async def get(self, key: str) -> StoredReply | None:
        try:
            raw = await self._redis.get(KEY_PREFIX + key)
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return _decode(raw)

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        try:
            # SET NX GET: store unless present, and get what was there, in one round trip.
            kept = await self._redis.set(
                KEY_PREFIX + key, _encode(reply), px=round(self.ttl * 1000), nx=True, get=True
            )
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return _decode(kept) or reply

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _encode(reply: StoredReply) -> bytes:
    fields = asdict(reply)
    fields["body"] = reply.body.decode()  # replies are our own JSON: always UTF-8
    return orjson.dumps(fields)


def _decode(raw: bytes | None) -> StoredReply | None:
    if raw is None:
        return None
    try:
        fields = orjson.loads(raw)
        fields["body"] = fields["body"].encode()
        return StoredReply(**fields)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None  # unreadable entry (another version wrote it): as if absent
