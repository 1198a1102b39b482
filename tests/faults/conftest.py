"""Fixtures of the fault tests, and the table of figures printed at the end of the run.

Every scenario records {scenario, transport, sent, answered, dead_lettered, lost,
duplicated, llm_calls}; ``pytest_terminal_summary`` prints them so CI output shows
what each fault did.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.helpers import QUEUE_PREFIX, Lab, Report, TimedFakeOllama

FIGURES = pytest.StashKey[list[dict[str, Any]]]()
LEFTOVERS = pytest.StashKey[list[str]]()
COLUMNS = (
    "scenario",
    "transport",
    "sent",
    "answered",
    "dead_lettered",
    "lost",
    "duplicated",
    "llm_calls",
)

TAGS = pytest.StashKey[list[str]]()


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """Unique part of the test's queue names (``faults.<tag>.UserPromptReceived``)."""
    value = uuid.uuid4().hex[:10]
    request.config.stash.setdefault(TAGS, []).append(value)
    return value


@pytest.fixture
async def fake() -> AsyncIterator[TimedFakeOllama]:
    async with TimedFakeOllama(models=["llama2"], latency=0.1) as server:
        yield server


@pytest.fixture
async def lab(
    request: pytest.FixtureRequest, tag: str, fake: TimedFakeOllama, tmp_path: Path
) -> AsyncIterator[Lab]:
    """The test's fake LLM, ledger, sides and workers; its figures go to the run's table."""
    rows = request.config.stash.setdefault(FIGURES, [])

    def record(scenario: str, transport: str, report: Report) -> None:
        rows.append({"scenario": scenario, "transport": transport, **report.figures})

    made = Lab(tag, fake, tmp_path, record)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture(scope="session", autouse=True)
def _sweep_queues(request: pytest.FixtureRequest) -> Iterator[None]:
    """Safety net: delete any queue this session's tests left on the broker, and say so."""
    yield
    tags = request.config.stash.get(TAGS, [])
    if not tags or shutil.which("rabbitmqctl") is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "-q", "--no-table-headers"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        prefixes = tuple(f"{QUEUE_PREFIX}{tag}." for tag in tags)
        left = [q for q in listing.stdout.split() if q.startswith(prefixes)]
        for queue in left:
            subprocess.run(
                ["rabbitmqctl", "delete_queue", queue, "-q"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        request.config.stash[LEFTOVERS] = left


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(FIGURES, [])
    if rows:
        terminalreporter.section("fault figures")
        table = [COLUMNS, *[tuple(str(row[c]) for c in COLUMNS) for row in rows]]
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        for n, line in enumerate(table):
            cells = [
                cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ]
            terminalreporter.write_line("  ".join(cells))
            if n == 0:
                terminalreporter.write_line("  ".join("-" * width for width in widths))
        totals = {c: sum(int(row[c]) for row in rows) for c in COLUMNS[2:]}
        terminalreporter.write_line(
            "total: " + ", ".join(f"{name}={value}" for name, value in totals.items())
        )
    left = config.stash.get(LEFTOVERS, [])
    if left:
        terminalreporter.write_line(f"fault tests left {len(left)} queue(s) behind: {left}")
