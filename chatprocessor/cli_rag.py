"""``chatprocessor ingest PATH...`` and ``chatprocessor rag search``: documents for RAG jobs.

``ingest`` is a top-level command (``app.command("ingest")(ingest)``); ``rag_app`` holds
the debugging commands (``app.add_typer(rag_app, name="rag")``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chatprocessor.core.errors import ChatProcessorError

if TYPE_CHECKING:
    from chatprocessor.features.rag.ingest import IngestReport
    from chatprocessor.features.rag.retrieval import Passage

rag_app = typer.Typer(help="Inspect the documents RAG jobs answer from.", no_args_is_help=True)

TenantOption = Annotated[
    str, typer.Option("--tenant", help="Whose documents (every job sees its tenant's only).")
]


def ingest(
    paths: Annotated[
        list[Path], typer.Argument(help="Files (.txt, .md, .markdown, .pdf) or folders.")
    ],
    tenant: TenantOption = "default",
    chunk_tokens: Annotated[
        int | None,
        typer.Option(
            "--chunk-tokens", min=8, help="Estimated tokens per chunk [RAG_CHUNK_TOKENS]."
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap", min=0, help="Tokens repeated between chunks [RAG_CHUNK_OVERLAP]."
        ),
    ] = None,
) -> None:
    """Read, chunk and embed documents into the RAG store; unchanged files are skipped."""
    from chatprocessor.cli import _fail, _run, _settings
    from chatprocessor.features.rag.ingest import Ingestor
    from chatprocessor.features.rag.store import open_store
    from chatprocessor.providers import build_providers

    settings = _settings()
    size = chunk_tokens if chunk_tokens is not None else getattr(settings, "rag_chunk_tokens", 300)
    shared = overlap if overlap is not None else getattr(settings, "rag_chunk_overlap", 40)
    if shared >= size:
        _fail(f"--overlap ({shared}) must be below --chunk-tokens ({size})", 2)
    err = Console(stderr=True)

    def show(path: Path, outcome: str) -> None:
        colour = {"ingested": "green", "skipped": "dim", "failed": "red"}[outcome]
        err.print(f"[{colour}]{outcome:>8}[/] {escape(str(path))}", highlight=False)

    async def main() -> tuple[IngestReport, str]:
        store = await open_store(settings)
        provider = build_providers(settings)
        try:
            ingestor = Ingestor(store, provider, chunk_tokens=size, overlap=shared)
            return await ingestor.ingest(tenant, paths, progress=show), store.kind
        finally:
            with contextlib.suppress(Exception):
                await provider.close()
            await store.close()

    try:
        report, kind = _run(main())
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc, 2)
    except ChatProcessorError as exc:
        _fail(exc, 1)
    _print_report(report, tenant, kind)
    if report.failed:
        raise typer.Exit(1)


def _print_report(report: IngestReport, tenant: str, kind: str) -> None:
    out = Console()
    table = Table("files", "ingested", "skipped", "failed", "chunks", "vectors", "seconds")
    table.title = f"ingested for tenant {tenant!r} ({kind} store)"
    table.add_row(
        str(report.files),
        str(report.ingested),
        str(report.skipped),
        str(len(report.failed)),
        str(report.chunks),
        f"{report.vectors} ({report.model})" if report.model else str(report.vectors),
        f"{report.seconds:.1f}",
    )
    out.print(table)
    for path, why in report.failed:
        out.print(f"[red]failed[/] {escape(path)}: {escape(why)}", highlight=False)
    if report.lexical_only:
        out.print(
            f"[yellow]warning:[/] {escape(report.lexical_only)}: "
            "chunks stored for lexical search only",
            highlight=False,
        )


@rag_app.command("search")
def search(
    question: Annotated[str, typer.Argument(help="The question to find passages for.")],
    tenant: TenantOption = "default",
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Passages to show [RAG_TOP_K].")
    ] = None,
) -> None:
    """Show the passages a RAG job would get, with their lexical and vector ranks."""
    from chatprocessor.cli import _fail, _run, _settings
    from chatprocessor.features.rag.retrieval import Retriever
    from chatprocessor.features.rag.store import open_store
    from chatprocessor.providers import build_providers

    settings = _settings()
    count = top_k if top_k is not None else getattr(settings, "rag_top_k", 4)

    async def main() -> list[Passage]:
        store = await open_store(settings)
        provider = build_providers(settings)
        try:
            retriever = Retriever(store, provider, top_k=count, candidates=max(20, count))
            return await retriever.search(tenant, question)
        finally:
            with contextlib.suppress(Exception):
                await provider.close()
            await store.close()

    try:
        passages = _run(main())
    except ChatProcessorError as exc:
        _fail(exc, 1)
    if not passages:
        typer.echo(f"no passage matches (tenant {tenant!r})")
        return
    out = Console()
    for number, p in enumerate(passages, start=1):
        lexical = "-" if p.lexical_rank is None else f"#{p.lexical_rank}"
        vector = "-" if p.vector_rank is None else f"#{p.vector_rank}"
        text = escape(" ".join(p.text.split()))
        out.print(
            f"[bold][{number}][/] score {p.score:.4f}  lexical {lexical}  vector {vector}  "
            f"chunk {p.chunk_id}\n    {escape(p.source)}"
            + (f"  ({escape(p.title)})" if p.title else ""),
            highlight=False,
            soft_wrap=True,
        )
        out.print(
            f"    {text[:300]}{'…' if len(text) > 300 else ''}", highlight=False, soft_wrap=True
        )
