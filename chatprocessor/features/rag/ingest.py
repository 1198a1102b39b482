"""Ingesting files: load, chunk, embed in batches, store; unchanged files cost a hash.

A file whose sha256 is already stored is skipped, with one exception: chunks
stored without vectors (or with another model's) are embedded again once this
provider gives real vectors, and replaced only then. Stored vectors are never
replaced by none.

Vectors from a mock provider (``Embeddings.mock``) are never stored: the chunks
go in for lexical search only, with a warning. So do they when the provider
fails; the run then stops asking it (one warning, not one per file).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chatprocessor.core.errors import ProviderError
from chatprocessor.features.rag.chunking import TextChunk, chunk_text
from chatprocessor.features.rag.loaders import Document, DocumentError, discover, load
from chatprocessor.features.rag.store import NewChunk, RagStore
from chatprocessor.providers.base import Provider, same_model

log = logging.getLogger(__name__)

#: Texts per ``embed`` call: large enough to amortize a call, small enough to show progress.
EMBED_BATCH = 16


@dataclass(slots=True)
class IngestReport:
    """What an ingestion did."""

    files: int = 0
    #: Files stored (new, changed, or given vectors they lacked).
    ingested: int = 0
    #: Unchanged files left as they were.
    skipped: int = 0
    #: Chunks stored, and how many of them with a vector.
    chunks: int = 0
    vectors: int = 0
    #: (file, why) of files that could not be read.
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: The embedding model of the stored vectors; None when none were stored.
    model: str | None = None
    #: Why chunks were stored without vectors (mock provider, provider down), if they were.
    lexical_only: str | None = None
    seconds: float = 0.0


#: Called after each file with its path and "ingested", "skipped" or "failed".
Progress = Callable[[Path, str], None]


class Ingestor:
    """Puts files into a RagStore for one tenant; see the module docstring."""

    def __init__(
        self,
        store: RagStore,
        provider: Provider,
        *,
        chunk_tokens: int = 300,
        overlap: int = 40,
        batch_size: int = EMBED_BATCH,
        embedding_model: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        chunk_text("", chunk_tokens=chunk_tokens, overlap=overlap)  # ValueError when invalid
        self.store = store
        self.provider = provider
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.batch_size = batch_size
        self.embedding_model = embedding_model
        self._no_vectors: str | None = None  # why this run stopped asking for vectors

    @property
    def expected_model(self) -> str:
        return self.embedding_model or self.provider.default_embedding_model

    async def ingest(
        self, tenant: str, paths: Iterable[Path], *, progress: Progress | None = None
    ) -> IngestReport:
        """Ingest files and folders (recursively) for ``tenant``. Unreadable files are
        reported, not raised; a missing path raises FileNotFoundError before any work."""
        started = time.monotonic()
        self._no_vectors = None  # a provider down in an earlier run may be back
        files = discover(paths)
        report = IngestReport(files=len(files))
        for path in files:
            try:
                outcome = await self._file(tenant, path, report)
            except (DocumentError, OSError, UnicodeError) as exc:
                log.warning("RAG ingest: %s skipped: %s", path, exc)
                report.failed.append((str(path), str(exc)))
                outcome = "failed"
            if progress is not None:
                progress(path, outcome)
        report.seconds = time.monotonic() - started
        return report

    async def _file(self, tenant: str, path: Path, report: IngestReport) -> str:
        document = await asyncio.to_thread(load, path)
        state = await self.store.document(tenant, document.source)
        unchanged = state is not None and state.sha256 == document.sha256
        if state is not None and unchanged:
            has_right_vectors = state.model is not None and same_model(
                state.model, self.expected_model
            )
            if state.chunks == 0 or has_right_vectors or self._no_vectors:
                report.skipped += 1
                return "skipped"
        chunks = chunk_text(
            document.text,
            chunk_tokens=self.chunk_tokens,
            overlap=self.overlap,
            markdown=document.markdown,
            title=document.title,
        )
        vectors, model = await self._embed(chunks)
        if unchanged and vectors is None:
            report.skipped += 1  # no better vectors than stored: keep what is there
            return "skipped"
        await self._store(tenant, document, chunks, vectors, model)
        report.ingested += 1
        report.chunks += len(chunks)
        if vectors is not None:
            report.vectors += len(chunks)
            report.model = model
        elif chunks and report.lexical_only is None:
            report.lexical_only = self._no_vectors or "embeddings of two models in one document"
            log.warning(
                "RAG ingest: %s; chunks are stored for lexical search only", report.lexical_only
            )
        return "ingested"

    async def _store(
        self,
        tenant: str,
        document: Document,
        chunks: list[TextChunk],
        vectors: list[list[float]] | None,
        model: str | None,
    ) -> None:
        rows = [
            NewChunk(c.ord, c.title, c.text, None if vectors is None else vectors[c.ord])
            for c in chunks
        ]
        await self.store.replace_document(
            tenant,
            document.source,
            sha256=document.sha256,
            title=document.title,
            chunks=rows,
            model=model if vectors is not None else None,
        )

    async def _embed(self, chunks: list[TextChunk]) -> tuple[list[list[float]] | None, str | None]:
        """One vector per chunk (heading included) and their model; (None, None) when this
        run has no real vectors to give."""
        if self._no_vectors or not chunks:
            return None, None
        texts = [f"{c.title}\n{c.text}" if c.title else c.text for c in chunks]
        vectors: list[list[float]] = []
        model: str | None = None
        for start in range(0, len(texts), self.batch_size):
            try:
                batch = await self.provider.embed(
                    texts[start : start + self.batch_size], model=self.embedding_model
                )
            except ProviderError as exc:
                self._stop_vectors(f"the provider cannot embed: {exc}")
                return None, None
            if batch.mock:
                self._stop_vectors(f"{batch.provider} gives mock embeddings")
                return None, None
            if model is not None and not same_model(model, batch.model):
                # A fallback answered part of the document: its vectors do not compare.
                log.warning("RAG ingest: embeddings of one document came from two models")
                return None, None
            model = batch.model
            vectors.extend(batch.vectors)
        return vectors, model

    def _stop_vectors(self, reason: str) -> None:
        """No more ``embed`` calls this run (the report says so if chunks go in without)."""
        self._no_vectors = reason
        log.info("RAG ingest: %s", reason)
