"""The idempotency store: replies already produced, by request, for IDEMPOTENCY_TTL seconds.

A redelivered job (the worker died after its reply was confirmed but before
the ack, or the broker connection dropped) finds its reply here and gets it
again with the same message_id, without a second LLM call. SQLite in DATA_DIR
by default, shared by the workers of one machine; Redis when REDIS_URL is set,
shared by every worker. Both expire entries after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import orjson

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.stores.redis_client import CALL_TIMEOUT
from chatprocessor.stores.sqlite import enable_wal

KEY_PREFIX = "chatprocessor:reply:"
#: How long a write that finds the database locked by another process may wait (seconds).
BUSY_TIMEOUT = 30.0
#: Under load, reads wait up to this long (seconds) to share one transaction...
READ_SPACING = 0.002
#: ...and writes up to this long (group commit: ~35 us of the worker's CPU saved per job
#: in bench/overhead.py on 2 cores, for at most 2 ms more before the LLM call and 5 ms
#: before the reply, under load only). Idle, nothing waits.
WRITE_SPACING = 0.005
#: The WAL is checkpointed after this many writes...
UPKEEP_EVERY = 1000
#: ...and expired rows dropped then, if this many seconds have passed since the last time.
SWEEP_EVERY = 60.0

T = TypeVar("T")
R = TypeVar("R")
Item = TypeVar("Item")


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
    """``DATA_DIR/replies.sqlite3``, shared by the workers of one machine.

    Reads and writes run on the event loop: in WAL mode a primary-key lookup or a
    one-row upsert takes microseconds, less than a hop to a thread and back (measured
    in bench/overhead.py). Under load, reads and writes are grouped into one transaction
    each (_TurnBatch). The loop's connection never waits for a lock; what may wait
    goes to a private thread instead: opening the file, a statement that finds the
    database locked by another worker process (retried there, waiting up to
    BUSY_TIMEOUT), and upkeep every UPKEEP_EVERY writes (expired rows dropped, the WAL
    checkpointed, which may fsync).
    """

    def __init__(self, path: Path, ttl: float) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reply-store")
        self._db: sqlite3.Connection | None = None  # the loop's: fails at once when locked
        self._waiting_db: sqlite3.Connection | None = None  # the thread's: waits for locks
        self._opening = asyncio.Lock()
        self._closed = False
        self._reads: _TurnBatch[str] = _TurnBatch(self._read_all, spacing=READ_SPACING)
        self._writes: _TurnBatch[tuple[str, bytes]] = _TurnBatch(
            self._write_all, spacing=WRITE_SPACING
        )
        self._written = 0
        self._swept_at = -math.inf
        self._upkeep: asyncio.Future[None] | None = None

    async def get(self, key: str) -> StoredReply | None:
        return _decode(await self._reads.submit(key))

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        return _decode(await self._writes.submit((key, _encode(reply)))) or reply

    async def _read_all(self, keys: list[str]) -> list[bytes | None]:
        return await self._run(_fetch_all, keys, time.time())

    async def _write_all(self, items: list[tuple[str, bytes]]) -> list[bytes | None]:
        kept = await self._run(_store_all, items, time.time(), self.ttl)
        self._written += len(items)
        if self._written >= UPKEEP_EVERY and (self._upkeep is None or self._upkeep.done()):
            self._written = 0
            now = time.monotonic()
            sweep = now - self._swept_at >= SWEEP_EVERY
            if sweep:
                self._swept_at = now
            self._upkeep = asyncio.ensure_future(self._in_thread(lambda: self._tidy(sweep)))
        return kept

    async def _run(self, statement: Callable[..., R], *args: Any) -> R:
        """``statement(db, *args)`` on the loop; on the thread if another process holds a lock."""
        try:
            db = await self._loop_db()
            try:
                return statement(db, *args)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
            return await self._in_thread(lambda: statement(self._open_waiting(), *args))
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"reply store {self.path}: {exc}") from exc

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _loop_db(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"reply store {self.path} is closed")
        if self._db is None:
            async with self._opening:
                if self._db is None:
                    await self._in_thread(self._open_waiting)  # creates the file and table
                    db = _connect(self.path, timeout=0)
                    db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints: on the thread
                    self._db = db
        return self._db

    def _open_waiting(self) -> sqlite3.Connection:
        """On the thread: the connection that waits for locks (made first: it sets up the file)."""
        if self._waiting_db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(self.path, timeout=BUSY_TIMEOUT)
            enable_wal(db, BUSY_TIMEOUT)
            db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL,"
                " expires_at REAL NOT NULL)"
            )
            self._waiting_db = db
        return self._waiting_db

    def _tidy(self, sweep: bool) -> None:
        db = self._open_waiting()
        if sweep:  # a full scan of the table: not more often than SWEEP_EVERY
            db.execute("DELETE FROM replies WHERE expires_at <= ?", (time.time(),))
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def ping(self) -> bool:
        try:
            await self._run(_probe)
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._reads.close()
        await self._writes.close()
        self._closed = True
        if self._upkeep is not None:
            await asyncio.gather(self._upkeep, return_exceptions=True)
        if self._db is not None:
            db, self._db = self._db, None
            db.close()
        if self._waiting_db is not None:
            waiting, self._waiting_db = self._waiting_db, None
            await self._in_thread(waiting.close)
        self._executor.shutdown(wait=False)


def _connect(path: Path, *, timeout: float) -> sqlite3.Connection:
    # check_same_thread: the thread's connection is made and used on that one thread.
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    # A remembered reply is a cache of what the broker already holds: losing the
    # last ones to a power cut costs a second LLM call, so no fsync per reply.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _probe(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchall()


def _fetch_all(db: sqlite3.Connection, keys: list[str], now: float) -> list[bytes | None]:
    """The live reply of each key, in one read transaction."""
    if len(keys) == 1:
        return [_fetch(db, keys[0], now)]
    found: dict[str, bytes] = {}
    for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT key, reply FROM replies WHERE key IN ({marks}) AND expires_at > ?",
            [*chunk, now],
        )
        found.update((key, bytes(reply)) for key, reply in rows)
    return [found.get(key) for key in keys]


def _fetch(db: sqlite3.Connection, key: str, now: float) -> bytes | None:
    rows = db.execute(
        "SELECT reply FROM replies WHERE key = ? AND expires_at > ?", (key, now)
    ).fetchall()
    return bytes(rows[0][0]) if rows else None


def _store_all(
    db: sqlite3.Connection, items: list[tuple[str, bytes]], now: float, ttl: float
) -> list[bytes | None]:
    """``_store`` for each item, in one transaction; nothing is written if one fails."""
    if db.in_transaction:  # a failed COMMIT earlier must not keep the write lock
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")  # takes the write lock now, or fails at once (BUSY)
    try:
        kept = [_store(db, key, blob, now, ttl) for key, blob in items]
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return kept


def _store(db: sqlite3.Connection, key: str, blob: bytes, now: float, ttl: float) -> bytes | None:
    """Insert unless a live reply is there; return that live reply, None if ours was stored."""
    written = db.execute(
        "INSERT INTO replies (key, reply, expires_at) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET reply = excluded.reply,"
        " expires_at = excluded.expires_at WHERE replies.expires_at <= ?",
        (key, blob, now + ttl, now),
    ).rowcount
    return None if written else _fetch(db, key, now)


class _TurnBatch(Generic[Item]):
    """Requests served together by one call (one transaction): group commit.

    The first waiting request starts the batch at once when the previous one is at least
    ``spacing`` old, else when it will be; every request made before the batch runs joins
    it. An idle worker never waits; a busy one pays a transaction's system calls, which
    are most of its cost, once per batch instead of once per job.
    """

    def __init__(
        self,
        serve: Callable[[list[Item]], Awaitable[list[bytes | None]]],
        *,
        spacing: float = 0.0,
    ) -> None:
        self._serve = serve
        self._spacing = spacing
        self._last = -math.inf
        self._waiting: list[tuple[Item, asyncio.Future[bytes | None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: Item) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._waiting.append((item, future))
        if len(self._waiting) == 1:
            delay = self._last + self._spacing - loop.time()
            if delay > 0:
                self._timer = loop.call_later(delay, self._start)
            else:
                self._start()
        return await future

    def _start(self) -> None:
        self._timer = None
        self._last = asyncio.get_running_loop().time()
        task = asyncio.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            results = await self._serve([item for item, _ in batch])
        except BaseException as exc:  # whatever it was, no request of the batch waits forever
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Serve what waits for a timer now, then wait for every batch."""
        if self._timer is not None:
            self._timer.cancel()
            self._start()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisReplyStore:
    """One key per reply (``chatprocessor:reply:<queue>:<request id>``) with an expiry."""

    def __init__(self, url: str, ttl: float) -> None:
        import redis.asyncio as redis

        from chatprocessor.stores.redis_client import redis_client

        self.ttl = ttl
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        # No socket_timeout: redis-py enforces it with asyncio.wait_for, which on Python 3.11
        # can swallow a task's cancellation (a worker that never stops); calls are bounded
        # with asyncio.timeout instead.
        self._redis: Any = redis_client(url)

    async def get(self, key: str) -> StoredReply | None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                raw = await self._redis.get(KEY_PREFIX + key)
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return _decode(raw)

    async def put(self, key: str, reply: StoredReply) -> StoredReply:
        try:
            # SET NX GET: store unless present, and get what was there, in one round trip.
            async with asyncio.timeout(CALL_TIMEOUT):
                kept = await self._redis.set(
                    KEY_PREFIX + key, _encode(reply), px=round(self.ttl * 1000), nx=True, get=True
                )
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return _decode(kept) or reply

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return bool(await self._redis.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _encode(reply: StoredReply) -> bytes:
    return orjson.dumps(
        {
            "body": reply.body.decode(),  # replies are our own JSON: always UTF-8
            "message_id": reply.message_id,
            "correlation_id": reply.correlation_id,
            "type": reply.type,
        }
    )


def _decode(raw: bytes | None) -> StoredReply | None:
    if raw is None:
        return None
    try:
        fields = orjson.loads(raw)
        fields["body"] = fields["body"].encode()
        return StoredReply(**fields)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None  # unreadable entry (another version wrote it): as if absent
