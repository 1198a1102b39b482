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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from chatprocessor.core.errors import StoreUnavailable

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
    """``DATA_DIR/replies.sqlite3``, on one private thread.

    Reads and writes that arrive while the thread is busy are batched: one
    ``SELECT ... IN`` for the reads, one transaction for the writes. With many
    jobs in flight this costs one thread hop and one commit per batch, not per job.
    """

    def __init__(self, path: Path, ttl: float) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reply-store")
        self._db: sqlite3.Connection | None = None
        self._gets: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._puts: list[tuple[str, bytes, asyncio.Future[bytes | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._batches = 0

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # A remembered reply is a cache of what the broker already holds: losing the
            # last ones to a power cut costs a second LLM call, so no fsync per reply.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL,"
                " expires_at REAL NOT NULL)"
            )
            self._db = db
        return self._db

    async def get(self, key: str) -> StoredReply | None:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._gets.append((key, future))
        self._kick()
        return _decode(await future)

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._puts.append((key, _encode(reply), future))
        self._kick()
        return _decode(await future) or reply

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._gets or self._puts:
            gets, puts, self._gets, self._puts = self._gets, self._puts, [], []
            self._batches += 1
            sweep = self._batches % 1000 == 1  # drop expired rows now and then
            try:
                found = await loop.run_in_executor(
                    self._executor, self._apply, [k for k, _ in gets], puts, sweep
                )
            except Exception as exc:  # the whole batch fails alike
                error = StoreUnavailable(f"reply store {self.path}: {exc}")
                for future in [f for _, f in gets] + [f for _, _, f in puts]:
                    if not future.done():
                        future.set_exception(error)
                continue
            for key, future in gets:
                if not future.done():
                    future.set_result(found.get(key))
            for key, _, future in puts:
                if not future.done():
                    future.set_result(found.get(key))

    def _apply(
        self, gets: list[str], puts: list[tuple[str, bytes, Any]], sweep: bool
    ) -> dict[str, bytes]:
        """On the store's thread: the writes in one transaction, then read every key back."""
        db = self._open()
        now = time.time()
        if puts:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO replies (key, reply, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET reply = excluded.reply,"
                    " expires_at = excluded.expires_at WHERE replies.expires_at <= ?",
                    [(key, blob, now + self.ttl, now) for key, blob, _ in puts],
                )
                if sweep:
                    db.execute("DELETE FROM replies WHERE expires_at <= ?", (now,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        keys = list(dict.fromkeys(gets + [key for key, _, _ in puts]))
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT key, reply FROM replies WHERE key IN ({marks}) AND expires_at > ?",
                [*chunk, now],
            )
            found.update((key, bytes(reply)) for key, reply in rows)
        return found

    async def ping(self) -> bool:
        def probe() -> None:
            self._open().execute("SELECT 1").fetchone()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, probe)
        except (sqlite3.Error, OSError):
            return False
        return True

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
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
