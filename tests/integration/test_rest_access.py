"""API keys and rate limits on the REST surface: a real Envoy in front of a fake-engine server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.integration.test_rest_fake import assert_ollama_error, assert_openai_error
from tests.servers import ServerThread

KEY_A, KEY_B, KEY_C, KEY_D, KEY_E = "sk-a", "sk-b", "sk-c", "sk-d", "sk-e"
EMBEDDINGS = {"model": "fake", "input": "hello"}


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    """Keys sk-a .. sk-e; one call per second per key, bursts of two."""
    root = tmp_path_factory.mktemp("rest-access")
    with (
        ServerThread.with_fake_models(
            root / "models",
            api_keys=f"{KEY_A},{KEY_B},{KEY_C},{KEY_D},{KEY_E}",
            rate_limit_per_s=1,
            rate_limit_burst=2,
        ) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield envoy


def post(envoy: EnvoyProcess, path: str, body: object, headers: dict[str, str]) -> HttpReply:
    return http(envoy.base_url + path, "POST", body=body, headers=headers)


def official(envoy: EnvoyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=envoy.base_url + "/v1", api_key=key, max_retries=0)


def test_missing_or_wrong_key_is_401_in_openai_shape(envoy: EnvoyProcess) -> None:
    for headers in [{}, {"authorization": "Bearer sk-nope"}, {"x-api-key": "sk-nope"}]:
        reply = post(envoy, "/v1/embeddings", EMBEDDINGS, headers)
        error = assert_openai_error(reply, 401, "invalid_api_key")
        assert error["message"].startswith("Incorrect API key provided")
        assert "sk-nope" not in error["message"]
    reply = http(envoy.base_url + "/v1/models")
    assert_openai_error(reply, 401, "invalid_api_key")


def test_official_client_raises_authentication_error(envoy: EnvoyProcess) -> None:
    with official(envoy, "sk-nope") as client, pytest.raises(openai.AuthenticationError) as info:
        client.embeddings.create(model="fake", input="hello")
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.type == "invalid_request_error"


def test_ollama_route_401_in_ollama_shape(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/api/embed", {"model": "fake", "input": "hello"}, {})
    assert assert_ollama_error(reply, 401).startswith("Incorrect API key provided")
    ok = post(envoy, "/api/embed", {"model": "fake", "input": "hello"}, {"x-api-key": KEY_C})
    assert ok.status == 200, ok.body
    assert len(ok.json()["embeddings"]) == 1


def test_valid_key_works_with_the_official_client(envoy: EnvoyProcess) -> None:
    with official(envoy, KEY_A) as client:
        result = client.embeddings.create(model="fake", input="hello", encoding_format="float")
    assert len(result.data[0].embedding) == 8


def test_over_the_rate_limit_is_429_with_retry_after(envoy: EnvoyProcess) -> None:
    headers = {"authorization": f"Bearer {KEY_B}"}
    replies = [post(envoy, "/v1/embeddings", EMBEDDINGS, headers) for _ in range(3)]
    assert [reply.status for reply in replies[:2]] == [200, 200]
    refused = replies[2]
    assert refused.status == 429, refused.body
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "1 requests per second per API key" in error["message"]
    assert not [name for name in refused.headers if name.lower().startswith(("grpc-", "x-http"))]

    with official(envoy, KEY_B) as client, pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="fake", input="hello")
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "1"


def test_ollama_route_429_in_ollama_shape(envoy: EnvoyProcess) -> None:
    headers = {"x-api-key": KEY_C}
    body = {"model": "fake", "input": "hello"}
    replies = [post(envoy, "/api/embed", body, headers) for _ in range(3)]
    refused = replies[-1]
    assert "Rate limit exceeded" in assert_ollama_error(refused, 429)
    assert refused.headers["retry-after"] == "1"


def test_new_routes_need_a_key_in_their_api_shape_but_health_does_not(
    envoy: EnvoyProcess,
) -> None:
    for path in ("/", "/api/tags", "/api/version"):
        assert assert_ollama_error(http(envoy.base_url + path), 401).startswith("Incorrect API key")
    for path, body in [
        ("/api/embeddings", {"model": "fake", "prompt": "hello"}),
        ("/api/show", {"model": "fake"}),
    ]:
        assert assert_ollama_error(post(envoy, path, body, {}), 401).startswith("Incorrect")
    cohere = post(envoy, "/v2/embed", {"texts": ["hello"]}, {})
    assert cohere.status == 401, cohere.body
    assert set(cohere.json()) == {"message"}
    assert cohere.json()["message"].startswith("Incorrect API key provided")
    for _ in range(5):  # open, and outside every rate limit
        health = http(envoy.base_url + "/health")
        assert (health.status, health.json()) == (200, {"status": "serving"})
        ping = http(envoy.base_url + "/ping")  # TEI's health check: public there too
        assert (ping.status, ping.body) == (200, b"")
    tei = post(envoy, "/embed", {"inputs": "hello"}, {})
    assert tei.status == 401, tei.body
    assert set(tei.json()) == {"error", "error_type"}
    assert tei.json()["error"].startswith("Incorrect API key provided")


def test_cohere_route_429_in_cohere_shape(envoy: EnvoyProcess) -> None:
    headers = {"authorization": f"Bearer {KEY_D}"}
    replies = [post(envoy, "/v2/embed", {"texts": ["hello"]}, headers) for _ in range(3)]
    assert [reply.status for reply in replies[:2]] == [200, 200]
    refused = replies[2]
    assert refused.status == 429, refused.body
    assert refused.headers["retry-after"] == "1"
    assert "Rate limit exceeded" in refused.json()["message"]


def test_rerank_routes_need_a_key_and_are_rate_limited_in_their_shapes(
    envoy: EnvoyProcess,
) -> None:
    body = {"model": "fake", "query": "q", "documents": ["d"]}
    for path in ("/v1/rerank", "/v2/rerank"):
        refused = post(envoy, path, body, {})
        assert refused.status == 401, refused.body
        assert set(refused.json()) == {"message", "detail"}
        assert refused.json()["message"].startswith("Incorrect API key provided")
    tei = post(envoy, "/rerank", {"query": "q", "texts": ["d"]}, {})
    assert tei.status == 401, tei.body
    assert set(tei.json()) == {"error", "error_type"}
    headers = {"authorization": f"Bearer {KEY_E}"}
    replies = [post(envoy, "/v1/rerank", body, headers) for _ in range(3)]
    # Within the limit the call reaches the server ('fake' embeds: a 400 naming the routes).
    assert [reply.status for reply in replies[:2]] == [400, 400]
    assert "not a reranker" in replies[0].json()["message"]
    assert replies[2].status == 429, replies[2].body
    assert replies[2].headers["retry-after"] == "1"
    assert "Rate limit exceeded" in replies[2].json()["detail"]


def test_model_control_needs_an_admin_key_over_rest(tmp_path: Path) -> None:
    admin, user = "sk-admin", "sk-user"
    with (
        ServerThread.with_fake_models(
            tmp_path / "models", api_keys=user, admin_api_keys=admin
        ) as server,
        EnvoyProcess.start([server.target], tmp_path / "envoy") as envoy,
    ):
        load = {"model": "other", "keep_alive": -1}
        for path, body in [("/v1/models/load", load), ("/v1/models/unload", {"model": "other"})]:
            refused = post(envoy, path, body, {"authorization": f"Bearer {user}"})
            error = assert_openai_error(refused, 403, "permission_denied")
            assert "needs an admin key; this API key is not one" in error["message"]
            done = post(envoy, path, body, {"authorization": f"Bearer {admin}"})
            assert done.status == 200, done.body
        # Not even an admin may unload the default model: it stays loaded, as --help says.
        default = post(envoy, "/v1/models/unload", {"model": "fake"}, {"x-api-key": admin})
        error = assert_openai_error(default, 409, "conflict")
        assert "'fake' is the default model, which stays loaded" in error["message"]
        # A user's keep_alive 0 on the default model leaves it loaded.
        ollama = {"model": "fake", "input": "hi", "keep_alive": 0}
        assert post(envoy, "/api/embed", ollama, {"x-api-key": user}).status == 200
        server.call(server.server.registry.reap())
        assert server.server.registry.is_loaded("fake") and server.server.registry.loads == 2
