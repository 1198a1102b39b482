"""Hybrid retrieval: lexical and vector candidates fused by Reciprocal Rank Fusion.

Each search ranks up to ``candidates`` chunks; RRF gives a chunk the sum of
``1 / (rrf_k + rank)`` over the searches that found it (ranks from 1), so a chunk
both find rises, and neither search's raw scores (BM25 against cosine) need to be
comparable. ``rrf_k`` = 60 is the value of the paper (Cormack et al., 2009).

Embeddings being down never fails a job: when the query cannot be embedded, or the
tenant's vectors come from another model than the query's, the search is lexical
only, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from chatprocessor.core.errors import ProviderError
from chatprocessor.core.job import ChatMessage
from chatprocessor.features.rag.store import Hit, RagStore, open_store
from chatprocessor.providers.base import Provider, same_model

if TYPE_CHECKING:
    from chatprocessor.settings import Settings

log = logging.getLogger(__name__)

INSTRUCTION = (
    "Answer the user's question using only the numbered passages below. "
    "Cite the passages you use by their number, like [1]. "
    "If the passages do not contain the answer, say that you do not know."
)
NO_PASSAGES = (
    "No passage of the user's documents matches the question. "
    "Say that the documents do not cover it; do not make up an answer."
)


@dataclass(slots=True)
class Passage:
    """A retrieved chunk: its fused score and its rank in each search (None: not found)."""

    source: str
    title: str | None
    text: str
    chunk_id: int | str
    score: float
    lexical_rank: int | None
    vector_rank: int | None


def rrf_fuse(lexical: Sequence[Hit], vector: Sequence[Hit], *, rrf_k: int = 60) -> list[Passage]:
    """Both rankings fused, best first (ties: the better single rank, then chunk id)."""
    found: dict[int | str, Passage] = {}
    for ranking, field in ((lexical, "lexical_rank"), (vector, "vector_rank")):
        for rank, hit in enumerate(ranking, start=1):
            passage = found.get(hit.chunk_id)
            if passage is None:
                passage = Passage(hit.source, hit.title, hit.text, hit.chunk_id, 0.0, None, None)
                found[hit.chunk_id] = passage
            if getattr(passage, field) is None:  # a chunk listed twice counts once
                setattr(passage, field, rank)
                passage.score += 1.0 / (rrf_k + rank)

    def order(p: Passage) -> tuple[float, int, str]:
        best = min(r for r in (p.lexical_rank, p.vector_rank) if r is not None)
        return (-p.score, best, str(p.chunk_id))

    return sorted(found.values(), key=order)


class Retriever:
    """Finds the passages of a tenant's documents that answer a query."""

    def __init__(
        self,
        store: RagStore,
        provider: Provider,
        *,
        top_k: int = 4,
        candidates: int = 20,
        rrf_k: int = 60,
        vectors: bool = True,
        lexical: bool = True,
    ) -> None:
        if top_k < 1 or candidates < top_k or rrf_k < 0:
            raise ValueError("expected top_k >= 1, candidates >= top_k, rrf_k >= 0")
        if not (vectors or lexical):
            raise ValueError("at least one of vectors and lexical is needed")
        self.store = store
        self.provider = provider
        self.top_k = top_k
        self.candidates = candidates
        self.rrf_k = rrf_k
        #: Which searches run (both by default; one alone to measure it).
        self.use_vectors = vectors
        self.use_lexical = lexical

    async def close(self) -> None:
        """Close the store (the provider belongs to the caller)."""
        await self.store.close()

    async def search(self, tenant: str, query: str) -> list[Passage]:
        """The ``top_k`` best passages for ``query`` among the tenant's chunks."""
        lexical = (
            await self.store.lexical(tenant, query, self.candidates) if self.use_lexical else []
        )
        vector = await self._vector_hits(tenant, query) if self.use_vectors else []
        return rrf_fuse(lexical, vector, rrf_k=self.rrf_k)[: self.top_k]

    async def _vector_hits(self, tenant: str, query: str) -> list[Hit]:
        """Vector candidates, or none (with a warning) when they cannot be had."""
        models = await self.store.vector_models(tenant)
        if not models or not query.strip():
            return []  # lexical-only documents (ingested without real embeddings)
        try:
            embedded = await self.provider.embed([query])
        except ProviderError as exc:
            log.warning("RAG: the query cannot be embedded (%s): lexical search only", exc)
            return []
        stored = next((m for m in sorted(models) if same_model(m, embedded.model)), None)
        if embedded.mock or stored is None:
            log.warning(
                "RAG: the query was embedded by %s%s, the documents by %s: lexical search only "
                "(ingest them again with this provider to search by meaning)",
                embedded.model,
                " (mock)" if embedded.mock else "",
                ", ".join(sorted(models)),
            )
            return []
        return await self.store.vector(tenant, embedded.vectors[0], stored, self.candidates)


def display_source(source: str) -> str:
    """A source as shown to the model and the user: the file name, not the server's path."""
    return PurePath(source).name or source


def rag_messages(passages: list[Passage]) -> ChatMessage:
    """The system message giving the model the passages, numbered [1]..[n], to answer from."""
    if not passages:
        return ChatMessage("system", NO_PASSAGES)
    parts = [INSTRUCTION]
    for number, passage in enumerate(passages, start=1):
        heading = display_source(passage.source)
        if passage.title:
            heading += f" - {passage.title}"
        parts.append(f"[{number}] ({heading})\n{passage.text.strip()}")
    return ChatMessage("system", "\n\n".join(parts))


def sources(passages: list[Passage]) -> list[dict[str, Any]]:
    """The passages as Result.sources: what the answer's [n] refer to, in the same order."""
    return [
        {
            "source": passage.source,
            "title": passage.title,
            "chunk": passage.chunk_id,
            "score": round(passage.score, 6),
        }
        for passage in passages
    ]


async def build_retriever(settings: Settings, provider: Provider) -> Retriever:
    """A Retriever over the settings' store (opened here; close it with ``retriever.store``)."""
    top_k: int = getattr(settings, "rag_top_k", 4)
    store = await open_store(settings)
    return Retriever(store, provider, top_k=top_k, candidates=max(20, top_k))
