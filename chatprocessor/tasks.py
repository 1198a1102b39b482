"""Task types of the task API door (seed 002), one function each, registered by name.

A new type is one function (or a module of its own imported below) and one registration::

    @task_type("text_summary")
    async def text_summary(provider: Provider, job: Job) -> Result: ...

The worker runs the type a task names (``Job.kind``); its Result's text is the JSON the
task's PATCH reports as ``result``. An unknown type is rejected before anything runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from chatprocessor.core.errors import BadRequest
from chatprocessor.core.job import Job, Result
from chatprocessor.providers.base import Provider

TaskRunner = Callable[[Provider, Job], Awaitable[Result]]
_TYPES: dict[str, TaskRunner] = {}


def task_type(name: str) -> Callable[[TaskRunner], TaskRunner]:
    """Register a task type under ``name`` (the task's ``type`` field)."""

    def register(runner: TaskRunner) -> TaskRunner:
        if name in _TYPES:
            raise ValueError(f"task type {name!r} is registered twice")
        _TYPES[name] = runner
        return runner

    return register


def known_types() -> list[str]:
    return sorted(_TYPES)


async def run_task(provider: Provider, job: Job) -> Result:
    runner = _TYPES.get(job.kind)
    if runner is None:
        raise BadRequest(f"unknown task type {job.kind!r} (known: {', '.join(known_types())})")
    return await runner(provider, job)


@task_type("text_embedding")
async def text_embedding(provider: Provider, job: Job) -> Result:
    """The embedding of ``content.text`` with ``content.model`` (or the provider's default)."""
    embeddings = await provider.embed([job.prompt], model=job.model)
    [vector] = embeddings.vectors
    result = {
        "embedding": vector,
        "dimensions": len(vector),
        "model": embeddings.model,
        "provider": embeddings.provider,
    }
    if embeddings.mock:
        result["mock"] = True  # never passed off as a real embedding
    return Result(
        text=orjson.dumps(result).decode(),
        model_used=embeddings.model,
        prompt_tokens=embeddings.prompt_tokens,
    )
