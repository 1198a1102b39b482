"""Rate limits per minute, hour, day, week and month, kept across restarts.

Built on the ``limits`` library: ``rolling`` is its moving window (a call counts
for exactly one period after it was made), ``fixed`` its fixed window (the count
resets one period after the first call of the window). A week is 7 days and a
month 30 days (the library's month). State lives in Redis when REDIS_URL is set
(shared by every worker), else in ``DATA_DIR/ratelimit.sqlite3`` (shared by the
workers of one machine): ``limits`` has no storage that survives a restart
without a server, so :class:`SQLiteStorage` is a small ``limits`` storage of our
own, run on one thread off the event loop.

A call over the limit waits (:meth:`RateLimiter.acquire` sleeps until the next
slot frees) and is never failed for it. A store that cannot be reached raises
:class:`~chatprocessor.core.errors.StoreUnavailable` (transient) instead.

Counts are kept per period *and* per configured amount (the library's key holds
the amount): changing RATE_LIMIT_PER_HOUR starts that period's count afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerMonth,
)
from limits.aio.storage import MovingWindowSupport, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.errors import StorageError

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.stores.sqlite import enable_wal

log = logging.getLogger(__name__)

Strategy = Literal["rolling", "fixed"]
T = TypeVar("T")

#: Period names, in the order usage() reports them.
PERIODS = ("minute", "hour", "day", "week", "month")
#: A waiting call re-checks at least this often (seconds), so a long wait (a full
#: month) still notices slots freed by a reset or a change of configuration.
MAX_SLEEP = 60.0
#: ...and sleeps at least this long, so rounding (Redis TTLs are whole seconds)
#: never turns a wait into a spin.
MIN_SLEEP = 0.05
#: Added to each computed wait so the call wakes just after the slot frees.
SLACK = 0.01
#: How long a write may wait for another process's lock on the SQLite file (seconds).
BUSY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Calls allowed per period; 0 means no limit for that period."""

    per_minute: int = 0
    per_hour: int = 0
    per_day: int = 0
    per_week: int = 0
    per_month: int = 0
    strategy: Strategy = "rolling"

    def __post_init__(self) -> None:
        for period in PERIODS:
            if getattr(self, f"per_{period}") < 0:
                raise ValueError(f"per_{period} must be >= 0")
        if self.strategy not in ("rolling", "fixed"):
            raise ValueError(f"strategy must be 'rolling' or 'fixed', not {self.strategy!r}")

    @property
    def enabled(self) -> bool:
        """Whether any period is limited."""
        return any(getattr(self, f"per_{period}") > 0 for period in PERIODS)

    def items(self) -> dict[str, RateLimitItem]:
        """The ``limits`` item of each limited period, by period name."""
        every: dict[str, RateLimitItem] = {
            "minute": RateLimitItemPerMinute(self.per_minute),
            "hour": RateLimitItemPerHour(self.per_hour),
            "day": RateLimitItemPerDay(self.per_day),
            "week": RateLimitItemPerDay(self.per_week, 7),
            "month": RateLimitItemPerMonth(self.per_month),  # 30 days
        }
        return {name: item for name, item in every.items() if item.amount > 0}


class RateLimiter:
    """Waits until a call fits every configured period, then counts it."""

    def __init__(
        self,
        limits: Limits,
        *,
        redis_url: str | None,
        data_dir: Path,
        namespace: str = "chatprocessor",
    ) -> None:
        self._items = limits.items()
        self._strategy_name: Strategy = limits.strategy
        self._redis_url = redis_url
        self._data_dir = data_dir
        # The strategy is in the key: a fixed window is a counter, a moving one a list.
        self._ids = (namespace, limits.strategy)
        self._lock = asyncio.Lock()  # test-then-hit is atomic within this process
        self._storage: Storage | None = None
        self._limiter: MovingWindowRateLimiter | FixedWindowRateLimiter | None = None

    @classmethod
    def from_items(
        cls,
        items: Mapping[str, RateLimitItem],
        *,
        strategy: Strategy = "rolling",
        redis_url: str | None,
        data_dir: Path,
        namespace: str = "chatprocessor",
    ) -> RateLimiter:
        """A limiter over explicit ``limits`` items by name, e.g. per-second windows in tests."""
        if any(item.amount <= 0 for item in items.values()):
            raise ValueError("every item needs an amount > 0")
        limiter = cls(
            Limits(strategy=strategy), redis_url=redis_url, data_dir=data_dir, namespace=namespace
        )
        limiter._items = dict(items)
        return limiter

    @property
    def enabled(self) -> bool:
        """Whether any period is limited (a disabled limiter never waits nor opens a store)."""
        return bool(self._items)

    async def acquire(self) -> None:
        """Wait (asyncio.sleep, never busy-wait) until one more call fits every period, then
        count it. Never raises for being over the limit; logs at INFO once per wait with the
        period and how long."""
        if not self._items:
            return
        started: float | None = None
        while True:
            blocked = await self._attempt()
            if not blocked:
                if started is not None:
                    log.debug("rate limit: resumed after %.1fs", time.monotonic() - started)
                return
            delay = max(blocked.values())
            if started is None:
                started = time.monotonic()
                full = ", ".join(f"{self._items[name].amount} per {name}" for name in blocked)
                log.info("rate limit reached (%s): waiting %.1fs for a free slot", full, delay)
            await asyncio.sleep(min(max(delay + SLACK, MIN_SLEEP), MAX_SLEEP))

    async def try_acquire(self) -> bool:
        """Count one call and return True if it fits every period now, else count nothing."""
        return not self._items or not await self._attempt()

    async def usage(self) -> dict[str, dict[str, int | float]]:
        """Per period name: {"limit", "used", "remaining", "reset_in_seconds"} for /health and
        metrics. ``reset_in_seconds`` is when the next slot frees (rolling: the oldest counted
        call leaves the window; fixed: the window resets), 0 when nothing is counted."""
        report: dict[str, dict[str, int | float]] = {}
        if not self._items:
            return report
        limiter = self._strategy()
        for name, item in self._items.items():
            stats = await _guard(limiter.get_window_stats(item, *self._ids))
            remaining = max(0, min(item.amount, stats.remaining))
            used = item.amount - remaining
            reset_in = max(0.0, stats.reset_time - time.time()) if used else 0.0
            report[name] = {
                "limit": item.amount,
                "used": used,
                "remaining": remaining,
                "reset_in_seconds": round(reset_in, 3),
            }
        return report

    async def clear(self) -> None:
        """Forget every count of this limiter's periods (namespace and strategy)."""
        if self._items:
            limiter = self._strategy()
            for item in self._items.values():
                await _guard(limiter.clear(item, *self._ids))

    async def close(self) -> None:
        """Release the store's connection; the counts stay in the store."""
        storage, self._storage, self._limiter = self._storage, None, None
        if isinstance(storage, SQLiteStorage):
            await storage.close()
        elif isinstance(storage, RedisStorage):
            # limits has no close(): its redis-py bridge keeps the client as `storage`.
            client = getattr(storage.bridge, "storage", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _attempt(self) -> dict[str, float]:
        """Count one call if it fits every period: {} then, else the seconds until each full
        period frees a slot, by name."""
        limiter = self._strategy()
        async with self._lock:
            blocked = {}
            for name, item in self._items.items():
                if not await _guard(limiter.test(item, *self._ids)):
                    blocked[name] = await self._free_in(item)
            if blocked:
                return blocked
            for name, item in self._items.items():
                # Only another process can make this fail (after our test): the periods
                # already hit stay counted, so a race errs on the side of fewer calls.
                if not await _guard(limiter.hit(item, *self._ids)):
                    return {name: await self._free_in(item)}
            return {}

    async def _free_in(self, item: RateLimitItem) -> float:
        stats = await _guard(self._strategy().get_window_stats(item, *self._ids))
        return max(0.0, stats.reset_time - time.time())

    def _strategy(self) -> MovingWindowRateLimiter | FixedWindowRateLimiter:
        if self._limiter is None:
            if self._redis_url:
                self._storage = RedisStorage(
                    _async_uri(self._redis_url),
                    implementation="redispy",
                    wrap_exceptions=True,
                    socket_connect_timeout=5,
                    socket_timeout=5,
                )
            else:
                self._storage = SQLiteStorage(self._data_dir.expanduser() / "ratelimit.sqlite3")
            if self._strategy_name == "rolling":
                self._limiter = MovingWindowRateLimiter(self._storage)
            else:
                self._limiter = FixedWindowRateLimiter(self._storage)
        return self._limiter


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except StorageError as exc:
        raise StoreUnavailable(f"rate limit store: {exc.storage_error}") from exc


def _async_uri(url: str) -> str:
    """``redis://…`` as the ``async+redis://…`` URI limits wants."""
    if url.startswith("async+"):
        return url
    if url.startswith("unix://"):
        return "async+redis+" + url
    return "async+" + url


class SQLiteStorage(Storage, MovingWindowSupport):
    """A ``limits`` async storage in one SQLite file, for the fixed and moving windows.

    Every statement runs on one dedicated thread (its own connection), never on the event
    loop. Writes are ``BEGIN IMMEDIATE`` transactions, so workers sharing the file never
    exceed a limit between them. Times are wall-clock (``time.time()``, as in ``limits``),
    so windows carry over a restart.
    """

    STORAGE_SCHEME = None  # not reachable through limits.storage_from_string

    def __init__(self, path: Path) -> None:
        super().__init__(wrap_exceptions=True)
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ratelimit-db")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (sqlite3.Error, OSError)

    async def _run(self, call: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: call(self._connection()))

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                enable_wal(db, BUSY_TIMEOUT)
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY,"
                    " value INTEGER NOT NULL, expires_at REAL NOT NULL)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS events (key TEXT NOT NULL, at REAL NOT NULL,"
                    " expires_at REAL NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS events_by_key ON events (key, at)")
                # Drop what expired while nobody ran, e.g. keys of a former configuration.
                with _transaction(db):
                    now = time.time()
                    db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
                    db.execute("DELETE FROM events WHERE expires_at <= ?", (now,))
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        def incr(db: sqlite3.Connection) -> int:
            with _transaction(db):
                now = time.time()
                db.execute(
                    "INSERT INTO counters (key, value, expires_at) VALUES (?, 0, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = 0, expires_at = excluded.expires_at"
                    " WHERE counters.expires_at <= ?",
                    (key, now + expiry, now),
                )
                row = db.execute(
                    "UPDATE counters SET value = value + ? WHERE key = ? RETURNING value",
                    (amount, key),
                ).fetchone()
                return int(row[0])

        return await self._run(incr)

    async def get(self, key: str) -> int:
        def get(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT value FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(get)

    async def get_expiry(self, key: str) -> float:
        def get_expiry(db: sqlite3.Connection) -> float:
            now = time.time()
            row = db.execute(
                "SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
            return float(row[0]) if row else now

        return await self._run(get_expiry)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        def acquire(db: sqlite3.Connection) -> bool:
            if amount > limit:
                return False
            with _transaction(db):
                now = time.time()
                db.execute("DELETE FROM events WHERE key = ? AND at < ?", (key, now - expiry))
                (count,) = db.execute(
                    "SELECT COUNT(*) FROM events WHERE key = ?", (key,)
                ).fetchone()
                if count + amount > limit:
                    return False
                db.executemany(
                    "INSERT INTO events (key, at, expires_at) VALUES (?, ?, ?)",
                    [(key, now, now + expiry)] * amount,
                )
                return True

        return await self._run(acquire)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        def window(db: sqlite3.Connection) -> tuple[float, int]:
            now = time.time()
            oldest, count = db.execute(
                "SELECT MIN(at), COUNT(*) FROM events WHERE key = ? AND at >= ?",
                (key, now - expiry),
            ).fetchone()
            return (float(oldest), int(count)) if count else (now, 0)

        return await self._run(window)

    async def check(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchall())
        except (sqlite3.Error, OSError):
            return False
        return True

    async def reset(self) -> int | None:
        def reset(db: sqlite3.Connection) -> int:
            with _transaction(db):
                counters = db.execute("DELETE FROM counters").rowcount
                return counters + db.execute("DELETE FROM events").rowcount

        return await self._run(reset)

    async def clear(self, key: str) -> None:
        def clear(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute("DELETE FROM counters WHERE key = ?", (key,))
                db.execute("DELETE FROM events WHERE key = ?", (key,))

        await self._run(clear)

    async def close(self) -> None:
        """Close the connection (on its thread) and stop the thread."""

        def close() -> None:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()

        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
            self._executor.shutdown(wait=False)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock at once) … ``COMMIT``, or ``ROLLBACK`` on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
