"""Reading documents to ingest: plain text, Markdown and PDF (text layer, through pypdf).

A document is identified by its resolved path and versioned by the sha256 of its
bytes, so re-ingesting an unchanged file costs one hash and one lookup.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES | TEXT_SUFFIXES | PDF_SUFFIXES


class DocumentError(ValueError):
    """A file cannot be read as a document (unsupported, corrupt, or no text in it)."""


@dataclass(slots=True, frozen=True)
class Document:
    """A file's text, ready to chunk."""

    source: str
    title: str | None
    text: str
    markdown: bool
    sha256: str


def discover(paths: Iterable[Path]) -> list[Path]:
    """The supported files among ``paths``, folders searched recursively (hidden entries
    skipped), each once, sorted. A missing path raises FileNotFoundError; a file named
    directly with an unsupported suffix raises DocumentError (a typo should not pass
    silently)."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if not hidden and child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.setdefault(child.resolve(), None)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                kinds = ", ".join(sorted(SUPPORTED_SUFFIXES))
                raise DocumentError(f"{path}: unsupported file type (supported: {kinds})")
            found.setdefault(path.resolve(), None)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(found)


def load(path: Path) -> Document:
    """Read one file (blocking: call it in a thread). Raises DocumentError or OSError."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        title, text = _pdf(data, path)
        return Document(str(path), title or path.stem, text, False, digest)
    text = data.decode("utf-8-sig", errors="replace")
    if suffix in MARKDOWN_SUFFIXES:
        return Document(str(path), markdown_title(text) or path.stem, text, True, digest)
    if suffix in TEXT_SUFFIXES:
        return Document(str(path), path.stem, text, False, digest)
    raise DocumentError(f"{path}: unsupported file type")


def markdown_title(text: str) -> str | None:
    """The first level-1 heading of a Markdown text, if any."""
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip(" #\t") or None
    return None


def _pdf(data: bytes, path: Path) -> tuple[str | None, str]:
    """The metadata title and the text of each page, pages separated by a blank line."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{path}: encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, DocumentError):
            raise
        raise DocumentError(f"{path}: unreadable PDF ({exc})") from exc
    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise DocumentError(f"{path}: the PDF has no text layer (scanned? OCR it first)")
    return (str(title).strip() or None) if title else None, text
