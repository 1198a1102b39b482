"""Seed 003 end to end: the whole service (``run_service``) on the real Redis and Postgres.

chat.request jobs go in through Redis Streams; answers come back as events on a
Redis Stream; history lives in Redis; job metrics land in a fresh Postgres database;
a rag job cites the document that holds the answer. The LLM is the fake Ollama
(streaming with a delay per token, so a cancel lands mid-answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from chatprocessor.app import run_service
from chatprocessor.cli import app as cli_app
from chatprocessor.events.cancel import send_cancel_redis
from chatprocessor.settings import Settings
from chatprocessor.stream_client import ask
from chatprocessor.transports import build_transport
from tests.conftest import REDIS_URL
from tests.fakes.ollama import FakeOllama, word_embedding

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(120)]

DOCUMENTS = {
    "espresso.md": "# Espresso machine\nDescale the boiler every 200 shots with citric acid. "
    "The portafilter gasket is replaced yearly.",
    "bicycle.md": "# Bicycle care\nLubricate the chain every 300 kilometres and check the brake "
    "pads for wear before long rides.",
    "aquarium.md": "# Aquarium\nChange a quarter of the water weekly and keep the nitrate below "
    "40 ppm for the fish.",
}


def chats(fake: FakeOllama) -> list[dict[str, Any]]:
    """The chat calls the fake received (not embeddings, not model lists)."""
    return [r["body"] for r in fake.requests if r["path"] == "/api/chat"]


def settings_for(fake: FakeOllama, database_url: str, data_dir: Path, tag: str) -> Settings:
    return Settings(
        transport="redis",
        redis_url=REDIS_URL,
        providers=["ollama"],
        ollama_base_url=fake.url,
        ollama_model="llama2",
        ollama_embedding_model="llama2",
        chat_request_topic=f"test.{tag}.chat.request",
        events_stream=f"test:{tag}:events",
        cancel_stream=f"test:{tag}:cancel",
        database_url=database_url,
        data_dir=data_dir,
        log_file="",
        ops_port=0,
        prefetch_count=4,
        stream_flush_ms=5,
    )


async def test_conversation_streams_with_history_cancel_metrics_and_rag(  # noqa: PLR0915
    database: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:10]
    session = f"s-{tag}"
    async with FakeOllama(models=["llama2"], token_delay=0.002) as fake:
        fake.embedder = word_embedding
        settings = settings_for(fake, database, tmp_path, tag)

        # Documents of tenant acme, through the CLI as a user would (a thread: it runs a loop).
        docs = tmp_path / "docs"
        docs.mkdir()
        for name, text in DOCUMENTS.items():
            (docs / name).write_text(text)
        env = {
            "DATABASE_URL": database,
            "PROVIDERS": "ollama",
            "OLLAMA_BASE_URL": fake.url,
            "OLLAMA_EMBEDDING_MODEL": "llama2",
            "DATA_DIR": str(tmp_path),
            "LOG_FILE": "",
        }
        ingested = await asyncio.to_thread(
            CliRunner().invoke, cli_app, ["ingest", str(docs), "--tenant", "acme"], env=env
        )
        assert ingested.exit_code == 0, ingested.output

        stop = asyncio.Event()
        service = asyncio.create_task(run_service(settings, stop))
        client = build_transport(settings)
        await client.connect(attempts=3)
        figures: dict[str, Any] = {}
        try:

            async def say(
                message: str, *, user: str = "alice", **extra: Any
            ) -> list[dict[str, Any]]:
                return await ask(
                    client,
                    REDIS_URL,
                    topic=settings.chat_request_topic,
                    events_stream=settings.events_stream,
                    message=message,
                    user_id=user,
                    session_id=extra.pop("session_id", session),
                    timeout=30,
                    **extra,
                )

            # 1. Three turns: tokens, then final and done; later turns see the earlier ones.
            turns = ["My name is Ada.", "I live in Lisbon.", "Where do I live?"]
            answers = []
            for turn in turns:
                started = time.perf_counter()
                events = await say(turn)
                kinds = [e["type"] for e in events]
                assert kinds[-2:] == ["final", "done"] and set(kinds[:-2]) == {"token"}, kinds
                final = events[-2]
                assert final["status"] == "completed"
                streamed = "".join(e["delta"] for e in events if e["type"] == "token")
                assert streamed.strip() == final["text"] == f"Echo: {turn}"
                seqs = [e["seq"] for e in events if e["type"] == "token"]
                assert seqs == list(range(len(seqs)))  # in order, nothing missing
                answers.append(final["text"])
                figures.setdefault("turn_seconds", []).append(time.perf_counter() - started)
                figures.setdefault("token_events", []).append(len(seqs))
            sent = chats(fake)[-1]["messages"]
            assert [(m["role"], m["content"]) for m in sent] == [
                ("user", turns[0]),
                ("assistant", answers[0]),
                ("user", turns[1]),
                ("assistant", answers[1]),
                ("user", turns[2]),
            ]

            # 2. Another user naming alice's session is refused, and learns nothing of it.
            calls = len(chats(fake))
            refused = await say("What is her name?", user="mallory")
            assert [e["type"] for e in refused] == ["error", "done"]
            assert refused[0]["code"] == "forbidden" and "Ada" not in str(refused)
            assert len(chats(fake)) == calls

            # 3. A long answer cancelled by its owner after a few tokens.
            fake.reply = lambda prompt: " ".join(f"word{i}" for i in range(2000))
            fake.token_delay = 0.01
            cancel_job = f"cancel-{tag}"
            asked_at: list[float] = []

            def on_event(event: dict[str, Any]) -> None:
                if event["type"] == "token" and event["seq"] == 3 and not asked_at:
                    asked_at.append(time.perf_counter())
                    asyncio.get_running_loop().create_task(
                        send_cancel_redis(
                            REDIS_URL, cancel_job, "alice", stream=settings.cancel_stream
                        )
                    )

            events = await say("Tell me everything.", job_id=cancel_job, on_event=on_event)
            stopped_in = time.perf_counter() - asked_at[0]
            final, done = events[-2], events[-1]
            assert final["status"] == done["status"] == "cancelled"
            words = final["text"].split()
            assert 3 < len(words) < 2000
            assert stopped_in < 1.0
            figures["cancel_to_done_ms"] = round(stopped_in * 1000)
            figures["cancelled_after_words"] = len(words)
            fake.reply = lambda prompt: f"Echo: {prompt}"
            fake.token_delay = 0.002

            # 4. A rag question cites the document holding the answer (tenant acme only).
            rag = await say(
                "How often should I descale the boiler of my espresso machine?",
                mode="rag",
                tenant_id="acme",
                session_id=f"rag-{tag}",
            )
            final = rag[-2]
            assert final["type"] == "final", rag
            assert Path(final["sources"][0]["source"]).name == "espresso.md"
            prompt_sent = str(chats(fake)[-1]["messages"])
            assert "citric acid" in prompt_sent  # the passage reached the model
            other_tenant = await say(
                "How often should I descale the boiler?", mode="rag", session_id=f"rag2-{tag}"
            )
            assert other_tenant[-2]["sources"] == []  # tenant "default" has no documents
        finally:
            stop.set()
            await asyncio.wait_for(service, 30)
            with contextlib.suppress(Exception):
                await client.close()

    # 5. Job metrics in Postgres.
    db = await asyncpg.connect(database)
    try:
        rows = await db.fetch(
            "SELECT job_id, status, prompt_tokens, completion_tokens, latency_ms, "
            "time_to_first_token_ms, model, provider, mode FROM llm_jobs WHERE session_id = $1",
            session,
        )
        statuses = sorted(r["status"] for r in rows)
        assert statuses == ["cancelled", "completed", "completed", "completed", "forbidden"]
        done_rows = [r for r in rows if r["status"] == "completed"]
        for row in done_rows:
            assert row["completion_tokens"] and row["latency_ms"] is not None
            assert row["time_to_first_token_ms"] is not None and row["provider"] == "ollama"
        messages = await db.fetch(
            "SELECT role, content FROM llm_messages m JOIN llm_jobs j USING (job_id) "
            "WHERE j.session_id = $1 AND j.status = 'completed' ORDER BY m.id",
            session,
        )
        assert [m["content"] for m in messages if m["role"] == "user"] == turns
        rag_row = await db.fetchrow(
            "SELECT mode, status FROM llm_jobs WHERE session_id = $1", f"rag-{tag}"
        )
        assert rag_row is not None and tuple(rag_row) == ("rag", "completed")
    finally:
        await db.close()
    print(f"\nstream door figures: {figures}")
