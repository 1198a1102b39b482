"""OAuth2 client credentials for httpx clients (the task API door, issue 6).

The grant itself is httpx-auth's (:class:`httpx_auth.OAuth2ClientCredentials`: the
RFC 6749 §4.4 token request with HTTP Basic client authentication, response parsing
and §5.2 error messages) and so is the expiry-aware cache
(:class:`httpx_auth.TokenMemoryCache`). :class:`ClientCredentials` adds what httpx-auth
0.23 lacks:

* **a per-instance cache**: httpx-auth keeps tokens in the process-wide
  ``httpx_auth.OAuth2.token_cache``; each :class:`ClientCredentials` has its own, so
  two clients (or two tests) never share a token and :meth:`ClientCredentials.invalidate`
  only drops this instance's token. The global cache is never touched.
* **async without blocking the loop**: httpx-auth fetches tokens with a synchronous
  ``httpx.Client``; under ``httpx.AsyncClient`` a fetch runs in a worker thread
  (``asyncio.to_thread``) while cache hits stay on the loop.
* **one retry on 401**: the API rejecting a token the cache still trusts (revoked,
  server clock ahead) invalidates it and resends the request once with a fresh token;
  a second 401 is returned to the caller as is. Concurrent requests that hit the same
  401 share one refresh.
* **secrets kept out of sight**: the client secret and the tokens appear in no repr,
  log record or exception message (:class:`TokenRequestError` is scrubbed), nor does
  httpx-auth's secret-derived cache key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import AsyncGenerator, Generator
from http import HTTPStatus
from urllib.parse import urlsplit

import httpx
import httpx_auth

__all__ = [
    "ORY_TOKEN_URL",
    "ClientCredentials",
    "TokenRequestError",
    "client_credentials",
    "token_url",
]

_log = logging.getLogger(__name__)

#: Ory Network's OAuth2 token endpoint for a project slug.
ORY_TOKEN_URL = "https://{slug}.projects.oryapis.com/oauth2/token"
_CACHE_KEY = "client-credentials"
_SLUG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def token_url(*, ory_project_slug: str = "", explicit_url: str = "") -> str:
    """The token endpoint: ``explicit_url`` (OAUTH2_TOKEN_URL) if set, else Ory's for the slug.

    Raises ValueError when neither is set, or when the one used is malformed.
    """
    explicit = explicit_url.strip()
    if explicit:
        parts = urlsplit(explicit)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("OAUTH2_TOKEN_URL must be an absolute http(s) URL")
        return explicit
    slug = ory_project_slug.strip()
    if slug:
        if not _SLUG.fullmatch(slug):
            raise ValueError("ORY_PROJECT_SLUG may hold only letters, digits and inner hyphens")
        return ORY_TOKEN_URL.format(slug=slug)
    raise ValueError("no OAuth2 token endpoint: set OAUTH2_TOKEN_URL or ORY_PROJECT_SLUG")


class TokenRequestError(httpx.HTTPError):
    """The token endpoint refused the grant (bad credentials, scope...) or gave no token.

    Network failures reaching the endpoint are not wrapped: they stay httpx's
    ``TransportError`` subclasses, which callers usually treat as retryable.
    """


class ClientCredentials(httpx.Auth):
    """httpx auth for the OAuth2 client credentials grant (sync and async clients).

    Tokens are cached until ``early_expiry`` seconds before their ``expires_in``, then
    fetched again; a 401 from the API triggers one retry with a fresh token.
    ``timeout`` bounds each token request (httpx-auth counts it in whole seconds).
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str = "",
        early_expiry: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        for name, value in (
            ("token_url", token_url),
            ("client_id", client_id),
            ("client_secret", client_secret),
        ):
            if not value:
                raise ValueError(f"OAuth2 {name} is required")
        if early_expiry < 0 or not math.isfinite(early_expiry):
            raise ValueError("early_expiry must be a finite number of seconds >= 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        # httpx-auth turns early_expiry=0 into 30 (``x or 30.0``): the cache gets ours.
        self.early_expiry = float(early_expiry)
        self._grant = httpx_auth.OAuth2ClientCredentials(
            token_url,
            client_id,
            client_secret,
            scope=scope or None,
            timeout=max(1, math.ceil(timeout)),
        )
        # httpx-auth keys tokens by a sha512 over the URL, client id and client *secret*
        # and prints that key in its DEBUG logs; our cache holds one token, any key will do.
        self._grant.state = _CACHE_KEY
        self._secret = client_secret  # only to scrub error messages
        self._cache = httpx_auth.TokenMemoryCache()  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()  # one token fetch at a time per instance
        self._current: str | None = None  # the token last handed out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(token_url={self.token_url!r}, "
            f"client_id={self.client_id!r}, scope={self.scope!r})"
        )

    def invalidate(self) -> None:
        """Forget this instance's token: the next request fetches a new one."""
        self._cache.clear()
        self._current = None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Authorize ``request``; on a 401, retry once with a fresh token."""
        request.read()  # buffered: the 401 retry resends the body
        token = self._token()
        response = yield self._authorize(request, token)
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            self._log_retry(request)
            response = yield self._authorize(request, self._token(rejected=token))
            self._log_outcome(request, response)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Like :meth:`sync_auth_flow`; token fetches run off the event loop."""
        await request.aread()  # buffered: the 401 retry resends the body
        token = await self._atoken()
        response = yield self._authorize(request, token)
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            self._log_retry(request)
            response = yield self._authorize(request, await self._atoken(rejected=token))
            self._log_outcome(request, response)

    async def _atoken(self, rejected: str | None = None) -> str:
        """A valid token: from the cache on the loop, else fetched in a worker thread."""
        if rejected is None and self._current is not None:
            # Not under self._lock, which a fetching thread holds: the cache's own lock
            # is only ever held for a dict access.
            try:
                return self._cache.get_token(self._grant.state, early_expiry=self.early_expiry)
            except httpx_auth.AuthenticationFailed:  # expired: fetch below
                pass
        return await asyncio.to_thread(self._token, rejected)

    def _token(self, rejected: str | None = None) -> str:
        """A valid token, fetched if needed (blocking). ``rejected``: the API refused it.

        A rejected token is only dropped if it is still the current one, so concurrent
        requests refused with the same token cause a single new fetch.
        """
        with self._lock:
            if rejected is not None and rejected == self._current:
                self._cache.clear()
                self._current = None
            token = self._cached()
            if token is None:
                _log.debug(
                    "requesting an OAuth2 token from %s for client %s",
                    self.token_url,
                    self.client_id,
                )
                token = self._fetch()
                self._current = token
            return token

    def _cached(self) -> str | None:
        """The current token if the cache still holds it unexpired (caller holds the lock)."""
        if self._current is None:
            return None
        try:
            token = self._cache.get_token(self._grant.state, early_expiry=self.early_expiry)
        except httpx_auth.AuthenticationFailed:  # missing or expired: dropped from the cache
            self._current = None
            return None
        return token

    def _fetch(self) -> str:
        """Request a token through httpx-auth and cache it (blocking)."""
        try:
            return self._cache.get_token(
                self._grant.state,
                early_expiry=self.early_expiry,
                on_missing_token=self._grant.request_new_token,
            )
        except httpx_auth.HttpxAuthException as exc:
            message = str(exc).replace(self._secret, "***")
            raise TokenRequestError(
                f"OAuth2 token request to {self.token_url} failed ({type(exc).__name__}): {message}"
            ) from None  # the original's message is not scrubbed

    @staticmethod
    def _authorize(request: httpx.Request, token: str) -> httpx.Request:
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    @staticmethod
    def _log_retry(request: httpx.Request) -> None:
        _log.info(
            "401 from %s %s: retrying once with a fresh OAuth2 token",
            request.method,
            request.url.path,
        )

    @staticmethod
    def _log_outcome(request: httpx.Request, response: httpx.Response) -> None:
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            _log.warning(
                "401 from %s %s again with a fresh OAuth2 token: giving up",
                request.method,
                request.url.path,
            )


def client_credentials(
    token_url: str,
    client_id: str,
    client_secret: str,
    *,
    scope: str = "",
    early_expiry: float = 30.0,
    timeout: float = 10.0,
) -> ClientCredentials:
    """httpx auth (``httpx.AsyncClient(auth=...)``) for the client credentials grant."""
    return ClientCredentials(
        token_url,
        client_id,
        client_secret,
        scope=scope,
        early_expiry=early_expiry,
        timeout=timeout,
    )
