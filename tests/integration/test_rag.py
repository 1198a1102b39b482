"""RAG end to end: ingest a generated corpus, retrieve per tenant, fall back to lexical search.

Behaviour tests run against SQLite and Postgres (numpy vector path: no pgvector here), each
Postgres test in its own schema. Retrieval quality is measured with the real embedded model.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chatprocessor.cli_rag import ingest, rag_app
from chatprocessor.features.rag.ingest import Ingestor
from chatprocessor.features.rag.retrieval import Retriever
from chatprocessor.features.rag.store import RagStore, SQLiteRagStore
from chatprocessor.providers.base import Provider
from chatprocessor.providers.mock import MockProvider
from tests.conftest import POSTGRES_URL
from tests.integration.rag_corpus import (
    DOCUMENTS,
    QUESTIONS,
    HashingEmbedder,
    hit_rate,
    write_corpus,
)

pytestmark = pytest.mark.timeout(60)

#: Small chunks, so most documents are several chunks (as real manuals are).
CHUNK_TOKENS = 60
OVERLAP = 10


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RagStore]:
    if request.param == "sqlite":
        opened: RagStore = SQLiteRagStore(tmp_path / "rag.sqlite3")
        await opened.open()
        yield opened
        await opened.close()
        return
    import asyncpg

    from chatprocessor.features.rag.store_postgres import PostgresRagStore

    schema = f"rag_test_{uuid.uuid4().hex[:12]}"
    pg = PostgresRagStore(POSTGRES_URL, schema=schema)
    await pg.open()
    try:
        assert not pg.pgvector  # the numpy path is the one this machine can test
        yield pg
    finally:
        await pg.close()
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def ingestor(store: RagStore, provider: Provider) -> Ingestor:
    return Ingestor(store, provider, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP)


async def measure(retriever: Retriever, tenant: str) -> dict[str, list[str]]:
    """The retrieved file names of every question."""
    results = {}
    for question in QUESTIONS:
        passages = await retriever.search(tenant, question.text)
        results[question.text] = [Path(p.source).name for p in passages]
    return results


# -- quality, with the real embedded model --------------------------------------------------


@pytest.mark.embedded
@pytest.mark.timeout(600)
async def test_hybrid_retrieval_quality_with_the_embedded_model(tmp_path: Path) -> None:
    """Hit@4 (the right document among the 4 passages) of lexical, vector and hybrid search
    over 24 questions, half of them paraphrased. Printed for the notes."""
    from chatprocessor.providers.embedded import EmbeddedProvider

    provider = EmbeddedProvider()
    store = SQLiteRagStore(tmp_path / "rag.sqlite3")
    await store.open()
    try:
        started = time.monotonic()
        report = await ingestor(store, provider).ingest("t", [write_corpus(tmp_path / "docs")])
        ingest_seconds = time.monotonic() - started
        assert report.ingested == len(DOCUMENTS) and report.vectors == report.chunks
        assert report.model == "gemma3-270m" and report.lexical_only is None
        rates = {}
        for name, lexical, vectors in (
            ("lexical", True, False),
            ("vector", False, True),
            ("hybrid", True, True),
        ):
            retriever = Retriever(store, provider, top_k=4, lexical=lexical, vectors=vectors)
            started = time.monotonic()
            results = await measure(retriever, "t")
            seconds = time.monotonic() - started
            rates[name] = (
                hit_rate(results),
                hit_rate(results, paraphrased=False),
                hit_rate(results, paraphrased=True),
            )
            first = sum(results[q.text][:1] == [q.document] for q in QUESTIONS) / len(QUESTIONS)
            missed = [q.text for q in QUESTIONS if q.document not in results[q.text]]
            print(
                f"{name:>8}: hit@4 {rates[name][0]:.2f} (direct {rates[name][1]:.2f}, "
                f"paraphrased {rates[name][2]:.2f}), hit@1 {first:.2f}, "
                f"{seconds / len(QUESTIONS) * 1000:.0f} ms/query; missed: {missed}"
            )
        print(f"ingest: {report.chunks} chunks in {ingest_seconds:.1f} s")
    finally:
        await store.close()
        await provider.close()
    # Measured on this corpus (llama.cpp on 2 cores): lexical 21/24 (it misses 3 paraphrases),
    # vector 24/24, hybrid 23/24, the same on every run. The bar is 22/24: one question of slack
    # for float differences between CPUs and llama.cpp builds, and still above lexical alone,
    # so the vectors must be doing their part.
    hybrid, lexical, vector = rates["hybrid"][0], rates["lexical"][0], rates["vector"][0]
    assert hybrid >= 22 / 24
    assert hybrid > lexical
    assert vector >= 20 / 24  # the embedded model's vectors do find meaning


# -- behaviour, on every store --------------------------------------------------------------


async def test_mock_embeddings_are_not_stored_and_search_is_lexical(
    store: RagStore, tmp_path: Path
) -> None:
    report = await ingestor(store, MockProvider()).ingest("t", [write_corpus(tmp_path / "docs")])
    assert report.ingested == len(DOCUMENTS) and report.chunks > len(DOCUMENTS)
    assert report.vectors == 0 and report.model is None
    assert report.lexical_only is not None and "mock" in report.lexical_only
    stats = await store.stats("t")
    assert (stats.documents, stats.chunks, stats.vectors) == (len(DOCUMENTS), report.chunks, 0)
    assert await store.vector_models("t") == set()

    retriever = Retriever(store, MockProvider(), top_k=4)
    results = await measure(retriever, "t")
    assert hit_rate(results, paraphrased=False) >= 11 / 12
    passages = await retriever.search("t", "descale the espresso machine")
    assert passages and all(p.vector_rank is None and p.lexical_rank for p in passages)


async def test_search_falls_back_to_lexical_when_the_query_cannot_be_embedded(
    store: RagStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = HashingEmbedder()
    report = await ingestor(store, embedder).ingest("t", [write_corpus(tmp_path / "docs")])
    assert report.vectors == report.chunks and report.model == "hashing-64"
    question = "How do I collimate the Orion telescope mirrors?"

    both = await Retriever(store, embedder).search("t", question)
    assert any(p.vector_rank is not None for p in both)
    assert any(p.lexical_rank is not None for p in both)
    assert Path(both[0].source).name == "orion-telescope.md"

    embedder.fail = True
    with caplog.at_level(logging.WARNING):
        down = await Retriever(store, embedder).search("t", question)
    assert down and all(p.vector_rank is None for p in down)
    assert Path(down[0].source).name == "orion-telescope.md"
    assert "cannot be embedded" in caplog.text

    caplog.clear()
    other_model = HashingEmbedder(model="hashing-other")
    with caplog.at_level(logging.WARNING):
        mismatched = await Retriever(store, other_model).search("t", question)
    assert mismatched and all(p.vector_rank is None for p in mismatched)
    assert "hashing-other" in caplog.text and "lexical search only" in caplog.text


async def test_a_tenant_never_sees_another_tenants_chunks(store: RagStore, tmp_path: Path) -> None:
    embedder = HashingEmbedder()
    await ingestor(store, embedder).ingest("acme", [write_corpus(tmp_path / "acme")])
    secret = tmp_path / "globex" / "globex-thermostat.md"
    secret.parent.mkdir()
    secret.write_text(
        "# Globex Thermostat\n\nThe Globex thermostat needs a C-wire too. Code word: zanzibar.\n",
        encoding="utf-8",
    )
    await ingestor(store, embedder).ingest("globex", [secret])

    question = "Why does the thermostat need a C-wire? zanzibar"
    acme = await Retriever(store, embedder, top_k=10).search("acme", question)
    globex = await Retriever(store, embedder, top_k=10).search("globex", question)
    assert acme and all("globex" not in p.source for p in acme)
    assert globex and all(p.source == str(secret.resolve()) for p in globex)
    assert any(p.vector_rank is not None for p in globex)
    assert await store.lexical("acme", "zanzibar", 10) == []
    nearest = await store.vector("acme", embedder.vector(question), "hashing-64", 50)
    assert nearest and all("globex" not in h.source for h in nearest)
    assert await Retriever(store, embedder).search("nobody", question) == []
    assert (await store.stats("globex")).documents == 1
    assert (await store.stats("acme")).documents == len(DOCUMENTS)


async def test_reingest_unchanged_does_nothing_and_a_changed_file_replaces_its_chunks(
    store: RagStore, tmp_path: Path
) -> None:
    embedder = HashingEmbedder()
    docs = write_corpus(tmp_path / "docs")
    first = await ingestor(store, embedder).ingest("t", [docs])
    before = await store.stats("t")
    assert first.chunks == before.chunks
    embedded_texts = embedder.texts
    ids_before = [h.chunk_id for h in await store.lexical("t", "pump battery water", 50)]

    again = await ingestor(store, embedder).ingest("t", [docs])
    assert (again.files, again.skipped, again.ingested, again.chunks) == (len(DOCUMENTS), 12, 0, 0)
    assert embedder.texts == embedded_texts  # nothing embedded again
    assert await store.stats("t") == before
    assert [h.chunk_id for h in await store.lexical("t", "pump battery water", 50)] == ids_before

    changed = docs / "beacon-smoke-alarm.md"
    old = await store.document("t", str(changed.resolve()))
    assert old is not None and old.chunks > 1
    changed.write_text(
        "# Beacon Alarm\n\nThe Beacon now uses a sealed lithium cell lasting ten years.\n",
        encoding="utf-8",
    )
    third = await ingestor(store, embedder).ingest("t", [docs])
    assert (third.ingested, third.skipped, third.chunks) == (1, len(DOCUMENTS) - 1, 1)
    after = await store.stats("t")
    assert after.documents == before.documents
    assert after.chunks == before.chunks - old.chunks + 1
    stale = [h for h in await store.lexical("t", "chirp carbon monoxide", 50)]
    assert all("beacon" not in h.source for h in stale)
    state = await store.document("t", str(changed.resolve()))
    assert state is not None and state.chunks == 1 and state.model == "hashing-64"
    new = await Retriever(store, embedder).search("t", "sealed lithium cell")
    assert Path(new[0].source).name == "beacon-smoke-alarm.md"
    assert "ten years" in new[0].text


async def test_lexical_only_documents_get_vectors_once_real_embeddings_exist(
    store: RagStore, tmp_path: Path
) -> None:
    docs = write_corpus(tmp_path / "docs")
    mock = await ingestor(store, MockProvider()).ingest("t", [docs])
    assert mock.vectors == 0
    again = await ingestor(store, MockProvider()).ingest("t", [docs])
    assert (again.skipped, again.ingested) == (len(DOCUMENTS), 0)  # no work, still lexical

    embedder = HashingEmbedder()
    real = await ingestor(store, embedder).ingest("t", [docs])
    assert real.ingested == len(DOCUMENTS) and real.vectors == real.chunks
    assert (await store.stats("t")).vectors == real.chunks

    down = HashingEmbedder()
    down.fail = True
    kept = await ingestor(store, down).ingest("t", [docs])
    assert kept.skipped == len(DOCUMENTS)
    downgrade = await ingestor(store, MockProvider()).ingest("t", [docs])
    assert downgrade.skipped == len(DOCUMENTS)
    assert (await store.stats("t")).vectors == real.chunks  # real vectors never dropped


async def test_a_changed_file_with_embeddings_down_is_stored_lexical_only(
    store: RagStore, tmp_path: Path
) -> None:
    docs = write_corpus(tmp_path / "docs")
    embedder = HashingEmbedder()
    await ingestor(store, embedder).ingest("t", [docs])
    (docs / "vault-passwords.md").write_text("# Vault\n\nNew passkey support.\n", "utf-8")
    embedder.fail = True
    report = await ingestor(store, embedder).ingest("t", [docs])
    assert report.ingested == 1 and report.vectors == 0
    assert report.lexical_only is not None and "down" in report.lexical_only
    state = await store.document("t", str((docs / "vault-passwords.md").resolve()))
    assert state is not None and state.model is None  # stale vectors of the old text are gone
    hits = await store.lexical("t", "passkey", 5)
    assert [Path(h.source).name for h in hits] == ["vault-passwords.md"]


async def test_unreadable_files_are_reported_and_the_rest_ingested(tmp_path: Path) -> None:
    docs = write_corpus(tmp_path / "docs")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really")
    store = SQLiteRagStore(tmp_path / "rag.sqlite3")
    await store.open()
    try:
        report = await ingestor(store, HashingEmbedder()).ingest("t", [docs])
    finally:
        await store.close()
    assert report.files == len(DOCUMENTS) + 1 and report.ingested == len(DOCUMENTS)
    assert [Path(path).name for path, _ in report.failed] == ["broken.pdf"]


# -- the CLI --------------------------------------------------------------------------------


def test_cli_ingest_then_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = typer.Typer()
    app.command("ingest")(ingest)
    app.add_typer(rag_app, name="rag")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PROVIDERS", "mock")
    docs = write_corpus(tmp_path / "docs")
    runner = CliRunner()

    first = runner.invoke(app, ["ingest", str(docs), "--tenant", "acme", "--chunk-tokens", "80"])
    assert first.exit_code == 0, first.output
    assert "ingested for tenant 'acme'" in first.output and "lexical search only" in first.output
    assert (tmp_path / "data" / "rag.sqlite3").is_file()

    second = runner.invoke(app, ["ingest", str(docs), "--tenant", "acme"])
    assert second.exit_code == 0 and "skipped" in second.output

    found = runner.invoke(app, ["rag", "search", "descale espresso", "--tenant", "acme"])
    assert found.exit_code == 0, found.output
    assert "brewmaster-espresso.md" in found.output
    other = runner.invoke(app, ["rag", "search", "descale espresso", "--tenant", "globex"])
    assert other.exit_code == 0 and "no passage matches" in other.output

    bad = runner.invoke(app, ["ingest", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no such file" in bad.output
    overlap = runner.invoke(app, ["ingest", str(docs), "--chunk-tokens", "20", "--overlap", "30"])
    assert overlap.exit_code == 2
