"""RAG building blocks: chunking, loaders (txt, Markdown, a PDF written by hand), RRF fusion,
and FTS queries built safely from any user text."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from chatprocessor.core.errors import ConfigError
from chatprocessor.features.rag.chunking import chunk_text, estimate_tokens, split_sections
from chatprocessor.features.rag.loaders import DocumentError, discover, load
from chatprocessor.features.rag.retrieval import Passage, rag_messages, rrf_fuse, sources
from chatprocessor.features.rag.store import (
    Hit,
    NewChunk,
    SQLiteRagStore,
    fts5_query,
    query_terms,
    store_for_url,
)

pytestmark = pytest.mark.timeout(30)

SENTENCE = "The pump moves water from the well to the tank at a steady rate."


def paragraphs(count: int, sentences: int = 3) -> str:
    return "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s}. {SENTENCE}" for s in range(sentences))
        for p in range(count)
    )


def shared_words(before: str, after: str) -> int:
    """Words of the longest suffix of ``before`` that starts ``after``."""
    a, b = before.split(), after.split()
    return max((n for n in range(1, min(len(a), len(b)) + 1) if a[-n:] == b[:n]), default=0)


# -- chunking ---------------------------------------------------------------------------


def test_chunks_respect_the_size_and_keep_every_paragraph() -> None:
    text = paragraphs(30)
    chunks = chunk_text(text, chunk_tokens=120, overlap=0)
    assert len(chunks) > 5
    assert all(estimate_tokens(c.text) <= 120 for c in chunks)
    assert [c.ord for c in chunks] == list(range(len(chunks)))
    # Without overlap, the chunks are the text again, paragraph for paragraph.
    assert "\n\n".join(c.text for c in chunks).split() == text.split()
    assert all(c.text.count("Paragraph") >= 1 for c in chunks)  # paragraphs kept whole


def test_consecutive_chunks_overlap_by_about_the_overlap() -> None:
    chunks = chunk_text(paragraphs(20, sentences=1), chunk_tokens=100, overlap=30)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        shared = shared_words(before.text, after.text)
        assert shared > 0
        assert estimate_tokens(" ".join(after.text.split()[:shared])) <= 30


def test_a_long_paragraph_is_split_at_sentences_then_words() -> None:
    sentences = " ".join(f"Sentence number {i} talks about valves." for i in range(200))
    chunks = chunk_text(sentences, chunk_tokens=50, overlap=0)
    assert len(chunks) > 10
    assert all(estimate_tokens(c.text) <= 50 for c in chunks)
    assert all(c.text.endswith("valves.") for c in chunks)  # cut between sentences
    words = " ".join(f"word{i}" for i in range(2000))  # no sentence end at all
    runs = chunk_text(words, chunk_tokens=40, overlap=0)
    assert all(estimate_tokens(c.text) <= 40 for c in runs)
    assert " ".join(c.text for c in runs).split() == words.split()
    blob = "x" * 1000  # one "word" longer than a chunk
    cut = chunk_text(blob, chunk_tokens=50, overlap=10)
    assert all(estimate_tokens(c.text) <= 50 for c in cut)
    assert "".join(c.text for c in chunk_text(blob, chunk_tokens=50, overlap=0)) == blob


def test_markdown_headings_become_titles_and_fences_are_text() -> None:
    text = (
        "Intro before any heading.\n\n"
        "# Pump Guide\n\nOverview text.\n\n"
        "## Install\n\nBolt it down.\n\n"
        "### Wiring\n\nConnect the red wire.\n\n"
        "## Use\n\n```bash\n# not a heading\nstart-pump\n```\n\n"
        "## Empty section\n\n"
        "# Appendix ##\n\nSpare parts.\n"
    )
    chunks = chunk_text(text, markdown=True, title="pump")
    titles = [c.title for c in chunks]
    assert titles == [
        "pump",
        "Pump Guide",
        "Pump Guide > Install",
        "Pump Guide > Install > Wiring",
        "Pump Guide > Use",
        "Appendix",
    ]
    assert "# not a heading" in chunks[4].text
    assert all(c.text.strip() for c in chunks)  # the empty section gave no chunk
    assert split_sections("no headings here") == [(None, "no headings here")]


def test_no_empty_chunks_from_blank_or_whitespace_text() -> None:
    assert chunk_text("") == []
    assert chunk_text("\n\n   \n\t\n") == []
    assert chunk_text("# Only\n## Headings\n", markdown=True) == []
    chunks = chunk_text("a\n\n\n\n\nb\n\n \n\nc", chunk_tokens=8, overlap=0)
    assert [c.text for c in chunks] == ["a\n\nb\n\nc"]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        chunk_text("x", chunk_tokens=4)
    with pytest.raises(ValueError):
        chunk_text("x", chunk_tokens=100, overlap=100)
    with pytest.raises(ValueError):
        chunk_text("x", chunk_tokens=100, overlap=-1)


# -- loaders ----------------------------------------------------------------------------


def tiny_pdf(lines: list[str], title: str) -> bytes:
    """A minimal valid one-page PDF with a Helvetica text object per line (offsets computed,
    so pypdf reads it without repairs)."""

    def escape(text: str) -> bytes:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")

    content = (
        b"BT /F1 12 Tf 72 720 Td 14 TL "
        + b" ".join(b"(" + escape(line) + b") Tj T*" for line in lines)
        + b" ET"
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (" + escape(title) + b") >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return out


def test_loaders_read_txt_markdown_and_pdf(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Plain notes about valves.", encoding="utf-8")
    (tmp_path / "guide.md").write_text("# Valve Guide\n\nOpen slowly.\n", encoding="utf-8")
    (tmp_path / "manual.pdf").write_bytes(
        tiny_pdf(["Pressure relief valve", "opens at 6 bar."], "Boiler Manual")
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.markdown").write_text("no heading", encoding="utf-8")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.md").write_text("hidden", encoding="utf-8")

    files = discover([tmp_path, tmp_path / "guide.md"])  # a file listed twice counts once
    assert [f.name for f in files] == ["guide.md", "manual.pdf", "notes.txt", "more.markdown"]

    txt, md, pdf = load(tmp_path / "notes.txt"), load(tmp_path / "guide.md"), load(files[1])
    assert (txt.title, txt.markdown, txt.text) == ("notes", False, "Plain notes about valves.")
    assert (md.title, md.markdown) == ("Valve Guide", True)
    assert pdf.title == "Boiler Manual" and not pdf.markdown
    assert "Pressure relief valve" in pdf.text and "6 bar" in pdf.text
    assert len({txt.sha256, md.sha256, pdf.sha256}) == 3
    assert load(tmp_path / "notes.txt").sha256 == txt.sha256
    assert txt.source == str((tmp_path / "notes.txt").resolve())


def test_loaders_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        discover([tmp_path / "missing"])
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DocumentError, match="unsupported"):
        discover([tmp_path / "data.csv"])
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf")
    with pytest.raises(DocumentError):
        load(tmp_path / "broken.pdf")


# -- RRF fusion -------------------------------------------------------------------------


def hit(chunk_id: int, score: float = 1.0) -> Hit:
    return Hit(chunk_id, f"doc{chunk_id}.md", None, f"text {chunk_id}", score)


def test_rrf_sums_reciprocal_ranks() -> None:
    lexical = [hit(1), hit(2), hit(3)]
    vector = [hit(3), hit(4), hit(1)]
    fused = rrf_fuse(lexical, vector, rrf_k=60)
    scores = {p.chunk_id: p.score for p in fused}
    assert scores[1] == pytest.approx(1 / 61 + 1 / 63)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62)
    assert scores[4] == pytest.approx(1 / 62)
    # 1 and 3 tie: the better single rank wins (both have a rank 1), then the id.
    assert [p.chunk_id for p in fused] == [1, 3, 2, 4]
    first = fused[0]
    assert (first.lexical_rank, first.vector_rank) == (1, 3)
    assert (fused[2].lexical_rank, fused[2].vector_rank) == (2, None)
    assert (fused[3].lexical_rank, fused[3].vector_rank) == (None, 2)


def test_rrf_found_by_both_beats_first_of_one() -> None:
    fused = rrf_fuse([hit(9), hit(5)], [hit(7), hit(5)], rrf_k=1)
    assert fused[0].chunk_id == 5  # 1/3 + 1/3 > 1/2
    assert rrf_fuse([], []) == []
    assert [p.chunk_id for p in rrf_fuse([hit(1), hit(1)], [])] == [1]  # counted once
    assert rrf_fuse([hit(1), hit(1)], [])[0].score == pytest.approx(1 / 61)


def test_rag_message_numbers_passages_and_sources_match() -> None:
    passages = [
        Passage("/srv/docs/pump.md", "Pump > Install", "Bolt it down.", 7, 0.03, 1, 2),
        Passage("/srv/docs/valve.txt", None, "Open slowly.", 9, 0.02, None, 1),
    ]
    message = rag_messages(passages)
    assert message.role == "system"
    assert "[1] (pump.md - Pump > Install)\nBolt it down." in message.content
    assert "[2] (valve.txt)\nOpen slowly." in message.content
    assert "cite" in message.content.lower() and "/srv/docs" not in message.content
    assert sources(passages) == [
        {"source": "/srv/docs/pump.md", "title": "Pump > Install", "chunk": 7, "score": 0.03},
        {"source": "/srv/docs/valve.txt", "title": None, "chunk": 9, "score": 0.02},
    ]
    assert "do not" in rag_messages([]).content


# -- FTS queries ------------------------------------------------------------------------

NASTY = [
    'say "hello',
    "pump AND NOT valve",
    "NEAR(pump valve, 2)",
    "pump*",
    "-pump",
    "title:pump",
    "pump OR",
    "\"\" '' ^ { } ( ) : * + -",
    "AND",
    "ünïcödé naïve café",
    "'; DROP TABLE rag_chunks; --",
    "",
    "   ",
]


def test_query_terms_keep_only_words() -> None:
    assert query_terms('How do I "reset" the PUMP-valve, AND NEAR*?') == [
        "reset",
        "pump",
        "valve",
        "near",
    ]
    assert query_terms("what is it") == ["what", "is", "it"]  # only stopwords: kept
    assert query_terms("") == []
    assert fts5_query("pump pump valve") == '"pump" OR "valve"'
    assert fts5_query("!!!") is None
    assert len(query_terms(" ".join(f"w{i}" for i in range(100)))) == 32


@pytest.mark.parametrize("query", NASTY)
async def test_fts_query_from_any_text_never_raises(tmp_path: Path, query: str) -> None:
    store = SQLiteRagStore(tmp_path / "rag.sqlite3")
    await store.open()
    try:
        await store.replace_document(
            "t",
            "/docs/pump.md",
            sha256="x",
            title="Pump",
            chunks=[NewChunk(0, "Pump", "The pump and the valve: near the café, naïve hello.")],
            model=None,
        )
        hits = await store.lexical("t", query, 5)
        assert isinstance(hits, list)
        if query.strip() and any(w in query.lower() for w in ("pump", "valve", "hello")):
            assert [h.source for h in hits] == ["/docs/pump.md"]
    finally:
        await store.close()


def test_raw_fts_syntax_would_have_raised() -> None:
    """The escaping matters: the same texts as raw MATCH expressions are errors."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(text)")
    for raw in ('say "hello', "pump OR", "NEAR(pump valve, 2", "-pump"):
        with pytest.raises(sqlite3.OperationalError):
            db.execute("SELECT * FROM t WHERE t MATCH ?", (raw,)).fetchall()
        match = fts5_query(raw)
        assert match is not None
        db.execute("SELECT * FROM t WHERE t MATCH ?", (match,)).fetchall()


def test_store_for_url_picks_the_backend(tmp_path: Path) -> None:
    default = store_for_url(None, tmp_path)
    assert isinstance(default, SQLiteRagStore) and default.path == str(tmp_path / "rag.sqlite3")
    explicit = store_for_url("sqlite+aiosqlite:///" + str(tmp_path / "x.db"), tmp_path)
    assert isinstance(explicit, SQLiteRagStore)
    assert explicit.path == str(tmp_path / "x.db")
    assert store_for_url("postgresql://u@h/db", tmp_path).kind == "postgres"
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        store_for_url("mysql://u@h/db", tmp_path)
