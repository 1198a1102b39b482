"""Splitting a document into passages small enough to embed and to quote to a model.

Markdown headings start a new section and become the title of its chunks (the
heading path, ``Install > Linux``), so a chunk keeps the context its text lacks.
Within a section, paragraphs are packed whole up to ``chunk_tokens`` estimated
tokens; a paragraph too long for one chunk is cut at sentences, and a sentence
too long at words. Each chunk after the first of a section repeats the last
``overlap`` tokens of the previous one, so an answer split across a boundary is
still found whole in one of them. Sections never share a chunk.

Tokens are estimated (4 characters each, the usual figure for English with
BPE tokenizers): the chunker must not depend on which model embeds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Characters per estimated token.
CHARS_PER_TOKEN = 4
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
#: A line of a table, list, quote or code: such paragraphs are split at lines.
_STRUCTURED = re.compile(r"^(\s*([|>*+-]|\d+[.)])\s|\s*\||    |\t|\s*(```|~~~))", re.MULTILINE)


@dataclass(slots=True, frozen=True)
class TextChunk:
    """One passage of a document, in document order (``ord`` from 0)."""

    ord: int
    title: str | None
    text: str


@dataclass(slots=True)
class _Piece:
    """A line, sentence or run of words, the paragraph it belongs to, and what joins it to
    the piece before it in that paragraph."""

    text: str
    paragraph: int
    tokens: int
    sep: str = " "


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (at least 1 for any non-empty text)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def chunk_text(
    text: str,
    *,
    chunk_tokens: int = 300,
    overlap: int = 40,
    markdown: bool = False,
    title: str | None = None,
) -> list[TextChunk]:
    """The chunks of ``text``; ``title`` names those before any heading (or all, without
    ``markdown``). Never returns an empty chunk."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError("overlap must be at least 0 and below chunk_tokens")
    sections = split_sections(text, title) if markdown else [(title, text)]
    chunks: list[TextChunk] = []
    for section_title, body in sections:
        for piece_text in _pack(_pieces(body, chunk_tokens), chunk_tokens, overlap):
            chunks.append(TextChunk(len(chunks), section_title, piece_text))
    return chunks


def split_sections(text: str, title: str | None = None) -> list[tuple[str | None, str]]:
    """Markdown ``text`` as (heading path, body) pairs; headings inside code fences are text."""
    sections: list[tuple[str | None, str]] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    current = title
    fenced = False

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append((current, body))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            lines.append(line)
            continue
        close()
        level = len(heading.group(1))
        path = [(lvl, name) for lvl, name in path if lvl < level]
        path.append((level, heading.group(2).strip()))
        current = " > ".join(name for _, name in path)
    close()
    return sections


def _pieces(body: str, chunk_tokens: int) -> list[_Piece]:
    """Paragraphs that fit a chunk whole; longer ones by lines (tables, lists, code), then
    sentences, then runs of words."""
    pieces: list[_Piece] = []
    for number, raw in enumerate(_PARAGRAPH_BREAK.split(body)):
        paragraph = raw.strip()
        if not paragraph:
            continue
        if estimate_tokens(paragraph) <= chunk_tokens:
            pieces.append(_Piece(paragraph, number, estimate_tokens(paragraph)))
            continue
        # Tables, lists and code break at lines; prose at sentences, whatever its wrapping.
        lines = paragraph.splitlines() if _STRUCTURED.search(paragraph) else [paragraph]
        for line in lines:
            sep = "\n"
            for sentence in _SENTENCE_END.split(" ".join(line.split())):
                for part in _word_runs(sentence, chunk_tokens):
                    if part:
                        pieces.append(_Piece(part, number, estimate_tokens(part), sep))
                        sep = " "
    return pieces


def _word_runs(sentence: str, limit: int) -> list[str]:
    """``sentence`` cut between words into runs of at most ``limit`` tokens (a single word
    longer than that is cut too: a URL or a base64 blob is no reason to exceed the limit)."""
    if estimate_tokens(sentence) <= limit:
        return [sentence]
    runs: list[str] = []
    current: list[str] = []
    size = 0  # characters of the run, spaces included
    max_chars = limit * CHARS_PER_TOKEN
    for whole in sentence.split():
        word = whole
        while len(word) > max_chars:
            if current:
                runs.append(" ".join(current))
                current, size = [], 0
            runs.append(word[:max_chars])
            word = word[max_chars:]
        added = len(word) + (1 if current else 0)
        if current and size + added > max_chars:
            runs.append(" ".join(current))
            current, size, added = [], 0, len(word)
        current.append(word)
        size += added
    if current:
        runs.append(" ".join(current))
    return runs


def _join(pieces: list[_Piece]) -> str:
    """Pieces of one paragraph joined by a space, paragraphs by a blank line."""
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if i:
            same = piece.paragraph == pieces[i - 1].paragraph
            out.append(piece.sep if same else "\n\n")
        out.append(piece.text)
    return "".join(out)


def _tail(pieces: list[_Piece], overlap: int) -> list[_Piece]:
    """The last ``overlap`` tokens of a chunk: whole trailing pieces, or the end words of the
    last one when it alone is longer."""
    if overlap == 0 or not pieces:
        return []
    tail: list[_Piece] = []
    total = 0
    for piece in reversed(pieces):
        if total + piece.tokens > overlap:
            break
        tail.insert(0, piece)
        total += piece.tokens
    if tail:
        return tail
    last = pieces[-1]
    words: list[str] = []
    for word in reversed(last.text.split()):
        if estimate_tokens(" ".join([word, *words])) > overlap:
            break
        words.insert(0, word)
    text = " ".join(words)
    return [_Piece(text, last.paragraph, estimate_tokens(text))] if words else []


def _pack(pieces: list[_Piece], chunk_tokens: int, overlap: int) -> list[str]:
    """Pieces packed greedily into chunks of at most ``chunk_tokens`` (the overlap carried
    into a chunk counts toward its size)."""
    chunks: list[str] = []
    current: list[_Piece] = []
    fresh = 0  # pieces of ``current`` that are new, not carried overlap
    limit = chunk_tokens * CHARS_PER_TOKEN
    for piece in pieces:
        if current and len(_join([*current, piece])) > limit:
            if fresh:
                chunks.append(_join(current))
            current = _tail(current, overlap)
            while current and len(_join([*current, piece])) > limit:
                current.pop(0)
            fresh = 0
        current.append(piece)
        fresh += 1
    if fresh:
        chunks.append(_join(current))
    return chunks
