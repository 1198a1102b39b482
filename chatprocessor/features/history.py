"""Conversation history and who owns each conversation.

A conversation belongs to the first user who writes in it (per tenant): a job
from anyone else is refused by the caller, who compares ``claim``'s answer with
its own user. Turns are stored per tenant, user *and* conversation, so even a
bug in that check cannot show one user another's messages. A conversation is
forgotten ``ttl`` seconds after its last turn (the expiry slides), and keeps at
most ``max_messages`` messages. Appending is idempotent per job id: a redelivered
job does not add its turn twice. Only text is kept (never images).

Redis when several machines share the workers; SQLite in DATA_DIR otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import orjson

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.core.job import ChatMessage
from chatprocessor.stores.redis_client import CALL_TIMEOUT
from chatprocessor.stores.sqlite import enable_wal

KEY_PREFIX = "chatprocessor:history"
#: How long a write that finds the SQLite file locked by another process may wait (seconds).
BUSY_TIMEOUT = 30.0
#: Expired SQLite rows are deleted at most this often (seconds); reads skip them meanwhile.
PRUNE_EVERY = 60.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConversationKey:
    tenant: str
    user: str  # "" when the door gave none
    conversation: str


class HistoryStore(Protocol):
    async def claim(self, key: ConversationKey) -> str:
        """Record ``key.user`` as the conversation's owner unless it has one (atomically);
        return the owner (``== key.user`` when the job may use the conversation).
        Owners are per (tenant, conversation)."""
        ...

    async def load(self, key: ConversationKey, max_messages: int) -> list[ChatMessage]:
        """The last ``max_messages`` messages (user/assistant), oldest first."""
        ...

    async def append(self, key: ConversationKey, job_id: str, messages: list[ChatMessage]) -> None:
        """Add the turn; appending the same ``job_id`` twice adds it once (a redelivered job)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def _part(value: str) -> str:
    """A key part that cannot contain the separator: ``a:b`` + ``c`` never meets ``a`` + ``b:c``."""
    return quote(value, safe="")


def _encode(message: ChatMessage) -> bytes:
    return orjson.dumps({"role": message.role, "content": message.content})


def _decode(raw: bytes) -> ChatMessage | None:
    try:
        item = orjson.loads(raw)
        return ChatMessage(str(item["role"]), str(item["content"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # unreadable entry (another version wrote it): left out


# KEYS: owner key. ARGV: user, ttl in ms. The owner's expiry slides with each claim.
_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return owner
"""

# KEYS: messages list, job marker. ARGV: ttl in ms, max messages, then the items.
_APPEND = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""


class RedisHistoryStore:
    """A list per (tenant, user, conversation), an owner key per (tenant, conversation).

    Keys: ``<prefix>:{<tenant>:<user>:<conversation>}:messages`` and ``...:job:<id>``
    (the redelivery marker; the braces keep both in one Redis Cluster slot, as the
    append script needs), ``<prefix>:owner:<tenant>:<conversation>``. Each part is
    percent-encoded, so a ':' inside an id cannot make two conversations meet.
    """

    def __init__(
        self, url: str, *, ttl: float, max_messages: int, prefix: str = KEY_PREFIX
    ) -> None:
        import redis.asyncio as redis

        from chatprocessor.stores.redis_client import redis_client

        self.ttl = ttl
        self.max_messages = max_messages
        self.prefix = prefix
        self._ttl_ms = max(1, math.ceil(ttl * 1000))
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        # No socket_timeout (see RedisReplyStore): calls are bounded with asyncio.timeout.
        self._redis: Any = redis_client(url)
        self._claim: Any = self._redis.register_script(_CLAIM)
        self._append: Any = self._redis.register_script(_APPEND)

    def _conversation(self, key: ConversationKey) -> str:
        return f"{self.prefix}:{{{_part(key.tenant)}:{_part(key.user)}:{_part(key.conversation)}}}"

    def _owner(self, key: ConversationKey) -> str:
        return f"{self.prefix}:owner:{_part(key.tenant)}:{_part(key.conversation)}"

    async def claim(self, key: ConversationKey) -> str:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                owner = await self._claim(keys=[self._owner(key)], args=[key.user, self._ttl_ms])
        except self._errors as exc:
            raise StoreUnavailable(f"history (redis): {exc}") from exc
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def load(self, key: ConversationKey, max_messages: int) -> list[ChatMessage]:
        if max_messages <= 0:
            return []
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                raw = await self._redis.lrange(
                    f"{self._conversation(key)}:messages", -max_messages, -1
                )
        except self._errors as exc:
            raise StoreUnavailable(f"history (redis): {exc}") from exc
        return [m for m in map(_decode, raw) if m is not None]

    async def append(self, key: ConversationKey, job_id: str, messages: list[ChatMessage]) -> None:
        if not messages or self.max_messages <= 0:
            return
        base = self._conversation(key)
        items = [_encode(m) for m in messages]
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await self._append(
                    keys=[f"{base}:messages", f"{base}:job:{_part(job_id)}"],
                    args=[self._ttl_ms, self.max_messages, *items],
                )
        except self._errors as exc:
            raise StoreUnavailable(f"history (redis): {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS history_owners (tenant TEXT NOT NULL,"
    " conversation TEXT NOT NULL, user TEXT NOT NULL, seen_at REAL NOT NULL,"
    " PRIMARY KEY (tenant, conversation))",
    "CREATE TABLE IF NOT EXISTS history_messages (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " tenant TEXT NOT NULL, user TEXT NOT NULL, conversation TEXT NOT NULL,"
    " job_id TEXT NOT NULL, part INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,"
    " created_at REAL NOT NULL)",
    # One row per message of a job's turn: the same turn cannot be inserted twice.
    "CREATE UNIQUE INDEX IF NOT EXISTS history_messages_turn"
    " ON history_messages (tenant, user, conversation, job_id, part)",
    "CREATE INDEX IF NOT EXISTS history_messages_order"
    " ON history_messages (tenant, user, conversation, seq)",
    # Jobs already appended, kept for the ttl even when trimming removed their messages.
    "CREATE TABLE IF NOT EXISTS history_jobs (tenant TEXT NOT NULL, user TEXT NOT NULL,"
    " conversation TEXT NOT NULL, job_id TEXT NOT NULL, created_at REAL NOT NULL,"
    " PRIMARY KEY (tenant, user, conversation, job_id))",
)


class SQLiteHistoryStore:
    """``DATA_DIR/history.sqlite3``, shared by the workers of one machine.

    One connection, used on a worker thread (``asyncio.to_thread``) under a lock, so
    a statement that waits for another process's write lock never blocks the event
    loop. Expiry slides as in Redis: a conversation goes when its newest message is
    older than the ttl; reads skip it at once, deletion happens at most once a minute.
    """

    def __init__(self, path: Path, *, ttl: float, max_messages: int) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self.max_messages = max_messages
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pruned_at = -math.inf

    async def _run(self, statement: Callable[..., T], *args: Any, **options: Any) -> T:
        """``statement(db, *args)`` on a thread, one at a time; errors become StoreUnavailable."""

        def call() -> T:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable(f"history store {self.path} is closed")
                return statement(self._open(), *args, **options)

        try:
            return await asyncio.to_thread(call)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"history store {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread off: to_thread may pick any pool thread; the lock serializes.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                enable_wal(db, BUSY_TIMEOUT)
                db.execute("PRAGMA synchronous=NORMAL")  # history is context, not a record
                for statement in _SCHEMA:
                    db.execute(statement)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def claim(self, key: ConversationKey) -> str:
        return await self._run(_claim, key, time.time(), self.ttl)

    async def load(self, key: ConversationKey, max_messages: int) -> list[ChatMessage]:
        if max_messages <= 0:
            return []
        return await self._run(_load, key, max_messages, time.time() - self.ttl)

    async def append(self, key: ConversationKey, job_id: str, messages: list[ChatMessage]) -> None:
        if not messages or self.max_messages <= 0:
            return
        now = time.time()
        turn = [(m.role, m.content) for m in messages]
        await self._run(_append, key, job_id, turn, now=now, max_messages=self.max_messages)
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY:
            await self.prune()

    async def prune(self) -> int:
        """Delete expired conversations, owners and job markers; return the messages deleted."""
        self._pruned_at = time.monotonic()
        return await self._run(_prune, time.time() - self.ttl)

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchall())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        def shut() -> None:
            with self._lock:
                self._closed = True
                if self._db is not None:
                    db, self._db = self._db, None
                    db.close()

        await asyncio.to_thread(shut)


def _write(db: sqlite3.Connection, body: Callable[[], T]) -> T:
    """``body()`` in one write transaction (BEGIN IMMEDIATE: the lock is taken first)."""
    if db.in_transaction:  # a failed COMMIT earlier must not keep the write lock
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body()
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return result


def _claim(db: sqlite3.Connection, key: ConversationKey, now: float, ttl: float) -> str:
    def body() -> str:
        row = db.execute(
            "SELECT user, seen_at FROM history_owners WHERE tenant = ? AND conversation = ?",
            (key.tenant, key.conversation),
        ).fetchone()
        if row is not None and row[1] > now - ttl and row[0] != key.user:
            return str(row[0])
        db.execute(  # new, expired, or ours: the owner is (still) key.user, seen now
            "INSERT INTO history_owners (tenant, conversation, user, seen_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant, conversation) DO UPDATE SET user = excluded.user,"
            " seen_at = excluded.seen_at",
            (key.tenant, key.conversation, key.user, now),
        )
        return key.user

    return _write(db, body)


def _load(
    db: sqlite3.Connection, key: ConversationKey, limit: int, alive_after: float
) -> list[ChatMessage]:
    where = "tenant = ? AND user = ? AND conversation = ?"
    ident = (key.tenant, key.user, key.conversation)
    if db.in_transaction:  # left open by a failure earlier
        db.execute("ROLLBACK")
    db.execute("BEGIN")  # one snapshot for both reads
    try:
        newest = db.execute(
            f"SELECT max(created_at) FROM history_messages WHERE {where}", ident
        ).fetchone()[0]
        if newest is None or newest <= alive_after:
            return []
        rows = db.execute(
            f"SELECT role, content FROM history_messages WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*ident, limit),
        ).fetchall()
    finally:
        db.execute("COMMIT")
    return [ChatMessage(role, content) for role, content in reversed(rows)]


def _append(
    db: sqlite3.Connection,
    key: ConversationKey,
    job_id: str,
    turn: list[tuple[str, str]],
    *,
    now: float,
    max_messages: int,
) -> None:
    ident = (key.tenant, key.user, key.conversation)

    def body() -> None:
        new = db.execute(
            "INSERT OR IGNORE INTO history_jobs (tenant, user, conversation, job_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (*ident, job_id, now),
        ).rowcount
        if not new:
            return  # a redelivered job: its turn is there already
        db.executemany(
            "INSERT OR IGNORE INTO history_messages (tenant, user, conversation, job_id, part,"
            " role, content, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*ident, job_id, part, role, content, now)
                for part, (role, content) in enumerate(turn)
            ],
        )
        db.execute(  # keep the newest max_messages
            "DELETE FROM history_messages WHERE tenant = ? AND user = ? AND conversation = ?"
            " AND seq < (SELECT seq FROM history_messages WHERE tenant = ? AND user = ?"
            " AND conversation = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (*ident, *ident, max_messages - 1),
        )

    _write(db, body)


def _prune(db: sqlite3.Connection, alive_after: float) -> int:
    def body() -> int:
        deleted = db.execute(
            "DELETE FROM history_messages WHERE (tenant, user, conversation) IN"
            " (SELECT tenant, user, conversation FROM history_messages"
            " GROUP BY tenant, user, conversation HAVING max(created_at) <= ?)",
            (alive_after,),
        ).rowcount
        db.execute("DELETE FROM history_owners WHERE seen_at <= ?", (alive_after,))
        db.execute("DELETE FROM history_jobs WHERE created_at <= ?", (alive_after,))
        return int(deleted)

    return _write(db, body)
