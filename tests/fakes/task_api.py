"""A fake NestJS-style AI task API behind OAuth2 client credentials (Starlette + uvicorn).

Endpoints (shapes from the issue 6 seed, "NestJS Integration")::

    POST  /oauth2/token             client_credentials grant, Ory/Hydra-like
    GET   /api/ai-tasks/pending     ?limit=N (default 10): JSON array, oldest first
    PATCH /api/ai-tasks/{id}        {"state": "succeeded"|"failed"|"in_progress",
                                     "result": <any JSON>?, "error": "..."?}

Usage::

    async with FakeTaskAPI(expires_in=2) as api:
        task_id = api.add_task(content={"text": "hi", "model": "nomic-embed-text"})
        auth = client_credentials(api.token_url, CLIENT_ID, CLIENT_SECRET)
        async with httpx.AsyncClient(base_url=api.url, auth=auth) as http:
            ...
        assert api.patches == [(task_id, {"state": "succeeded", "result": [...]})]

Decisions:

* Tasks stay ``pending`` (and listed) until a PATCH moves them to another state, as
  the seed implies: a poll does not lease them, so a worker polling twice before
  reporting sees the same task twice. ``in_progress`` (the original project's state
  for a claimed task) is accepted and hides the task from the list.
* Tokens are opaque (``ory_at_...``) and live ``expires_in`` seconds (default 2, so
  tests see expiry). The API answers 401 ``{"statusCode": 401, ...}`` like NestJS for a
  missing, unknown or expired bearer token.
* The token endpoint takes client credentials from HTTP Basic (client_secret_basic,
  what httpx-auth sends) or from the form (client_secret_post) and answers RFC 6749
  §5.2 errors (``invalid_client`` 401, ``unsupported_grant_type`` 400).
* :attr:`FakeTaskAPI.patches` lists the PATCHes that were applied (200), in order;
  :attr:`FakeTaskAPI.patch_attempts` every authorized PATCH with the status answered
  (injected failures, 400s and 404s included). :attr:`FakeTaskAPI.requests` logs every
  API call (not the token endpoint) with its status and the token's client.

The server runs in the test's event loop on 127.0.0.1 and an ephemeral port; it
installs no signal handlers and stops in about 0.2 s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote_plus

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["CLIENT_ID", "CLIENT_SECRET", "ApiCall", "FakeTaskAPI"]

#: Default client registered in the fake.
CLIENT_ID = "ai-task-worker"
CLIENT_SECRET = "fake-client-secret-7f3a9c"
#: States a PATCH may set.
PATCH_STATES = frozenset({"in_progress", "succeeded", "failed"})
DEFAULT_LIMIT = 10
_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One request to the task API: what was asked and what the fake answered."""

    method: str
    path: str
    status: int
    #: Client the bearer token was issued to (None without a valid token).
    client_id: str | None


def _now() -> str:
    """Timestamp like NestJS's JSON dates: ``2024-01-01T00:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _nest_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """NestJS's HttpException body: ``{"statusCode", "message", "error"}``."""
    body: dict[str, Any] = {"statusCode": status, "message": message}
    if status in _REASONS:
        body["error"] = _REASONS[status]
    return JSONResponse(body, status_code=status, headers=headers)


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    """RFC 6749 §5.2 error response."""
    headers = {"WWW-Authenticate": "Basic"} if status == 401 else None
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


class _Server(uvicorn.Server):
    """uvicorn without signal handling: the test process keeps its Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class FakeTaskAPI:
    """The fake task API; see the module docstring. Use ``async with`` or start/stop."""

    def __init__(
        self,
        *,
        clients: Mapping[str, str] | None = None,
        expires_in: int = 2,
        token_delay: float = 0.0,
    ) -> None:
        #: Registered OAuth2 clients: id -> secret.
        self.clients = dict(clients if clients is not None else {CLIENT_ID: CLIENT_SECRET})
        #: Lifetime of the tokens issued from now on (``expires_in``, seconds).
        self.expires_in = expires_in
        #: Seconds the token endpoint waits before answering.
        self.token_delay = token_delay
        #: Tasks by id, in creation order.
        self.tasks: dict[str, dict[str, Any]] = {}
        #: Applied PATCHes: (task id, body), in order.
        self.patches: list[tuple[str, Any]] = []
        #: Every authorized PATCH: (task id, body or None if not JSON, status answered).
        self.patch_attempts: list[tuple[str, Any, int]] = []
        #: Every API request (not the token endpoint).
        self.requests: list[ApiCall] = []
        #: Requests to the token endpoint, successful or not.
        self.token_requests = 0
        #: Tokens issued, in order (tests check none leaks into logs).
        self.issued_tokens: list[str] = []
        #: ``scope`` of each successful token request ("" when absent).
        self.scopes: list[str] = []
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (client id, expiry)
        self._patch_failures: list[int] = []
        self._token_failures: list[int] = []
        self._rejections = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._port = 0
        self.app = Starlette(
            routes=[
                Route("/oauth2/token", self._token_endpoint, methods=["POST"]),
                Route("/api/ai-tasks/pending", self._pending, methods=["GET"]),
                Route("/api/ai-tasks/{task_id}", self._patch, methods=["PATCH"]),
            ]
        )

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL (``API_BASE_URL``), e.g. ``http://127.0.0.1:41234``."""
        if not self._port:
            raise RuntimeError("FakeTaskAPI is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def token_url(self) -> str:
        """The token endpoint (``OAUTH2_TOKEN_URL``)."""
        return f"{self.url}/oauth2/token"

    @property
    def port(self) -> int:
        """Listening port (0 when stopped)."""
        return self._port

    async def start(self) -> None:
        """Serve on 127.0.0.1 and an ephemeral port, in the running event loop."""
        if self._task is not None:
            raise RuntimeError("FakeTaskAPI is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self.app,
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = server = _Server(config)
        self._task = task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                sock.close()
                await self._reap()
                raise RuntimeError("FakeTaskAPI did not start")
            await asyncio.sleep(0.005)
        self._port = sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop serving (open keep-alive connections are closed)."""
        if self._server is None:
            return
        self._server.should_exit = True
        await self._reap()

    async def _reap(self) -> None:
        server, task = self._server, self._task
        self._server, self._task, self._port = None, None, 0
        if task is None or server is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=3)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except (Exception, SystemExit):  # startup failure: uvicorn calls sys.exit
            pass

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ helpers

    def add_task(
        self,
        type: str = "text_embedding",
        content: Any = None,
        *,
        callback_route: str = "verification_update_embedding",
        callback_params: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> str:
        """Add a pending task shaped like the seed's; return its ``_id``.

        ``content`` defaults to ``{"text": "Text to embed", "model": "nomic-embed-text"}``.
        """
        task_id = task_id or secrets.token_hex(12)  # a MongoDB ObjectId's shape
        if task_id in self.tasks:
            raise ValueError(f"task {task_id} exists")
        self.tasks[task_id] = {
            "_id": task_id,
            "type": type,
            "state": "pending",
            "content": (
                content
                if content is not None
                else {"text": "Text to embed", "model": "nomic-embed-text"}
            ),
            "callbackRoute": callback_route,
            "callbackParams": (
                callback_params if callback_params is not None else {"documentId": "doc-id"}
            ),
            "createdAt": _now(),
            "updatedAt": None,
        }
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        """The stored task (its current state, result, error)."""
        return self.tasks[task_id]

    def fail_next_patches(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` authorized PATCHes with ``status`` without applying them."""
        self._patch_failures.extend([status] * n)

    def fail_next_token_requests(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` token requests with ``status`` (a ``server_error``)."""
        self._token_failures.extend([status] * n)

    def reject_next_requests(self, n: int) -> None:
        """Answer the next ``n`` API requests 401 even with a valid token (revoked token)."""
        self._rejections += n

    def expire_all_tokens(self) -> None:
        """Make every token issued so far expired (the API answers 401 to them)."""
        self._tokens = {token: (client, 0.0) for token, (client, _) in self._tokens.items()}

    # ---------------------------------------------------------------- endpoints

    async def _token_endpoint(self, request: Request) -> Response:
        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("latin-1")).items()}
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self._token_failures:
            return _oauth_error(self._token_failures.pop(0), "server_error", "injected failure")
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials")
        client_id = self._authenticate_client(request, form)
        if client_id is None:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        token = f"ory_at_{secrets.token_urlsafe(24)}"
        self._tokens[token] = (client_id, time.monotonic() + self.expires_in)
        self.issued_tokens.append(token)
        scope = form.get("scope", "")
        self.scopes.append(scope)
        return JSONResponse(
            {
                "access_token": token,
                "expires_in": self.expires_in,
                "scope": scope,
                "token_type": "bearer",
            }
        )

    def _authenticate_client(self, request: Request, form: dict[str, str]) -> str | None:
        """Client id if the credentials (Basic header, else form) match a client.

        Basic credentials are tried raw and form-decoded (RFC 6749 §2.3.1 encodes them;
        httpx does not).
        """
        header = request.headers.get("authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            client_id, _, secret = decoded.partition(":")
            candidates = [(client_id, secret), (unquote_plus(client_id), unquote_plus(secret))]
        else:
            candidates = [(form.get("client_id", ""), form.get("client_secret", ""))]
        for client_id, secret in candidates:
            expected = self.clients.get(client_id)
            if expected is not None and secrets.compare_digest(expected.encode(), secret.encode()):
                return client_id
        return None

    def _bearer_client(self, request: Request) -> str | None:
        """Client of a valid bearer token, or None (answer 401)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None or entry[1] <= time.monotonic():
            return None
        if self._rejections:
            self._rejections -= 1
            return None
        return entry[0]

    def _unauthorized(self, request: Request) -> JSONResponse:
        self.requests.append(ApiCall(request.method, request.url.path, 401, None))
        return _nest_error(401, "Unauthorized", {"WWW-Authenticate": "Bearer"})

    async def _pending(self, request: Request) -> Response:
        client = self._bearer_client(request)
        if client is None:
            return self._unauthorized(request)
        raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
        limit = int(raw) if raw.isdigit() else 0
        if limit < 1:
            self.requests.append(ApiCall("GET", request.url.path, 400, client))
            return _nest_error(400, "limit must be a positive integer")
        pending = [t for t in self.tasks.values() if t["state"] == "pending"][:limit]
        self.requests.append(ApiCall("GET", request.url.path, 200, client))
        return JSONResponse(pending)

    async def _patch(self, request: Request) -> Response:
        client = self._bearer_client(request)
        if client is None:
            return self._unauthorized(request)
        task_id = request.path_params["task_id"]
        try:
            body: Any = json.loads(await request.body())
        except ValueError:
            body = None
        response = self._apply_patch(task_id, body)
        self.patch_attempts.append((task_id, body, response.status_code))
        self.requests.append(ApiCall("PATCH", request.url.path, response.status_code, client))
        return response

    def _apply_patch(self, task_id: str, body: Any) -> JSONResponse:
        if self._patch_failures:
            status = self._patch_failures.pop(0)
            return _nest_error(status, "Internal server error (injected)")
        task = self.tasks.get(task_id)
        if task is None:
            return _nest_error(404, f"AI task {task_id} not found")
        if not isinstance(body, dict):
            return _nest_error(400, "body must be a JSON object")
        if body.get("state") not in PATCH_STATES:
            return _nest_error(400, f"state must be one of {sorted(PATCH_STATES)}")
        if "error" in body and body["error"] is not None and not isinstance(body["error"], str):
            return _nest_error(400, "error must be a string")
        task["state"] = body["state"]
        for field in ("result", "error"):
            if field in body:
                task[field] = body[field]
        task["updatedAt"] = _now()
        self.patches.append((task_id, body))
        return JSONResponse(task)
