"""The fake task API's own contract: OAuth2 token endpoint, bearer auth, tasks, PATCH."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.task_api import CLIENT_ID, CLIENT_SECRET, ApiCall, FakeTaskAPI

pytestmark = pytest.mark.timeout(30)

SEED_FIELDS = {
    "_id",
    "type",
    "state",
    "content",
    "callbackRoute",
    "callbackParams",
    "createdAt",
    "updatedAt",
}


@pytest.fixture
async def api() -> AsyncIterator[FakeTaskAPI]:
    async with FakeTaskAPI(expires_in=60) as fake:
        yield fake


@pytest.fixture
async def http(api: FakeTaskAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url) as client:
        yield client


async def get_token(
    http: httpx.AsyncClient, client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET
) -> str:
    response = await http.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_lifecycle_and_fast_stop() -> None:
    fake = FakeTaskAPI()
    with pytest.raises(RuntimeError):
        _ = fake.url
    await fake.start()
    try:
        assert fake.url.startswith("http://127.0.0.1:") and fake.port > 0
        assert fake.token_url == f"{fake.url}/oauth2/token"
        with pytest.raises(RuntimeError):
            await fake.start()
        client = httpx.AsyncClient(base_url=fake.url)
        response = await client.get("/api/ai-tasks/pending")  # leaves a keep-alive connection
        assert response.status_code == 401
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 1.5
        assert fake.port == 0
        with pytest.raises(httpx.TransportError):
            await client.get("/api/ai-tasks/pending")
        await client.aclose()
    finally:
        await fake.stop()
    await fake.stop()  # idempotent


async def test_two_fakes_get_different_ports() -> None:
    async with FakeTaskAPI() as one, FakeTaskAPI() as two:
        assert one.port != two.port


async def test_token_with_basic_auth(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "read write"},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )
    assert response.status_code == 200
    body = response.json()
    assert body["access_token"].startswith("ory_at_")
    assert body["expires_in"] == 60
    assert body["token_type"] == "bearer"
    assert body["scope"] == "read write"
    assert api.token_requests == 1
    assert api.issued_tokens == [body["access_token"]]
    assert api.scopes == ["read write"]


async def test_token_with_form_credentials(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert response.status_code == 200
    assert response.json()["access_token"] in api.issued_tokens


@pytest.mark.parametrize(
    ("client_id", "secret"), [(CLIENT_ID, "wrong"), ("nobody", CLIENT_SECRET), ("", "")]
)
async def test_token_bad_client(
    api: FakeTaskAPI, http: httpx.AsyncClient, client_id: str, secret: str
) -> None:
    response = await http.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"] == "Basic"
    assert api.token_requests == 1
    assert api.issued_tokens == []


async def test_token_bad_grant_type(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/oauth2/token", data={"grant_type": "password"}, auth=(CLIENT_ID, CLIENT_SECRET)
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


async def test_token_failure_injection(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    api.fail_next_token_requests(1, status=503)
    response = await http.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=(CLIENT_ID, CLIENT_SECRET)
    )
    assert response.status_code == 503
    assert response.json()["error"] == "server_error"
    assert await get_token(http)
    assert api.token_requests == 2


async def test_api_requires_a_valid_bearer(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    api.add_task()
    for headers in ({}, bearer("ory_at_unknown"), {"Authorization": f"Basic {CLIENT_SECRET}"}):
        response = await http.get("/api/ai-tasks/pending", headers=headers)
        assert response.status_code == 401
        assert response.json() == {
            "statusCode": 401,
            "message": "Unauthorized",
            "error": "Unauthorized",
        }
        assert response.headers["www-authenticate"] == "Bearer"
    response = await http.patch("/api/ai-tasks/x", json={"state": "failed", "error": "e"})
    assert response.status_code == 401
    assert api.patch_attempts == [] and api.patches == []
    token = await get_token(http)
    assert (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code == 200
    assert [c.status for c in api.requests] == [401, 401, 401, 401, 200]
    assert api.requests[-1] == ApiCall("GET", "/api/ai-tasks/pending", 200, CLIENT_ID)


async def test_expire_all_tokens(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    token = await get_token(http)
    assert (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code == 200
    api.expire_all_tokens()
    assert (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code == 401
    fresh = await get_token(http)
    assert (await http.get("/api/ai-tasks/pending", headers=bearer(fresh))).status_code == 200


async def test_tokens_expire_after_expires_in() -> None:
    async with FakeTaskAPI(expires_in=1) as api, httpx.AsyncClient(base_url=api.url) as http:
        token = await get_token(http)
        assert (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code == 200
        await asyncio.sleep(1.1)
        assert (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code == 401


async def test_reject_next_requests(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    token = await get_token(http)
    api.reject_next_requests(2)
    statuses = [
        (await http.get("/api/ai-tasks/pending", headers=bearer(token))).status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 200]


async def test_pending_shape_order_and_limit(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    ids = [api.add_task(content={"text": f"t{i}", "model": "nomic-embed-text"}) for i in range(3)]
    headers = bearer(await get_token(http))
    response = await http.get("/api/ai-tasks/pending", params={"limit": 2}, headers=headers)
    assert response.status_code == 200
    tasks = response.json()
    assert [t["_id"] for t in tasks] == ids[:2]
    first = tasks[0]
    assert set(first) == SEED_FIELDS
    assert first["type"] == "text_embedding" and first["state"] == "pending"
    assert first["content"] == {"text": "t0", "model": "nomic-embed-text"}
    assert first["callbackRoute"] == "verification_update_embedding"
    assert first["createdAt"].endswith("Z") and first["updatedAt"] is None
    # Polling does not lease: the same tasks come back until PATCHed.
    again = await http.get("/api/ai-tasks/pending", params={"limit": 2}, headers=headers)
    assert [t["_id"] for t in again.json()] == ids[:2]
    everything = await http.get("/api/ai-tasks/pending", headers=headers)  # default limit 10
    assert [t["_id"] for t in everything.json()] == ids


async def test_pending_default_limit_is_ten(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    for _ in range(12):
        api.add_task()
    response = await http.get("/api/ai-tasks/pending", headers=bearer(await get_token(http)))
    assert len(response.json()) == 10


@pytest.mark.parametrize("limit", ["0", "-1", "x", ""])
async def test_pending_bad_limit(api: FakeTaskAPI, http: httpx.AsyncClient, limit: str) -> None:
    response = await http.get(
        "/api/ai-tasks/pending", params={"limit": limit}, headers=bearer(await get_token(http))
    )
    assert response.status_code == 400
    assert response.json()["statusCode"] == 400


async def test_add_task_options(api: FakeTaskAPI) -> None:
    task_id = api.add_task(
        "text_embedding",
        "plain text",
        callback_route="other",
        callback_params={"targetId": "t", "field": "embedding"},
        task_id="68b89107952364b0aad89c1d",
    )
    assert task_id == "68b89107952364b0aad89c1d"
    task = api.task(task_id)
    assert task["content"] == "plain text"
    assert task["callbackParams"] == {"targetId": "t", "field": "embedding"}
    assert len(api.add_task()) == 24
    with pytest.raises(ValueError, match="exists"):
        api.add_task(task_id=task_id)


async def test_patch_applied_and_recorded(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    done, broken, claimed = api.add_task(), api.add_task(), api.add_task()
    headers = bearer(await get_token(http))
    ok = {"state": "succeeded", "result": [0.1, 0.2, 0.3]}
    failed = {"state": "failed", "error": "model not supported"}
    response = await http.patch(f"/api/ai-tasks/{done}", json=ok, headers=headers)
    assert response.status_code == 200
    assert response.json()["state"] == "succeeded"
    assert response.json()["result"] == [0.1, 0.2, 0.3]
    assert response.json()["updatedAt"] is not None
    assert (await http.patch(f"/api/ai-tasks/{broken}", json=failed, headers=headers)).is_success
    in_progress = {"state": "in_progress"}
    assert (
        await http.patch(f"/api/ai-tasks/{claimed}", json=in_progress, headers=headers)
    ).is_success
    assert api.patches == [(done, ok), (broken, failed), (claimed, in_progress)]
    assert api.task(broken)["error"] == "model not supported"
    assert api.task(claimed)["state"] == "in_progress"
    pending = await http.get("/api/ai-tasks/pending", headers=headers)
    assert pending.json() == []
    # A second report of the same task is accepted and recorded too.
    again = await http.patch(f"/api/ai-tasks/{done}", json=ok, headers=headers)
    assert again.status_code == 200
    assert api.patches[-1] == (done, ok)


async def test_patch_unknown_task_is_404(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    body = {"state": "succeeded", "result": {}}
    response = await http.patch(
        "/api/ai-tasks/nope", json=body, headers=bearer(await get_token(http))
    )
    assert response.status_code == 404
    assert response.json()["error"] == "Not Found"
    assert api.patches == []
    assert api.patch_attempts == [("nope", body, 404)]


@pytest.mark.parametrize(
    "body",
    [
        {"state": "pending"},
        {"state": "done"},
        {"result": [1.0]},
        [1, 2],
        {"state": "failed", "error": 42},
    ],
)
async def test_patch_bad_body_is_400(
    api: FakeTaskAPI, http: httpx.AsyncClient, body: object
) -> None:
    task_id = api.add_task()
    response = await http.patch(
        f"/api/ai-tasks/{task_id}", json=body, headers=bearer(await get_token(http))
    )
    assert response.status_code == 400
    assert api.patches == []
    assert api.task(task_id)["state"] == "pending"


async def test_patch_non_json_is_400(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    task_id = api.add_task()
    response = await http.patch(
        f"/api/ai-tasks/{task_id}", content=b"{not json", headers=bearer(await get_token(http))
    )
    assert response.status_code == 400
    assert api.patch_attempts == [(task_id, None, 400)]


async def test_patch_failure_injection(api: FakeTaskAPI, http: httpx.AsyncClient) -> None:
    task_id = api.add_task()
    headers = bearer(await get_token(http))
    body = {"state": "succeeded", "result": [1.0]}
    api.fail_next_patches(2, status=503)
    statuses = [
        (await http.patch(f"/api/ai-tasks/{task_id}", json=body, headers=headers)).status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]
    assert api.patches == [(task_id, body)]
    assert [a[2] for a in api.patch_attempts] == [503, 503, 200]
    api.fail_next_patches(1)
    response = await http.patch(f"/api/ai-tasks/{task_id}", json=body, headers=headers)
    assert response.status_code == 500
    assert response.json()["statusCode"] == 500


async def test_requests_log_client() -> None:
    async with FakeTaskAPI(clients={"a": "secret-a", "b": "secret-b"}) as api:
        async with httpx.AsyncClient(base_url=api.url) as client:
            for name in ("a", "b"):
                token = await get_token(client, name, f"secret-{name}")
                await client.get("/api/ai-tasks/pending", headers=bearer(token))
        assert [c.client_id for c in api.requests] == ["a", "b"]
