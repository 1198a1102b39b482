"""The embedded default: a durable queue in one SQLite file, shared by processes on the machine.

Hand-written because no maintained library offers what the worker needs from a
queue: named queues in one file, claims with a visibility timeout that a
live worker keeps renewing (so a job held by a dead process comes back), and
a dead-letter table. persist-queue and litequeue offer one queue per table and
no lease renewal. SQLite's WAL mode lets several processes read and write the
file; a claim is one atomic ``UPDATE ... RETURNING``.

All SQLite calls run on one private thread, so the event loop never waits on
the disk or on another process's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from chatprocessor.core.errors import BrokerUnavailable, Unroutable
from chatprocessor.stores.sqlite import enable_wal
from chatprocessor.transports.base import (
    DLQ_QUEUE,
    DeadLetter,
    Delivery,
    Outgoing,
    replay_headers,
)
from chatprocessor.transports.doorbell import Bell, Ringer

T = TypeVar("T")

REPLY_PREFIX = "reply."
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    message_id TEXT,
    correlation_id TEXT,
    reply_to TEXT,
    type TEXT,
    headers BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    lease TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    message_id TEXT,
    correlation_id TEXT,
    reply_to TEXT,
    type TEXT,
    headers BLOB,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reply_queues (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS listeners (address TEXT PRIMARY KEY, queue TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS listeners_queue ON listeners (queue);
"""
_COLUMNS = "id, body, message_id, correlation_id, reply_to, type, headers, attempts"
#: An idle consumer is woken by a publisher's ring (doorbell.py). It also looks again
#: after this long: for rows whose delay or lease ran out, and for a ring that got lost.
_BELL_POLL = 0.05
#: Without a bell (not Linux) it polls with cheap reads (no write lock), backing off to 10 ms.
_IDLE_POLL_MIN = 0.001
_IDLE_POLL_MAX = 0.01


class LocalDelivery(Delivery):
    """A claimed row; settling it deletes or moves the row if the lease is still ours."""

    def __init__(
        self, transport: LocalTransport, queue: str, row: tuple[Any, ...], lease: str
    ) -> None:
        self._transport = transport
        self.queue = queue
        self.row_id: int = row[0]
        self.body = bytes(row[1])
        self.message_id = row[2]
        self.correlation_id = row[3]
        self.reply_to = row[4]
        self.type = row[5]
        self.headers = orjson.loads(row[6]) if row[6] else {}
        self.attempts: int = row[7]  # claims, including those of workers that died
        self.redelivered = self.attempts > self.attempt + 1
        self.lease = lease

    async def _ack(self) -> None:
        def delete(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE id = ? AND lease = ?", (self.row_id, self.lease))

        await self._transport._settle(self, delete)

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        def move(db: sqlite3.Connection) -> None:
            moved = db.execute(
                "INSERT INTO dead_letters (queue, body, message_id, correlation_id, reply_to, type,"
                " headers, attempts, reason, failed_at) SELECT queue, body, message_id,"
                " correlation_id, reply_to, type, ?, attempts, ?, ? FROM messages"
                " WHERE id = ? AND lease = ?",
                (orjson.dumps(headers), error, time.time(), self.row_id, self.lease),
            ).rowcount
            if moved:
                db.execute(
                    "DELETE FROM messages WHERE id = ? AND lease = ?", (self.row_id, self.lease)
                )

        await self._transport._settle(self, move)

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        def delay_it(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE messages SET visible_at = ?, lease = NULL, headers = ?"
                " WHERE id = ? AND lease = ?",
                (time.time() + delay, orjson.dumps(headers), self.row_id, self.lease),
            )

        await self._transport._settle(self, delay_it)

    async def _release(self) -> None:
        def put_back(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE messages SET visible_at = ?, lease = NULL WHERE id = ? AND lease = ?",
                (time.time(), self.row_id, self.lease),
            )

        await self._transport._settle(self, put_back)


class LocalReplyQueue:
    """A private queue in the same file; deleted with its leftovers on close."""

    def __init__(self, transport: LocalTransport, name: str) -> None:
        self._transport = transport
        self.name = name

    async def messages(self) -> AsyncIterator[Delivery]:
        async for delivery in self._transport.consume(self.name, prefetch=1):
            await delivery.ack()
            yield delivery

    async def close(self) -> None:
        def drop(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM reply_queues WHERE name = ?", (self.name,))
            db.execute("DELETE FROM messages WHERE queue = ?", (self.name,))

        await self._transport._run(drop, commit=True)
        await self._transport._unlisten(self.name)


class LocalTransport:
    """Durable named queues in a SQLite file (``DATA_DIR/queue.sqlite3``)."""

    def __init__(self, path: Path, *, visibility_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.visibility_timeout = visibility_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._held: dict[int, LocalDelivery] = {}
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._bells: dict[str, Bell | None] = {}  # None: tried, none available
        self._ringer = Ringer()
        self._gone: set[str] = set()  # listeners that stopped without unregistering

    async def _run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        commit: bool = False,
        durable: bool = True,
    ) -> T:
        """``fn`` on the file's thread; ``commit``: in one transaction, ``durable``: fsynced."""
        if self._executor is None or self._db is None:
            raise BrokerUnavailable("local queue is not connected")
        db = self._db

        def call() -> T:
            try:
                if not commit:
                    return fn(db)
                if not durable:  # WAL: the next durable commit fsyncs these frames too
                    db.execute("PRAGMA synchronous=NORMAL")
                try:
                    # Autocommit mode (isolation_level=None) never opens a transaction by
                    # itself: BEGIN IMMEDIATE takes the write lock up front, so the
                    # statements of fn commit together or not at all.
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(db)
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                finally:
                    if not durable:
                        db.execute("PRAGMA synchronous=FULL")
                return result
            except sqlite3.Error as exc:
                raise BrokerUnavailable(f"local queue {self.path}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def connect(self, *, attempts: int | None = None) -> None:
        """Open the file (``attempts`` is accepted for the protocol; a file needs no retries)."""
        if self._db is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-queue")

        def open_db() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            enable_wal(db, 30)
            db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut
            db.executescript(_SCHEMA)
            return db

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, open_db)
        except (sqlite3.Error, OSError) as exc:
            raise BrokerUnavailable(f"cannot open local queue {self.path}: {exc}") from exc
        self._renewer = asyncio.create_task(self._renew_leases(), name="local-queue-leases")

    async def declare(self, queue: str) -> None:
        """Queues exist implicitly in the table; nothing to declare."""

    async def declare_input(self, queue: str) -> None:
        """Delays are a row's ``visible_at`` and dead letters a table: nothing to declare."""

    async def publish(self, destination: str, message: Outgoing) -> None:
        gone, self._gone = list(self._gone), set()

        def insert(db: sqlite3.Connection) -> list[str]:
            if gone:
                db.executemany("DELETE FROM listeners WHERE address = ?", [(a,) for a in gone])
            if (
                destination.startswith(REPLY_PREFIX)
                and not db.execute(
                    "SELECT 1 FROM reply_queues WHERE name = ?", (destination,)
                ).fetchone()
            ):
                raise Unroutable(f"reply queue {destination} does not exist (requester gone)")
            now = time.time()
            db.execute(
                "INSERT INTO messages (queue, body, message_id, correlation_id, reply_to, type,"
                " headers, visible_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    destination,
                    message.body,
                    message.message_id,
                    message.correlation_id,
                    message.reply_to,
                    message.type,
                    orjson.dumps(message.headers) if message.headers else None,
                    now,
                    now,
                ),
            )
            rows = db.execute("SELECT address FROM listeners WHERE queue = ?", (destination,))
            return [address for (address,) in rows]

        # A reply queue's reader is waiting now; the worker's durable ack that follows the
        # reply fsyncs it too, so replies and streamed pieces skip their own fsync.
        listeners = await self._run(
            insert, commit=True, durable=not destination.startswith(REPLY_PREFIX)
        )
        self._gone.update(self._ringer.ring(listeners))  # after the commit: the row is there

    async def _claim(self, queue: str) -> LocalDelivery | None:
        lease = uuid.uuid4().hex

        def claim(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            now = time.time()
            row: tuple[Any, ...] | None = db.execute(
                "UPDATE messages SET visible_at = ?, lease = ?, attempts = attempts + 1"
                " WHERE id = (SELECT id FROM messages WHERE queue = ? AND visible_at <= ?"
                f" ORDER BY id LIMIT 1) RETURNING {_COLUMNS}",
                (now + self.visibility_timeout, lease, queue, now),
            ).fetchone()
            return row

        pending = asyncio.ensure_future(self._run(claim, commit=True))
        try:
            row = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The UPDATE may commit on its thread after we were cancelled (shutdown):
            # hand such a claim straight back instead of hiding it for the visibility timeout.
            row = await pending
            if row is not None:
                await LocalDelivery(self, queue, row, lease).release()
            raise
        if row is None:
            return None
        delivery = LocalDelivery(self, queue, row, lease)
        self._held[delivery.row_id] = delivery
        return delivery

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        slots = asyncio.Semaphore(prefetch)
        while True:
            await slots.acquire()
            try:
                delivery = await self._claim(queue)
            except BaseException:
                slots.release()
                raise
            if delivery is None:
                slots.release()
                await self._wait_for_work(queue)
                continue
            self._slots[delivery.row_id] = slots
            yield delivery

    async def _wait_for_work(self, queue: str) -> None:
        """Until a message of ``queue`` may be visible: a ring of this process's bell for the
        queue (its first call registers it, and returns at once: a publish may have come in
        between), or a look every _BELL_POLL with a read that takes no lock. Without a bell
        (not Linux) that read polls, backing off from 1 to 10 ms."""
        if queue not in self._bells:
            self._bells[queue] = await self._listen(queue)
            if self._bells[queue] is not None:
                return

        def ready(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND visible_at <= ? LIMIT 1",
                (queue, time.time()),
            ).fetchone()
            return row is not None

        bell = self._bells[queue]
        if bell is not None:
            while not await bell.wait(_BELL_POLL):
                if await self._run(ready):  # a delay or a dead worker's lease ran out
                    return
            return
        idle = _IDLE_POLL_MIN
        while True:
            await asyncio.sleep(idle)
            if await self._run(ready):
                return
            idle = min(idle * 2, _IDLE_POLL_MAX)

    async def _listen(self, queue: str) -> Bell | None:
        bell = Bell.open()
        if bell is not None:
            address = bell.address

            def register(db: sqlite3.Connection) -> None:
                db.execute("INSERT INTO listeners (address, queue) VALUES (?, ?)", (address, queue))

            try:
                await self._run(register, commit=True)
            except BaseException:
                bell.close()
                raise
        return bell

    async def _unlisten(self, queue: str) -> None:
        bell = self._bells.pop(queue, None)
        if bell is None:
            return
        bell.close()
        address = bell.address

        def unregister(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM listeners WHERE address = ?", (address,))

        with contextlib.suppress(BrokerUnavailable):
            await self._run(unregister, commit=True)

    async def _settle(
        self, delivery: LocalDelivery, fn: Callable[[sqlite3.Connection], None]
    ) -> None:
        try:
            await self._run(fn, commit=True)
        finally:
            self._held.pop(delivery.row_id, None)
            slots = self._slots.pop(delivery.row_id, None)
            if slots is not None:
                slots.release()

    async def _renew_leases(self) -> None:
        """Keep our claims invisible to others while we work on them."""
        interval = self.visibility_timeout / 3
        while True:
            await asyncio.sleep(interval)
            held = [(d.row_id, d.lease) for d in self._held.values()]
            if not held:
                continue

            def renew(db: sqlite3.Connection, held: list[tuple[int, str]] = held) -> None:
                until = time.time() + self.visibility_timeout
                db.executemany(
                    "UPDATE messages SET visible_at = ? WHERE id = ? AND lease = ?",
                    [(until, row_id, lease) for row_id, lease in held],
                )

            with contextlib.suppress(BrokerUnavailable):
                await self._run(renew, commit=True)

    async def open_reply_queue(self) -> LocalReplyQueue:
        name = f"{REPLY_PREFIX}{uuid.uuid4().hex}"

        def create(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO reply_queues (name, created_at) VALUES (?, ?)", (name, time.time())
            )

        await self._run(create, commit=True)
        return LocalReplyQueue(self, name)

    async def depth(self, queue: str) -> int:
        """Messages waiting or in flight on ``queue``."""

        def count(db: sqlite3.Connection) -> int:
            return int(
                db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
            )

        return await self._run(count)

    async def list_dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        def rows(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return db.execute(
                "SELECT id, body, message_id, headers FROM dead_letters WHERE queue = ?"
                " ORDER BY id LIMIT ?",
                (queue, limit),
            ).fetchall()

        return [
            DeadLetter(
                id=str(row[0]),
                body=bytes(row[1]),
                message_id=row[2],
                headers=orjson.loads(row[3]) if row[3] else {},
            )
            for row in await self._run(rows)
        ]

    async def replay_dead_letters(
        self, queue: str, *, limit: int | None = None, message_id: str | None = None
    ) -> int:
        def replay(db: sqlite3.Connection) -> int:
            sql = (
                "SELECT id, body, message_id, correlation_id, reply_to, type, headers"
                " FROM dead_letters WHERE queue = ?"
            )
            params: list[Any] = [queue]
            if message_id is not None:
                sql += " AND message_id = ?"
                params.append(message_id)
            sql += " ORDER BY id LIMIT ?"
            params.append(-1 if limit is None else limit)
            now = time.time()
            rows = db.execute(sql, params).fetchall()
            for row in rows:
                headers = orjson.loads(row[6]) if row[6] else {}
                target = str(headers.get(DLQ_QUEUE) or queue)
                clean = replay_headers(headers)
                db.execute(
                    "INSERT INTO messages (queue, body, message_id, correlation_id, reply_to,"
                    " type, headers, visible_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (target, row[1], *row[2:6], orjson.dumps(clean) if clean else None, now, now),
                )
                db.execute("DELETE FROM dead_letters WHERE id = ?", (row[0],))
            return len(rows)

        return await self._run(replay, commit=True)

    async def purge_dead_letters(self, queue: str) -> int:
        def purge(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM dead_letters WHERE queue = ?", (queue,)).rowcount

        return await self._run(purge, commit=True)

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except BrokerUnavailable:
            return False
        return True

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for delivery in list(self._held.values()):
            with contextlib.suppress(BrokerUnavailable):
                await delivery.release()
        for queue in list(self._bells):
            await self._unlisten(queue)
        self._ringer.close()
        if self._db is not None and self._executor is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
            self._executor.shutdown(wait=False)
            self._executor = None
