"""Retrieval-augmented generation: ingest documents, find the passages that answer a question.

``ingest`` loads and chunks files and stores them with their vectors; ``retrieval``
fuses a lexical and a vector search (RRF) and turns the passages into the system
message a model answers from. Stores: ``store`` (protocol, SQLite), ``store_postgres``.
"""

from chatprocessor.features.rag.ingest import Ingestor, IngestReport
from chatprocessor.features.rag.retrieval import (
    Passage,
    Retriever,
    build_retriever,
    rag_messages,
    rrf_fuse,
    sources,
)
from chatprocessor.features.rag.store import RagStore, open_store

__all__ = [
    "IngestReport",
    "Ingestor",
    "Passage",
    "RagStore",
    "Retriever",
    "build_retriever",
    "open_store",
    "rag_messages",
    "rrf_fuse",
    "sources",
]
