"""The operations HTTP server: /health (alive), /ready (broker and provider), /metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]
#: Extra facts for /health (e.g. rate-limit usage); must not fail when a backend is down.
HealthDetails = Callable[[], Awaitable[dict[str, Any]]]


def make_app(ready: ReadyCheck, details: HealthDetails | None = None) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok"}
        if details is not None:
            body.update(await details())
        return web.json_response(body)

    async def ready_handler(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status=200 if ok else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready_handler)
    app.router.add_get("/metrics", metrics)
    return app


class OpsServer:
    """Runs the app on host:port beside the worker, in the same event loop."""

    def __init__(
        self,
        ready: ReadyCheck,
        *,
        host: str,
        port: int,
        details: HealthDetails | None = None,
    ) -> None:
        self._runner = web.AppRunner(make_app(ready, details), access_log=None)
        self.host = host
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0 and self._runner.addresses:  # ephemeral port, for tests
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()
