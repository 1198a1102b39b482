"""State stores behind small interfaces: SQLite in DATA_DIR by default, Redis with REDIS_URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatprocessor.settings import Settings
    from chatprocessor.stores.replies import ReplyStore


def build_reply_store(settings: Settings) -> ReplyStore:
    """The idempotency store IDEMPOTENCY_TTL and REDIS_URL ask for."""
    from chatprocessor.stores.replies import NoReplyStore, RedisReplyStore, SQLiteReplyStore

    if settings.idempotency_ttl <= 0:
        return NoReplyStore()
    if settings.redis_url:
        return RedisReplyStore(settings.redis_url, settings.idempotency_ttl)
    return SQLiteReplyStore(
        settings.data_dir.expanduser() / "replies.sqlite3", settings.idempotency_ttl
    )
