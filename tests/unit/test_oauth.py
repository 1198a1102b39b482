"""OAuth2 client credentials (chatprocessor.oauth) against the fake task API."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import httpx
import httpx_auth
import pytest

from chatprocessor.oauth import (
    ORY_TOKEN_URL,
    ClientCredentials,
    TokenRequestError,
    client_credentials,
    token_url,
)
from tests.fakes.task_api import CLIENT_ID, CLIENT_SECRET, FakeTaskAPI

pytestmark = pytest.mark.timeout(30)

PENDING = "/api/ai-tasks/pending"


@pytest.fixture
async def api() -> AsyncIterator[FakeTaskAPI]:
    async with FakeTaskAPI(expires_in=60) as fake:
        yield fake


def auth_for(api: FakeTaskAPI, *, scope: str = "", early_expiry: float = 0.0) -> ClientCredentials:
    """The default client's auth; early_expiry 0 so tokens live their full expires_in."""
    return client_credentials(
        api.token_url, CLIENT_ID, CLIENT_SECRET, scope=scope, early_expiry=early_expiry
    )


def statuses(api: FakeTaskAPI) -> list[int]:
    return [call.status for call in api.requests]


# --------------------------------------------------------------------- token_url


def test_token_url_explicit_wins() -> None:
    explicit = "https://auth.example.com/oauth2/token"
    assert token_url(ory_project_slug="proj", explicit_url=explicit) == explicit
    assert token_url(explicit_url=f"  {explicit} ") == explicit


def test_token_url_from_ory_slug() -> None:
    expected = "https://affectionate-archimedes-x1.projects.oryapis.com/oauth2/token"
    assert token_url(ory_project_slug="affectionate-archimedes-x1") == expected
    assert token_url(ory_project_slug=" proj ", explicit_url="  ") == ORY_TOKEN_URL.format(
        slug="proj"
    )


def test_token_url_needs_one_of_them() -> None:
    with pytest.raises(ValueError, match="OAUTH2_TOKEN_URL") as info:
        token_url()
    assert "ORY_PROJECT_SLUG" in str(info.value)


@pytest.mark.parametrize("slug", ["evil.com/#", "a b", "-x", "x-", "slug?q"])
def test_token_url_rejects_bad_slug(slug: str) -> None:
    with pytest.raises(ValueError, match="ORY_PROJECT_SLUG"):
        token_url(ory_project_slug=slug)


@pytest.mark.parametrize("url", ["auth.example.com/token", "ftp://h/t", "https://"])
def test_token_url_rejects_bad_explicit_url(url: str) -> None:
    with pytest.raises(ValueError, match="OAUTH2_TOKEN_URL"):
        token_url(explicit_url=url)


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    ("url", "client_id", "secret", "early_expiry"),
    [
        ("", "id", "secret", 0.0),
        ("https://t", "", "secret", 0.0),
        ("https://t", "id", "", 0.0),
        ("https://t", "id", "secret", -1.0),
        ("https://t", "id", "secret", float("inf")),
    ],
)
def test_bad_arguments(url: str, client_id: str, secret: str, early_expiry: float) -> None:
    with pytest.raises(ValueError):
        client_credentials(url, client_id, secret, early_expiry=early_expiry)


def test_repr_hides_the_secret() -> None:
    auth = client_credentials("https://t/token", "my-client", "s3cr3t-value", scope="read")
    text = repr(auth) + str(auth)
    assert "my-client" in text and "https://t/token" in text
    assert "s3cr3t-value" not in text
    assert isinstance(auth, httpx.Auth)


# ------------------------------------------------------------------ token caching


async def test_token_fetched_once_and_reused(api: FakeTaskAPI) -> None:
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        for _ in range(3):
            assert (await http.get(PENDING)).status_code == 200
    assert api.token_requests == 1
    assert statuses(api) == [200, 200, 200]


async def test_token_refreshed_early_before_expiry() -> None:
    # Tokens live 2 s; with early_expiry=1 the client renews them after 1 s, before the
    # API would refuse them: no 401 is ever seen.
    async with FakeTaskAPI(expires_in=2) as api:
        auth = auth_for(api, early_expiry=1.0)
        async with httpx.AsyncClient(base_url=api.url, auth=auth) as http:
            assert (await http.get(PENDING)).status_code == 200
            assert (await http.get(PENDING)).status_code == 200
            assert api.token_requests == 1
            await asyncio.sleep(1.05)
            assert (await http.get(PENDING)).status_code == 200
            assert api.token_requests == 2
    assert statuses(api) == [200, 200, 200]


async def test_scope_is_sent(api: FakeTaskAPI) -> None:
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api, scope="read write")) as h:
        assert (await h.get(PENDING)).status_code == 200
    assert api.scopes == ["read write"]


async def test_clients_and_instances_do_not_share_tokens() -> None:
    async with FakeTaskAPI(expires_in=60, clients={"a": "secret-a", "b": "secret-b"}) as api:
        auth_a = client_credentials(api.token_url, "a", "secret-a", early_expiry=0)
        auth_b = client_credentials(api.token_url, "b", "secret-b", early_expiry=0)
        auth_a2 = client_credentials(api.token_url, "a", "secret-a", early_expiry=0)
        async with httpx.AsyncClient(base_url=api.url) as http:
            for auth in (auth_a, auth_b, auth_a2, auth_a, auth_b):
                assert (await http.get(PENDING, auth=auth)).status_code == 200
        assert [call.client_id for call in api.requests] == ["a", "b", "a", "a", "b"]
        assert api.token_requests == 3  # one per instance, then cached
    assert httpx_auth.OAuth2.token_cache.tokens == {}  # the global cache is never used


async def test_invalidate_forces_a_new_token(api: FakeTaskAPI) -> None:
    auth = auth_for(api)
    async with httpx.AsyncClient(base_url=api.url, auth=auth) as http:
        await http.get(PENDING)
        auth.invalidate()
        await http.get(PENDING)
    assert api.token_requests == 2


# ---------------------------------------------------------------------- 401 retry


async def test_401_retried_once_with_a_fresh_token(api: FakeTaskAPI) -> None:
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        assert (await http.get(PENDING)).status_code == 200
        api.expire_all_tokens()  # the API now refuses the token the client still trusts
        response = await http.get(PENDING)
    assert response.status_code == 200
    assert statuses(api) == [200, 401, 200]
    assert api.token_requests == 2
    assert len(response.history) == 1 and response.history[0].status_code == 401


async def test_retry_resends_the_patch_body(api: FakeTaskAPI) -> None:
    task_id = api.add_task()
    body = {"state": "succeeded", "result": [0.5, 0.25]}
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        api.reject_next_requests(1)
        response = await http.patch(f"/api/ai-tasks/{task_id}", json=body)
    assert response.status_code == 200
    assert api.patches == [(task_id, body)]


async def test_two_401s_return_the_401(api: FakeTaskAPI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatprocessor.oauth")
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        api.reject_next_requests(2)
        response = await http.get(PENDING)
        assert response.status_code == 401
        with pytest.raises(httpx.HTTPStatusError, match="401 Unauthorized"):
            response.raise_for_status()
        assert (await http.get(PENDING)).status_code == 200  # the fresh token is kept
    assert statuses(api) == [401, 401, 200]
    assert api.token_requests == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "again with a fresh OAuth2 token" in warnings[0].getMessage()


async def test_concurrent_401s_share_one_refresh(api: FakeTaskAPI) -> None:
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        assert (await http.get(PENDING)).status_code == 200
        api.expire_all_tokens()
        responses = await asyncio.gather(*(http.get(PENDING) for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert api.token_requests == 2


# ------------------------------------------------------------- failures, secrets


async def test_bad_credentials_raise_without_the_secret(
    api: FakeTaskAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-secret-Zq81x"
    auth = client_credentials(api.token_url, CLIENT_ID, secret, early_expiry=0)
    async with httpx.AsyncClient(base_url=api.url, auth=auth) as http:
        with pytest.raises(TokenRequestError) as info:
            await http.get(PENDING)
    message = str(info.value)
    assert "invalid_client" in message and api.token_url in message
    assert secret not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, httpx.HTTPError)
    assert api.requests == []  # the API was never called without a token
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_token_endpoint_down_is_a_transport_error() -> None:
    async with FakeTaskAPI() as api:
        url = api.token_url
    auth = client_credentials(url, CLIENT_ID, CLIENT_SECRET)
    async with httpx.AsyncClient(auth=auth) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url.replace("/oauth2/token", PENDING))


async def test_token_endpoint_error_is_reported(api: FakeTaskAPI) -> None:
    api.fail_next_token_requests(1, status=503)
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        with pytest.raises(TokenRequestError, match="server_error"):
            await http.get(PENDING)
        assert (await http.get(PENDING)).status_code == 200  # next call fetches again
    assert api.token_requests == 2


async def test_no_secret_or_token_in_logs(
    api: FakeTaskAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
        await http.get(PENDING)
        api.expire_all_tokens()
        await http.get(PENDING)
    assert len(api.issued_tokens) == 2
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "401 from GET /api/ai-tasks/pending" in logged  # the retry was logged
    for needle in (CLIENT_SECRET, *api.issued_tokens):
        assert needle not in logged
    # httpx-auth's default cache key, a sha512 over the secret, is not logged either.
    assert not re.search(r"[0-9a-f]{128}", logged)


# ------------------------------------------------------------------ event loop, sync


async def test_token_fetch_does_not_block_the_loop() -> None:
    async with FakeTaskAPI(expires_in=60, token_delay=0.3) as api:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        async with httpx.AsyncClient(base_url=api.url, auth=auth_for(api)) as http:
            assert (await http.get(PENDING)).status_code == 200
        stop.set()
        await tick_task
    assert ticks >= 10  # the loop kept running during the 0.3 s token request


async def test_sync_client(api: FakeTaskAPI) -> None:
    auth = auth_for(api)

    def poll() -> list[int]:
        with httpx.Client(base_url=api.url, auth=auth) as http:
            first = http.get(PENDING).status_code
            api.expire_all_tokens()
            return [first, http.get(PENDING).status_code]

    assert await asyncio.to_thread(poll) == [200, 200]
    assert statuses(api) == [200, 401, 200]
    assert api.token_requests == 2
