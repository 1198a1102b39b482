"""The response cache key (seed 004's recipe) and the in-process cache."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatprocessor.core.job import ChatMessage, Job
from chatprocessor.features import cache as cache_module
from chatprocessor.features.cache import (
    CACHE_VERSION,
    CountingCache,
    MemoryResponseCache,
    cache_key,
)

pytestmark = pytest.mark.timeout(30)


def make_job(**changes: Any) -> Job:
    job = Job(
        id="job-1",
        conversation_id=7,
        prompt="What are your opening hours?",
        model="llama2",
        system_prompt="You are a helpful shop assistant.",
        temperature=0.7,
        max_tokens=256,
        meta={"personality": "friendly"},
        tenant="acme",
        context=tuple(
            ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 120)
            for i in range(5)
        ),
    )
    return dataclasses.replace(job, **changes)


def key_of(job: Job) -> str:
    return cache_key(job, default_model="default-model")


def replace_context(job: Job, index: int, message: ChatMessage) -> Job:
    context = list(job.context)
    context[index] = message
    return dataclasses.replace(job, context=tuple(context))


# -- the key ---------------------------------------------------------------------------------


def test_same_inputs_give_the_same_key() -> None:
    key = key_of(make_job())
    assert key == key_of(make_job())
    assert len(key) == 64 and int(key, 16) >= 0  # sha256 hex
    # What does not decide the answer does not matter: ids, conversation, tenant, user.
    other = make_job(id="job-2", conversation_id=8, tenant="globex", user_id="bob")
    assert key_of(other) == key


def test_the_key_is_the_same_in_another_process() -> None:
    """No hash(): a fresh interpreter with another hash seed computes the same key."""
    script = (
        "from tests.unit.test_response_cache import make_job, key_of; print(key_of(make_job()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        timeout=60,
    )
    assert out.stdout.strip() == key_of(make_job())


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt": "What are your closing hours?"},
        {"model": "mistral"},
        {"temperature": 0.2},
        {"temperature": None},
        {"max_tokens": 512},
        {"meta": {"personality": "formal"}},
        {"meta": {}},
        {"system_prompt": "You are a pirate."},
        {"system_prompt": None},
        {"kind": "sentiment_analysis"},
        {"format": "json"},
        {"format": {"type": "object"}},
        {"mode": "rag"},
        {"images": ("aGVsbG8=",)},
        {"meta": {"personality": "friendly", "classify": False}},
        {"meta": {"personality": "friendly", "intents": ["billing", "other"]}},
    ],
    ids=lambda changes: ",".join(f"{k}={v!r}" for k, v in changes.items()),
)
def test_each_setting_changes_the_key(changes: dict[str, Any]) -> None:
    assert key_of(make_job(**changes)) != key_of(make_job())


def test_the_default_model_counts_only_when_the_job_names_none() -> None:
    job = make_job(model=None)
    assert cache_key(job, default_model="a") != cache_key(job, default_model="b")
    assert cache_key(job, default_model="llama2") == key_of(make_job())
    named = make_job()
    assert cache_key(named, default_model="a") == cache_key(named, default_model="b")


def test_different_images_give_different_keys() -> None:
    assert key_of(make_job(images=("aGVsbG8=",))) != key_of(make_job(images=("d29ybGQ=",)))


@pytest.mark.parametrize("index", [-1, -2, -3])
def test_each_of_the_last_three_context_messages_counts(index: int) -> None:
    job = make_job()
    old = job.context[index]
    new_content = replace_context(job, index, ChatMessage(old.role, "something else"))
    new_role = replace_context(job, index, ChatMessage("system", old.content))
    assert key_of(new_content) != key_of(job)
    assert key_of(new_role) != key_of(job)


def test_older_context_does_not_count() -> None:
    job = make_job()
    for index in (0, 1):  # 5 messages: the first two are older than the last three
        changed = replace_context(job, index, ChatMessage("user", "forgotten"))
        assert key_of(changed) == key_of(job)
    assert key_of(dataclasses.replace(job, context=job.context[-3:])) == key_of(job)
    assert key_of(dataclasses.replace(job, context=job.context[-2:])) != key_of(job)
    assert key_of(dataclasses.replace(job, context=())) != key_of(job)


def test_only_the_first_hundred_characters_of_context_count() -> None:
    job = make_job()
    last = job.context[-1]
    assert len(last.content) > 100
    tail_changed = replace_context(job, -1, ChatMessage(last.role, last.content[:100] + "!"))
    head_changed = replace_context(job, -1, ChatMessage(last.role, "!" + last.content[1:]))
    assert key_of(tail_changed) == key_of(job)
    assert key_of(head_changed) != key_of(job)


def test_context_messages_is_configurable() -> None:
    job = make_job()
    changed = replace_context(job, -4, ChatMessage("user", "now it counts"))
    assert cache_key(changed, default_model="m") == cache_key(job, default_model="m")
    assert cache_key(changed, default_model="m", context_messages=4) != cache_key(
        job, default_model="m", context_messages=4
    )
    no_context = dataclasses.replace(job, context=())
    assert cache_key(job, default_model="m", context_messages=0) == cache_key(
        no_context, default_model="m", context_messages=0
    )


def test_the_key_ignores_the_order_of_a_schema() -> None:
    a = make_job(format={"type": "object", "required": ["a"]})
    b = make_job(format={"required": ["a"], "type": "object"})
    assert key_of(a) == key_of(b)


# -- the in-process cache --------------------------------------------------------------------

ANSWER = {"content": "9 to 5", "intent": "hours", "metadata": {"model": "llama2"}}


async def test_memory_hit_and_miss() -> None:
    cache = MemoryResponseCache()
    assert await cache.get("acme", "k") is None
    await cache.set("acme", "k", ANSWER, ttl=60)
    assert await cache.get("acme", "k") == ANSWER
    assert await cache.get("acme", "other") is None
    assert await cache.ping() is True
    await cache.close()
    assert await cache.get("acme", "k") is None


async def test_memory_entries_are_copies() -> None:
    cache = MemoryResponseCache()
    value: dict[str, Any] = {"content": "a", "tags": ["x"]}
    await cache.set("acme", "k", value, ttl=60)
    value["tags"].append("changed after set")
    got = await cache.get("acme", "k")
    assert got == {"content": "a", "tags": ["x"]}
    assert got is not None
    got["content"] = "changed after get"
    assert await cache.get("acme", "k") == {"content": "a", "tags": ["x"]}


async def test_memory_entries_expire_after_their_ttl() -> None:
    cache = MemoryResponseCache()
    await cache.set("acme", "short", ANSWER, ttl=0.05)
    await cache.set("acme", "long", ANSWER, ttl=60)
    assert await cache.get("acme", "short") == ANSWER
    await asyncio.sleep(0.1)
    assert await cache.get("acme", "short") is None
    assert await cache.get("acme", "long") == ANSWER


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
async def test_memory_ttl_not_positive_stores_nothing(ttl: float) -> None:
    cache = MemoryResponseCache()
    await cache.set("acme", "k", ANSWER, ttl=ttl)
    assert await cache.get("acme", "k") is None


async def test_an_infinite_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        await MemoryResponseCache().set("acme", "k", ANSWER, ttl=float("inf"))


async def test_memory_entries_of_another_version_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = MemoryResponseCache()
    with monkeypatch.context() as patch:  # an entry written by an older release
        patch.setattr(cache_module, "CACHE_VERSION", "v0")
        await cache.set("acme", "k", ANSWER, ttl=60)
    assert CACHE_VERSION == "v1"
    assert await cache.get("acme", "k") is None
    await cache.set("acme", "k", ANSWER, ttl=60)
    assert await cache.get("acme", "k") == ANSWER


async def test_memory_tenants_never_share_entries() -> None:
    cache = MemoryResponseCache()
    await cache.set("acme", "k", {"content": "acme's answer"}, ttl=60)
    assert await cache.get("globex", "k") is None
    await cache.set("globex", "k", {"content": "globex's answer"}, ttl=60)
    assert await cache.get("acme", "k") == {"content": "acme's answer"}
    assert await cache.get("globex", "k") == {"content": "globex's answer"}


async def test_memory_cache_is_bounded() -> None:
    cache = MemoryResponseCache(max_entries=3)
    for i in range(3):
        await cache.set("acme", f"k{i}", {"n": i}, ttl=60)
    assert await cache.get("acme", "k0") == {"n": 0}  # k0 is now the most recently used
    await cache.set("acme", "k3", {"n": 3}, ttl=60)  # the least recently used (k1) goes
    found = {i for i in range(4) if await cache.get("acme", f"k{i}") is not None}
    assert found == {0, 2, 3}
    with pytest.raises(ValueError):
        MemoryResponseCache(max_entries=0)


# -- counting --------------------------------------------------------------------------------


def sample(name: str, tenant: str) -> float:
    return REGISTRY.get_sample_value(name, {"tenant_id": tenant}) or 0.0


async def test_counting_cache_counts_hits_and_misses_per_tenant() -> None:
    tenant, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    cache = CountingCache(MemoryResponseCache())
    hits, misses = sample("ai_cache_hits_total", tenant), sample("ai_cache_misses_total", tenant)

    assert await cache.get(tenant, "k") is None
    await cache.set(tenant, "k", ANSWER, ttl=60)
    assert await cache.get(tenant, "k") == ANSWER
    assert await cache.get(tenant, "k") == ANSWER
    assert await cache.get(other, "k") is None

    assert sample("ai_cache_hits_total", tenant) == hits + 2
    assert sample("ai_cache_misses_total", tenant) == misses + 1
    assert sample("ai_cache_hits_total", other) == 0
    assert sample("ai_cache_misses_total", other) == 1
    assert await cache.ping() is True
    await cache.close()
    assert await cache.inner.get(tenant, "k") is None  # close reached the inner cache
