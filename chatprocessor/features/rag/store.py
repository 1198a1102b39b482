"""Where ingested chunks live: the RagStore protocol and its SQLite implementation.

Every method takes the tenant and every query filters by it: a tenant never sees
another's chunks. Lexical search is SQLite FTS5 with ``bm25()`` (or Postgres
full-text search, ``store_postgres``); vector search compares the query with the
tenant's vectors of the same embedding model. (BM25's word statistics are those of
the whole table: other tenants' documents shift scores a little, never rows.)

Vectors are scored by brute force with numpy over the tenant's vectors, held in
memory per (tenant, model) and reloaded when the tenant's ``generation`` (bumped
by every write, from any process) changes. That is exact and fast enough up to
about 100k chunks per tenant (a 100k x 1024 float32 matrix is 400 MB and one
product takes tens of milliseconds); beyond that use Postgres with pgvector.

The schema is created by ``open()`` with ``CREATE ... IF NOT EXISTS``, not by an
Alembic migration: FTS5 virtual tables and their triggers are SQLite-only, and on
Postgres the column type depends on whether the optional pgvector extension can
be created, which a fixed migration cannot express. Tables are prefixed ``rag_``
because DATABASE_URL may be shared with the job metrics tables.

SQLite runs on one private thread with one connection (plain ``sqlite3``: a whole
write, FTS included, is one call on that thread, in one transaction; aiosqlite
would be the same thread with a hop per statement).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from chatprocessor.core.errors import ConfigError, StoreUnavailable

if TYPE_CHECKING:
    from chatprocessor.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
Matrix = npt.NDArray[np.float32]

#: Query words ranked by their weight in every document; dropped unless the query has no other.
_STOPWORDS = (
    "a an and are as at be but by can could do does did for from had has have how i if in into "
    "is it its me my no not of on or our should so than that the their them then there these "
    "they this to was we were what when where which who why will with would you your"
)
STOPWORDS = frozenset(_STOPWORDS.split())
#: At most this many words of a query are searched (bounds the cost of a pasted essay).
MAX_QUERY_TERMS = 32
_WORD = re.compile(r"\w+")


@dataclass(slots=True, frozen=True)
class NewChunk:
    """A chunk to store; ``embedding`` None stores it for lexical search only."""

    ord: int
    title: str | None
    text: str
    embedding: Sequence[float] | None = None


@dataclass(slots=True, frozen=True)
class Hit:
    """A stored chunk found by one search, with that search's score (higher is better)."""

    chunk_id: int | str
    source: str
    title: str | None
    text: str
    score: float


@dataclass(slots=True, frozen=True)
class DocumentState:
    """What is stored for a source: its hash, the model of its vectors (None: lexical only)."""

    sha256: str
    model: str | None
    chunks: int


@dataclass(slots=True, frozen=True)
class StoreStats:
    documents: int
    chunks: int
    vectors: int


class RagStore(Protocol):
    """Chunks of documents per tenant, searchable by words and by vector."""

    #: "sqlite" or "postgres" (logs, CLI).
    kind: str

    async def open(self) -> None:
        """Connect and create the schema if needed (idempotent, safe from many processes)."""
        ...

    async def close(self) -> None: ...

    async def document(self, tenant: str, source: str) -> DocumentState | None:
        """The stored state of ``source``, None when it was never ingested."""
        ...

    async def replace_document(
        self,
        tenant: str,
        source: str,
        *,
        sha256: str,
        title: str | None,
        chunks: Sequence[NewChunk],
        model: str | None,
    ) -> None:
        """Store ``source`` with these chunks, replacing its old ones in one transaction."""
        ...

    async def delete_document(self, tenant: str, source: str) -> bool:
        """Forget ``source`` and its chunks; False when it was not stored."""
        ...

    async def lexical(self, tenant: str, query: str, limit: int) -> list[Hit]:
        """Best ``limit`` chunks for the words of ``query`` (any text is safe), best first."""
        ...

    async def vector(
        self, tenant: str, vector: Sequence[float], model: str, limit: int
    ) -> list[Hit]:
        """Nearest ``limit`` chunks embedded by ``model``, by cosine similarity, best first."""
        ...

    async def vector_models(self, tenant: str) -> set[str]:
        """The embedding models of the tenant's stored vectors (empty: lexical only)."""
        ...

    async def stats(self, tenant: str) -> StoreStats: ...


def query_terms(text: str) -> list[str]:
    """The words of a user's query, lower-cased, each once, stopwords dropped (unless only
    stopwords remain), at most MAX_QUERY_TERMS. Only ``\\w`` characters survive, so no
    search syntax of any engine can get through."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(text)))
    content = [word for word in words if word not in STOPWORDS]
    return (content or words)[:MAX_QUERY_TERMS]


def fts5_query(text: str) -> str | None:
    """An FTS5 MATCH expression for ``text``: its words quoted and OR-ed (BM25 then ranks
    chunks with more, and rarer, words higher). None when there is no word to search."""
    terms = query_terms(text)
    return " OR ".join(f'"{term}"' for term in terms) if terms else None


def as_blob(vector: Sequence[float]) -> bytes:
    """A vector as float32 bytes (half the size of float64; plenty for cosine ranking)."""
    return np.asarray(vector, dtype=np.float32).tobytes()


@dataclass(slots=True)
class _Vectors:
    generation: int
    ids: npt.NDArray[np.int64]
    matrix: Matrix


class VectorCache:
    """The tenant's vectors per model in memory, valid while the tenant's generation holds.

    Least recently used entries go first beyond ``max_entries``.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._entries: OrderedDict[tuple[str, str], _Vectors] = OrderedDict()
        self._max = max_entries

    def get(self, tenant: str, model: str, generation: int) -> _Vectors | None:
        entry = self._entries.get((tenant, model))
        if entry is None or entry.generation != generation:
            return None
        self._entries.move_to_end((tenant, model))
        return entry

    def put(
        self, tenant: str, model: str, generation: int, rows: Sequence[tuple[int, bytes]]
    ) -> _Vectors:
        """Build the matrix from (chunk id, float32 bytes) rows; rows of another dimension than
        the first are left out with a warning (one model has one dimension)."""
        ids: list[int] = []
        vectors: list[Matrix] = []
        for chunk_id, blob in rows:
            vec = np.frombuffer(blob, dtype=np.float32)
            if vectors and vec.shape != vectors[0].shape:
                log.warning(
                    "chunk %s: vector of another dimension for %s, ignored", chunk_id, model
                )
                continue
            ids.append(chunk_id)
            vectors.append(vec)
        matrix = np.vstack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
        entry = _Vectors(generation, np.asarray(ids, dtype=np.int64), matrix)
        self._entries[(tenant, model)] = entry
        self._entries.move_to_end((tenant, model))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return entry


def nearest(entry: _Vectors, query: Sequence[float], limit: int) -> list[tuple[int, float]]:
    """(chunk id, cosine) of the ``limit`` best rows, best first; vectors are unit-length, so
    the dot product is the cosine. A query of another dimension matches nothing."""
    q = np.asarray(query, dtype=np.float32)
    if entry.matrix.shape[0] == 0 or entry.matrix.shape[1] != q.shape[0] or limit <= 0:
        if entry.matrix.shape[0] and entry.matrix.shape[1] != q.shape[0]:
            log.warning(
                "query vector has %d dimensions, stored ones %d", q.shape[0], entry.matrix.shape[1]
            )
        return []
    scores = entry.matrix @ q
    count = min(limit, scores.shape[0])
    best = np.argpartition(-scores, count - 1)[:count]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(entry.ids[i]), float(scores[i])) for i in best]


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///relative``, ``sqlite:////absolute`` (or ``sqlite+aiosqlite``)
    URL; ``:memory:`` as it is."""
    _, sep, rest = url.partition(":///")
    path = rest.split("?", 1)[0]
    if not sep or not path:
        raise ConfigError(f"DATABASE_URL {url!r}: expected sqlite:///path/to/file.db")
    return path


def store_for_url(url: str | None, data_dir: Path) -> RagStore:
    """The store DATABASE_URL names: Postgres, SQLite, or (unset) ``{data_dir}/rag.sqlite3``."""
    if not url:
        return SQLiteRagStore(data_dir.expanduser() / "rag.sqlite3")
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"):
        return SQLiteRagStore(sqlite_path(url))
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        from chatprocessor.features.rag.store_postgres import PostgresRagStore

        return PostgresRagStore("postgresql://" + url.split("://", 1)[1])
    raise ConfigError(f"DATABASE_URL: unsupported scheme {scheme!r} (use sqlite or postgresql)")


async def open_store(settings: Settings) -> RagStore:
    """The RAG store of these settings, opened (schema created when missing)."""
    store = store_for_url(getattr(settings, "database_url", None), settings.data_dir)
    await store.open()
    return store


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rag_documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    title TEXT,
    ingested_at TEXT NOT NULL,
    UNIQUE (tenant, source)
);
CREATE TABLE IF NOT EXISTS rag_chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES rag_documents(id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    ord INTEGER NOT NULL,
    title TEXT,
    text TEXT NOT NULL,
    embedding BLOB,
    model TEXT
);
CREATE INDEX IF NOT EXISTS rag_chunks_document ON rag_chunks(document_id);
CREATE INDEX IF NOT EXISTS rag_chunks_tenant_model ON rag_chunks(tenant, model);
CREATE VIRTUAL TABLE IF NOT EXISTS rag_chunks_fts USING fts5(
    title, text, content='rag_chunks', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS rag_chunks_ai AFTER INSERT ON rag_chunks BEGIN
    INSERT INTO rag_chunks_fts(rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER IF NOT EXISTS rag_chunks_ad AFTER DELETE ON rag_chunks BEGIN
    INSERT INTO rag_chunks_fts(rag_chunks_fts, rowid, title, text)
    VALUES ('delete', old.id, old.title, old.text);
END;
CREATE TABLE IF NOT EXISTS rag_state (
    tenant TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
);
"""

#: bm25() column weights: a word in the heading counts twice a word in the text.
_BM25_WEIGHTS = (2.0, 1.0)


class SQLiteRagStore:
    """RagStore in one SQLite file (FTS5 + numpy); see the module docstring."""

    kind = "sqlite"

    def __init__(self, path: Path | str, *, timeout: float = 30.0, cache_entries: int = 8) -> None:
        self.path = str(path)
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-sqlite")
        self._cache = VectorCache(cache_entries)
        self._models: dict[str, tuple[int, set[str]]] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"RAG store {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("RAG store is not open")
        return self._db

    async def open(self) -> None:
        if self._db is None:
            self._db = await self._call(self._open_sync)

    def _open_sync(self) -> sqlite3.Connection:
        from chatprocessor.stores.sqlite import enable_wal

        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA foreign_keys=ON")
            enable_wal(db, self._timeout)
            db.executescript(_SQLITE_SCHEMA)
        except Exception:
            db.close()
            raise
        return db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)
        self._executor.shutdown(wait=False)

    # -- writes ---------------------------------------------------------------------------

    async def replace_document(
        self,
        tenant: str,
        source: str,
        *,
        sha256: str,
        title: str | None,
        chunks: Sequence[NewChunk],
        model: str | None,
    ) -> None:
        await self._call(
            functools.partial(
                self._replace_sync, tenant, source, sha256=sha256, title=title, chunks=chunks
            ),
            model,
        )

    def _replace_sync(
        self,
        tenant: str,
        source: str,
        model: str | None,
        *,
        sha256: str,
        title: str | None,
        chunks: Sequence[NewChunk],
    ) -> None:
        db = self._conn()
        now = datetime.now(UTC).isoformat()
        with _transaction(db):
            (doc_id,) = db.execute(
                "INSERT INTO rag_documents (tenant, source, sha256, title, ingested_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, source) DO UPDATE SET "
                "sha256 = excluded.sha256, title = excluded.title, "
                "ingested_at = excluded.ingested_at RETURNING id",
                (tenant, source, sha256, title, now),
            ).fetchone()
            db.execute("DELETE FROM rag_chunks WHERE document_id = ?", (doc_id,))
            db.executemany(
                "INSERT INTO rag_chunks (document_id, tenant, ord, title, text, embedding, model) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        doc_id,
                        tenant,
                        chunk.ord,
                        chunk.title,
                        chunk.text,
                        None if chunk.embedding is None else as_blob(chunk.embedding),
                        None if chunk.embedding is None else model,
                    )
                    for chunk in chunks
                ],
            )
            _bump(db, tenant)

    async def delete_document(self, tenant: str, source: str) -> bool:
        return await self._call(self._delete_sync, tenant, source)

    def _delete_sync(self, tenant: str, source: str) -> bool:
        db = self._conn()
        with _transaction(db):
            row = db.execute(
                "SELECT id FROM rag_documents WHERE tenant = ? AND source = ?", (tenant, source)
            ).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM rag_chunks WHERE document_id = ?", row)
            db.execute("DELETE FROM rag_documents WHERE id = ?", row)
            _bump(db, tenant)
        return True

    # -- reads ----------------------------------------------------------------------------

    async def document(self, tenant: str, source: str) -> DocumentState | None:
        return await self._call(self._document_sync, tenant, source)

    def _document_sync(self, tenant: str, source: str) -> DocumentState | None:
        row = (
            self._conn()
            .execute(
                "SELECT d.sha256, "
                "(SELECT model FROM rag_chunks c WHERE c.document_id = d.id "
                " AND c.model IS NOT NULL LIMIT 1), "
                "(SELECT count(*) FROM rag_chunks c WHERE c.document_id = d.id) "
                "FROM rag_documents d WHERE d.tenant = ? AND d.source = ?",
                (tenant, source),
            )
            .fetchone()
        )
        return None if row is None else DocumentState(row[0], row[1], row[2])

    async def lexical(self, tenant: str, query: str, limit: int) -> list[Hit]:
        match = fts5_query(query)
        if match is None or limit <= 0:
            return []
        return await self._call(self._lexical_sync, tenant, match, limit)

    def _lexical_sync(self, tenant: str, match: str, limit: int) -> list[Hit]:
        rows = (
            self._conn()
            .execute(
                "SELECT c.id, d.source, c.title, c.text, bm25(rag_chunks_fts, ?, ?) AS rank "
                "FROM rag_chunks_fts JOIN rag_chunks c ON c.id = rag_chunks_fts.rowid "
                "JOIN rag_documents d ON d.id = c.document_id "
                "WHERE rag_chunks_fts MATCH ? AND c.tenant = ? ORDER BY rank, c.id LIMIT ?",
                (*_BM25_WEIGHTS, match, tenant, limit),
            )
            .fetchall()
        )
        return [Hit(row[0], row[1], row[2], row[3], -float(row[4])) for row in rows]

    async def vector(
        self, tenant: str, vector: Sequence[float], model: str, limit: int
    ) -> list[Hit]:
        if limit <= 0:
            return []
        return await self._call(self._vector_sync, tenant, vector, model, limit)

    def _vector_sync(
        self, tenant: str, vector: Sequence[float], model: str, limit: int
    ) -> list[Hit]:
        db = self._conn()
        with _transaction(db, "BEGIN"):  # one snapshot: generation and vectors agree
            generation = _generation(db, tenant)
            entry = self._cache.get(tenant, model, generation)
            if entry is None:
                rows = db.execute(
                    "SELECT id, embedding FROM rag_chunks "
                    "WHERE tenant = ? AND model = ? AND embedding IS NOT NULL ORDER BY id",
                    (tenant, model),
                ).fetchall()
                entry = self._cache.put(tenant, model, generation, rows)
        best = nearest(entry, vector, limit)
        if not best:
            return []
        scores = dict(best)
        marks = ",".join("?" * len(scores))
        rows = db.execute(
            "SELECT c.id, d.source, c.title, c.text FROM rag_chunks c "
            "JOIN rag_documents d ON d.id = c.document_id "
            f"WHERE c.tenant = ? AND c.id IN ({marks})",
            (tenant, *scores),
        ).fetchall()
        hits = [Hit(row[0], row[1], row[2], row[3], scores[row[0]]) for row in rows]
        return sorted(hits, key=lambda hit: -hit.score)  # a chunk deleted meanwhile is left out

    async def vector_models(self, tenant: str) -> set[str]:
        return await self._call(self._models_sync, tenant)

    def _models_sync(self, tenant: str) -> set[str]:
        db = self._conn()
        generation = _generation(db, tenant)
        cached = self._models.get(tenant)
        if cached is not None and cached[0] == generation:
            return set(cached[1])
        models = {
            row[0]
            for row in db.execute(
                "SELECT DISTINCT model FROM rag_chunks WHERE tenant = ? AND model IS NOT NULL",
                (tenant,),
            )
        }
        self._models[tenant] = (generation, models)
        return set(models)

    async def stats(self, tenant: str) -> StoreStats:
        return await self._call(self._stats_sync, tenant)

    def _stats_sync(self, tenant: str) -> StoreStats:
        db = self._conn()
        (documents,) = db.execute(
            "SELECT count(*) FROM rag_documents WHERE tenant = ?", (tenant,)
        ).fetchone()
        chunks, vectors = db.execute(
            "SELECT count(*), count(embedding) FROM rag_chunks WHERE tenant = ?", (tenant,)
        ).fetchone()
        return StoreStats(documents, chunks, vectors)


class _transaction:
    """BEGIN IMMEDIATE (a writer waits for the lock up front) ... COMMIT, or ROLLBACK."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._db = db
        self._begin = begin

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
            return
        with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
            self._db.execute("ROLLBACK")


def _generation(db: sqlite3.Connection, tenant: str) -> int:
    row = db.execute("SELECT generation FROM rag_state WHERE tenant = ?", (tenant,)).fetchone()
    return int(row[0]) if row else 0


def _bump(db: sqlite3.Connection, tenant: str) -> None:
    """A new generation for the tenant: every process's cached vectors of it are stale."""
    db.execute(
        "INSERT INTO rag_state (tenant, generation) VALUES (?, 1) "
        "ON CONFLICT (tenant) DO UPDATE SET generation = generation + 1",
        (tenant,),
    )
