"""The operations server: /health, /ready and /metrics over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import REGISTRY

from chatprocessor.ops import metrics
from chatprocessor.ops.server import OpsServer

pytestmark = pytest.mark.timeout(30)

Checks = dict[str, bool]
Serve = Callable[[Checks], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an OpsServer on an ephemeral port whose readiness returns the given checks."""
    servers: list[OpsServer] = []
    clients: list[httpx.AsyncClient] = []

    async def factory(checks: Checks) -> httpx.AsyncClient:
        async def ready() -> Checks:
            return dict(checks)

        server = OpsServer(ready, host="127.0.0.1", port=0)
        await server.start()
        servers.append(server)
        assert server.port != 0, "the ephemeral port is reported back"
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()
    for server in servers:
        await server.stop()


async def test_health(serve: Serve) -> None:
    client = await serve({"broker": False})  # alive even when not ready
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"].startswith("application/json")


async def test_ready_when_every_check_passes(serve: Serve) -> None:
    client = await serve({"broker": True, "provider": True})
    response = await client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"broker": True, "provider": True}


@pytest.mark.parametrize("failing", ["broker", "provider"])
async def test_not_ready_names_the_failing_check(serve: Serve, failing: str) -> None:
    checks = {"broker": True, "provider": True, failing: False}
    client = await serve(checks)
    response = await client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"][failing] is False
    assert [name for name, ok in body["checks"].items() if not ok] == [failing]


async def test_readiness_is_asked_on_every_request() -> None:
    state = {"broker": False}

    async def ready() -> Checks:
        return dict(state)

    server = OpsServer(ready, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/ready")).status_code == 503
            state["broker"] = True
            assert (await client.get("/ready")).status_code == 200
    finally:
        await server.stop()


async def test_metrics_are_prometheus_text(serve: Serve) -> None:
    client = await serve({"broker": True})
    before = REGISTRY.get_sample_value("chatprocessor_messages_total", {"outcome": "replied"})
    metrics.MESSAGES.labels(outcome="replied").inc()
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE chatprocessor_messages_total counter" in text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith('chatprocessor_messages_total{outcome="replied"}')
    )
    assert float(line.rsplit(" ", 1)[1]) == (before or 0) + 1
    for name in (
        "chatprocessor_processing_seconds",
        "chatprocessor_llm_seconds",
        "chatprocessor_tokens_total",
        "chatprocessor_jobs_in_flight",
    ):
        assert name in text
    assert "_created" not in text


async def test_unknown_path_is_404(serve: Serve) -> None:
    client = await serve({"broker": True})
    assert (await client.get("/nope")).status_code == 404


async def test_stop_closes_the_port() -> None:
    async def ready() -> Checks:
        return {}

    server = OpsServer(ready, host="127.0.0.1", port=0)
    await server.start()
    url = f"http://127.0.0.1:{server.port}/health"
    await server.stop()
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url)
