"""RagStore on PostgreSQL (asyncpg): full-text search and pgvector, or numpy without it.

Lexical: a generated ``tsvector`` column (heading weighted A, text B) with a GIN
index, ranked by ``ts_rank_cd``; the query is the user's words OR-ed through
``websearch_to_tsquery`` (which never raises on any input; the words are ``\\w``
only, so no operator of the user's gets through).

Vectors: ``open()`` tries ``CREATE EXTENSION IF NOT EXISTS vector``. With it the
``embedding`` column is a pgvector ``vector`` searched with ``<=>`` (cosine) through
one HNSW index per dimension (a partial expression index, as pgvector advises for
mixed dimensions). Without it the column is ``bytea`` (float32) and vectors are
scored with numpy in this process, cached per tenant and model like the SQLite
store. The table keeps the type it was created with; the log says which is used.

The pgvector path is untested on machines without the extension (the CI machine
has none); the numpy path is what the tests run.

asyncpg directly rather than SQLAlchemy: every statement here is Postgres-specific
SQL (tsvector, pgvector operators), so an ORM layer would add cost and no
portability.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.features.rag.store import (
    DocumentState,
    Hit,
    NewChunk,
    StoreStats,
    VectorCache,
    as_blob,
    nearest,
    query_terms,
)

log = logging.getLogger(__name__)

#: Largest dimension pgvector's HNSW index takes for ``vector``; larger ones are scanned.
HNSW_MAX_DIMENSIONS = 2000
#: Candidates HNSW examines (pgvector's default 40 is few once tenant and model filter them).
HNSW_EF_SEARCH = 200
#: Serializes schema creation of workers starting together (any 64-bit constant).
_SCHEMA_LOCK = 0x7261675F736368  # "rag_sch"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _schema_sql(embedding_type: str, language: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS rag_documents (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    title TEXT,
    ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (tenant, source)
);
CREATE TABLE IF NOT EXISTS rag_chunks (
    id BIGSERIAL PRIMARY KEY,
    document_id BIGINT NOT NULL REFERENCES rag_documents(id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    ord INTEGER NOT NULL,
    title TEXT,
    text TEXT NOT NULL,
    model TEXT,
    dims INTEGER,
    embedding {embedding_type},
    tsv TSVECTOR GENERATED ALWAYS AS (
        setweight(to_tsvector('{language}', coalesce(title, '')), 'A')
        || setweight(to_tsvector('{language}', text), 'B')
    ) STORED
);
CREATE INDEX IF NOT EXISTS rag_chunks_tsv ON rag_chunks USING GIN (tsv);
CREATE INDEX IF NOT EXISTS rag_chunks_document ON rag_chunks (document_id);
CREATE INDEX IF NOT EXISTS rag_chunks_tenant_model ON rag_chunks (tenant, model);
CREATE TABLE IF NOT EXISTS rag_state (
    tenant TEXT PRIMARY KEY,
    generation BIGINT NOT NULL
);
"""


def _vector_literal(vector: Sequence[float]) -> str:
    """pgvector's text form, ``[0.1,0.2]`` (sent as text and cast: no client codec needed)."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


class PostgresRagStore:
    """RagStore in PostgreSQL; see the module docstring. ``schema`` (created when missing)
    keeps its tables apart, e.g. one per test."""

    kind = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        language: str = "english",
        min_size: int = 1,
        max_size: int = 4,
        cache_entries: int = 8,
    ) -> None:
        for name, value in (("schema", schema), ("language", language)):
            if value is not None and not _IDENTIFIER.match(value):
                raise ValueError(f"{name} {value!r} is not a plain SQL identifier")
        self._dsn = dsn
        self._schema = schema
        self._language = language
        self._sizes = (min_size, max_size)
        self._pool: asyncpg.Pool | None = None
        self._cache = VectorCache(cache_entries)
        #: True: pgvector column; False: bytea scored with numpy. Known after open().
        self.pgvector = False
        self._indexed_dims: set[int] = set()
        self._iterative_scan: bool | None = None

    def _ready(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("RAG store is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {"search_path": f'"{self._schema}", public'} if self._schema else {}
        try:
            if self._schema:
                conn = await asyncpg.connect(self._dsn)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                except asyncpg.UniqueViolationError:
                    pass  # created by another process at the same moment
                finally:
                    await conn.close()
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._sizes[0],
                max_size=self._sizes[1],
                server_settings=settings,
            )
            try:
                async with pool.acquire() as conn:
                    await self._create_schema(conn)
            except BaseException:
                await pool.close()
                raise
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc
        self._pool = pool

    async def _create_schema(self, conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            existing = await conn.fetchval(
                "SELECT udt_name FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND table_name = 'rag_chunks' AND column_name = 'embedding'"
            )
            reason = ""
            if existing is None:
                try:
                    async with conn.transaction():  # a savepoint: a failure leaves the rest
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
                    self.pgvector = True
                except asyncpg.PostgresError as exc:
                    reason = str(exc)
            else:
                self.pgvector = existing == "vector"
                reason = "the table was created without it"
            await conn.execute(_schema_sql("vector" if self.pgvector else "bytea", self._language))
        if self.pgvector:
            log.info("RAG store: Postgres with pgvector (HNSW cosine indexes)")
        else:
            log.info("RAG store: Postgres without pgvector (%s): vectors scored with numpy", reason)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

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
        rows = []
        dims: set[int] = set()
        for chunk in chunks:
            vector = chunk.embedding
            if vector is not None:
                dims.add(len(vector))
            stored: Any = None
            if vector is not None:
                stored = _vector_literal(vector) if self.pgvector else as_blob(vector)
            rows.append(
                (
                    tenant,
                    chunk.ord,
                    chunk.title,
                    chunk.text,
                    None if vector is None else model,
                    None if vector is None else len(vector),
                    stored,
                )
            )
        cast = "$8::text::vector" if self.pgvector else "$8"
        try:
            async with self._ready().acquire() as conn, conn.transaction():
                doc_id = await conn.fetchval(
                    "INSERT INTO rag_documents (tenant, source, sha256, title) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, source) DO UPDATE SET "
                    "sha256 = EXCLUDED.sha256, title = EXCLUDED.title, ingested_at = now() "
                    "RETURNING id",
                    tenant,
                    source,
                    sha256,
                    title,
                )
                await conn.execute("DELETE FROM rag_chunks WHERE document_id = $1", doc_id)
                await conn.executemany(
                    "INSERT INTO rag_chunks "
                    "(document_id, tenant, ord, title, text, model, dims, embedding) "
                    f"VALUES ($1, $2, $3, $4, $5, $6, $7, {cast})",
                    [(doc_id, *row) for row in rows],
                )
                await _bump(conn, tenant)
            if self.pgvector:
                for size in dims - self._indexed_dims:
                    await self._index_dimension(size)
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc

    async def _index_dimension(self, size: int) -> None:
        """An HNSW cosine index for vectors of ``size`` dimensions (once per process)."""
        self._indexed_dims.add(size)
        if size > HNSW_MAX_DIMENSIONS:
            log.warning("RAG store: %d-dimension vectors are too large for HNSW: scanned", size)
            return
        try:
            async with self._ready().acquire() as conn:
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS rag_chunks_hnsw_{size} ON rag_chunks "
                    f"USING hnsw ((embedding::vector({size})) vector_cosine_ops) "
                    f"WHERE dims = {size}"
                )
        except asyncpg.UniqueViolationError:
            pass  # another process created it at the same moment

    async def delete_document(self, tenant: str, source: str) -> bool:
        try:
            async with self._ready().acquire() as conn, conn.transaction():
                deleted = await conn.fetchval(
                    "DELETE FROM rag_documents WHERE tenant = $1 AND source = $2 RETURNING id",
                    tenant,
                    source,
                )
                if deleted is not None:
                    await _bump(conn, tenant)
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc
        return deleted is not None

    # -- reads ----------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self._ready().acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc

    async def document(self, tenant: str, source: str) -> DocumentState | None:
        rows = await self._fetch(
            "SELECT d.sha256, "
            "(SELECT model FROM rag_chunks c WHERE c.document_id = d.id "
            " AND c.model IS NOT NULL LIMIT 1) AS model, "
            "(SELECT count(*) FROM rag_chunks c WHERE c.document_id = d.id) AS chunks "
            "FROM rag_documents d WHERE d.tenant = $1 AND d.source = $2",
            tenant,
            source,
        )
        return DocumentState(rows[0][0], rows[0][1], int(rows[0][2])) if rows else None

    async def lexical(self, tenant: str, query: str, limit: int) -> list[Hit]:
        terms = [term for term in query_terms(query) if term != "or"]
        if not terms or limit <= 0:
            return []
        rows = await self._fetch(
            "SELECT c.id, d.source, c.title, c.text, ts_rank_cd(c.tsv, q) AS score "
            "FROM rag_chunks c JOIN rag_documents d ON d.id = c.document_id, "
            f"websearch_to_tsquery('{self._language}', $2) AS q "
            "WHERE c.tenant = $1 AND c.tsv @@ q ORDER BY score DESC, c.id LIMIT $3",
            tenant,
            " or ".join(terms),
            limit,
        )
        return [Hit(r[0], r[1], r[2], r[3], float(r[4])) for r in rows]

    async def vector(
        self, tenant: str, vector: Sequence[float], model: str, limit: int
    ) -> list[Hit]:
        if limit <= 0:
            return []
        if self.pgvector:
            return await self._vector_pgvector(tenant, vector, model, limit)
        try:
            async with self._ready().acquire() as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    generation = await _generation(conn, tenant)
                    entry = self._cache.get(tenant, model, generation)
                    if entry is None:
                        rows = await conn.fetch(
                            "SELECT id, embedding FROM rag_chunks WHERE tenant = $1 "
                            "AND model = $2 AND embedding IS NOT NULL ORDER BY id",
                            tenant,
                            model,
                        )
                        entry = self._cache.put(
                            tenant, model, generation, [(r[0], r[1]) for r in rows]
                        )
                best = nearest(entry, vector, limit)
                if not best:
                    return []
                scores = dict(best)
                rows = await conn.fetch(
                    "SELECT c.id, d.source, c.title, c.text FROM rag_chunks c "
                    "JOIN rag_documents d ON d.id = c.document_id "
                    "WHERE c.tenant = $1 AND c.id = ANY($2::bigint[])",
                    tenant,
                    list(scores),
                )
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc
        hits = [Hit(r[0], r[1], r[2], r[3], scores[r[0]]) for r in rows]
        return sorted(hits, key=lambda hit: -hit.score)

    async def _vector_pgvector(
        self, tenant: str, vector: Sequence[float], model: str, limit: int
    ) -> list[Hit]:
        size = len(vector)  # an int of ours: safe to put in the SQL, as the index needs
        distance = f"c.embedding::vector({size}) <=> $3::text::vector({size})"
        try:
            async with self._ready().acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
                if self._iterative_scan is not False:  # pgvector >= 0.8: no lost filtered rows
                    try:
                        async with conn.transaction():
                            await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
                        self._iterative_scan = True
                    except asyncpg.PostgresError:
                        self._iterative_scan = False
                rows = await conn.fetch(
                    f"SELECT c.id, d.source, c.title, c.text, 1 - ({distance}) AS score "
                    "FROM rag_chunks c JOIN rag_documents d ON d.id = c.document_id "
                    f"WHERE c.tenant = $1 AND c.model = $2 AND c.dims = {size} "
                    f"ORDER BY {distance} LIMIT $4",
                    tenant,
                    model,
                    _vector_literal(vector),
                    limit,
                )
        except _ERRORS as exc:
            raise StoreUnavailable(f"RAG store (Postgres): {exc}") from exc
        return [Hit(r[0], r[1], r[2], r[3], float(r[4])) for r in rows]

    async def vector_models(self, tenant: str) -> set[str]:
        rows = await self._fetch(
            "SELECT DISTINCT model FROM rag_chunks WHERE tenant = $1 AND model IS NOT NULL",
            tenant,
        )
        return {row[0] for row in rows}

    async def stats(self, tenant: str) -> StoreStats:
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM rag_documents WHERE tenant = $1), "
            "count(*), count(embedding) FROM rag_chunks WHERE tenant = $1",
            tenant,
        )
        return StoreStats(int(rows[0][0]), int(rows[0][1]), int(rows[0][2]))


async def _generation(conn: Any, tenant: str) -> int:
    value = await conn.fetchval("SELECT generation FROM rag_state WHERE tenant = $1", tenant)
    return int(value) if value is not None else 0


async def _bump(conn: Any, tenant: str) -> None:
    """A new generation for the tenant: every process's cached vectors of it are stale."""
    await conn.execute(
        "INSERT INTO rag_state (tenant, generation) VALUES ($1, 1) "
        "ON CONFLICT (tenant) DO UPDATE SET generation = rag_state.generation + 1",
        tenant,
    )
