"""The task API door (seed 002): poll a NestJS-style API for pending AI tasks, report by PATCH.

- ``GET {API_BASE_URL}/api/ai-tasks/pending?limit=N`` every POLLING_INTERVAL_SECONDS, and at
  once again when a poll came back full; at most CONCURRENCY_LIMIT tasks run at a time.
- A task's reply is its ``PATCH /api/ai-tasks/:id`` (``publish`` to the task id). A PATCH
  the API does not take is retried with backoff until it does, never dropped; until then
  this worker does not take the task again (the API still lists it as pending).
- The API keeps a task pending until it is reported, so retries and dead letters stay in
  this process: a retried task waits here until its due time; a dead one has been reported
  ``failed`` by its error reply and is forgotten.
- Every call carries an OAuth2 client-credentials token (oauth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from chatprocessor.core.errors import BrokerUnavailable, PublishFailed, Unroutable
from chatprocessor.transports.base import Delivery, Outgoing

log = logging.getLogger(__name__)

PENDING_PATH = "/api/ai-tasks/pending"
TASK_PATH = "/api/ai-tasks/{id}"
#: Backoff of a PATCH the API did not take: doubling from 1 s up to this.
PATCH_BACKOFF_CAP = 60.0
_RETRYABLE = {401, 408, 425, 429, 500, 502, 503, 504}


class TaskDelivery(Delivery):
    """One task taken from the pending list."""

    def __init__(self, transport: TaskAPITransport, task: dict[str, Any], headers: dict[str, Any]):
        self._transport = transport
        self.task = task
        self.queue = "ai-tasks"
        self.body = orjson.dumps(task)
        self.message_id = str(task.get("_id") or task.get("id") or "") or None
        self.correlation_id = self.message_id
        self.reply_to = None
        self.type = str(task.get("type") or "") or None
        self.headers = headers
        self.redelivered = False

    async def _ack(self) -> None:
        self._transport._forget(self)

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        self._transport._forget(self)  # its error reply reported it as failed

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        self._transport._hold(self, headers, time.time() + delay)

    async def _release(self) -> None:
        self._transport._forget(self)  # still pending on the API: polled again


class TaskAPITransport:
    """See the module docstring; ``auth`` is an httpx.Auth (oauth.client_credentials)."""

    def __init__(
        self,
        base_url: str,
        auth: httpx.Auth | None,
        *,
        polling_interval: float = 30.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.polling_interval = polling_interval
        self.request_timeout = request_timeout
        self._http: httpx.AsyncClient | None = None
        self._active: set[str] = set()  # taken, being processed or waiting to be reported
        #: Settled while the current poll was under way: its answer may still list them.
        self._settled_during_poll: set[str] = set()
        self._held: list[tuple[float, int, dict[str, Any], dict[str, Any]]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()

    # -- connection ------------------------------------------------------------------------

    async def connect(self, *, attempts: int | None = None) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.base_url, auth=self.auth, timeout=self.request_timeout
            )
        tries = itertools.count(1) if attempts is None else range(1, attempts + 1)
        for attempt in tries:
            try:
                await self._get_pending(1)
                return
            except BrokerUnavailable as exc:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("task API not reachable (%s); retrying in 5s", exc)
                await asyncio.sleep(5)

    async def declare(self, queue: str) -> None:
        """The API has no queues to declare."""

    async def declare_input(self, queue: str) -> None:
        """Retries wait in this process; failed tasks are reported to the API."""

    async def ping(self) -> bool:
        try:
            await self._get_pending(1)
        except BrokerUnavailable:
            return False
        return True

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def _get_pending(self, limit: int) -> list[dict[str, Any]]:
        if self._http is None:
            raise BrokerUnavailable("not connected to the task API")
        try:
            response = await self._http.get(PENDING_PATH, params={"limit": limit})
            response.raise_for_status()
            tasks = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise BrokerUnavailable(f"GET {PENDING_PATH} failed: {exc}") from exc
        if isinstance(tasks, dict):  # some APIs wrap the list
            tasks = tasks.get("data") or tasks.get("tasks") or []
        if not isinstance(tasks, list):
            raise BrokerUnavailable(f"GET {PENDING_PATH}: expected a JSON array")
        return [task for task in tasks if isinstance(task, dict)]

    # -- consuming -------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        """Pending tasks, at most ``prefetch`` taken at once (``queue`` is not used)."""
        while True:
            now = time.time()
            while self._held and self._held[0][0] <= now and len(self._active) < prefetch:
                _, _, task, headers = heapq.heappop(self._held)
                delivery = TaskDelivery(self, task, headers)
                self._active.add(delivery.message_id or "")
                yield delivery
            room = prefetch - len(self._active) - len(self._held)
            full = False
            if room > 0:
                self._settled_during_poll = set()
                try:
                    tasks = await self._get_pending(room)
                except BrokerUnavailable as exc:
                    log.warning("%s; polling again in %.0fs", exc, self.polling_interval)
                    tasks = []
                full = len(tasks) >= room
                for task in tasks:
                    delivery = TaskDelivery(self, task, {})
                    task_id = delivery.message_id
                    if (
                        task_id is None
                        or task_id in self._active
                        or task_id in self._settled_during_poll
                        or self._is_held(task_id)
                    ):
                        continue  # taken already, or reported after this poll's answer was made
                    self._active.add(task_id)
                    yield delivery
            if not full:
                due = self._held[0][0] - time.time() if self._held else self.polling_interval
                await self._wait(min(self.polling_interval, max(due, 0.0)))

    def _is_held(self, task_id: str) -> bool:
        return any(held[2].get("_id", held[2].get("id")) == task_id for held in self._held)

    async def _wait(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _forget(self, delivery: TaskDelivery) -> None:
        self._active.discard(delivery.message_id or "")
        self._settled_during_poll.add(delivery.message_id or "")
        self._wake.set()

    def _hold(self, delivery: TaskDelivery, headers: dict[str, Any], due: float) -> None:
        self._active.discard(delivery.message_id or "")
        heapq.heappush(self._held, (due, next(self._order), delivery.task, headers))
        self._wake.set()

    # -- reporting -------------------------------------------------------------------------

    async def publish(self, destination: str, message: Outgoing) -> None:
        """PATCH the task ``destination`` with the body; retried until the API takes it."""
        if self._http is None:
            raise BrokerUnavailable("not connected to the task API")
        path = TASK_PATH.format(id=destination)
        delay = 1.0
        while True:
            try:
                response = await self._http.patch(
                    path, content=message.body, headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return
                if response.status_code == 404:
                    raise Unroutable(f"task {destination} is gone (404)")
                if response.status_code not in _RETRYABLE:
                    raise PublishFailed(
                        f"PATCH {path} refused: HTTP {response.status_code} {response.text[:200]}"
                    )
                problem = f"HTTP {response.status_code}"
            log.warning("PATCH %s failed (%s); trying again in %.0fs", path, problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PATCH_BACKOFF_CAP)

    async def open_reply_queue(self) -> Any:
        raise PublishFailed("the task API has no reply queues: tasks are reported by PATCH")
