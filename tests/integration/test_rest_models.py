"""Model management over REST through the real Envoy: load, unload, /api/ps, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.fakes import write_fake_gguf
from tests.integration.test_rest_fake import assert_ollama_error, assert_openai_error
from tests.servers import ServerThread


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    root = tmp_path_factory.mktemp("rest-models")
    write_fake_gguf(root / "models" / "causal.gguf", pooling=0)
    with (
        ServerThread.with_fake_models(root / "models") as server,
        EnvoyProcess.start([server.target], root / "envoy") as proxy,
    ):
        yield proxy


def call(envoy: EnvoyProcess, method: str, path: str, body: object = None) -> HttpReply:
    return http(envoy.base_url + path, method, body=body)


def test_load_ps_and_unload(envoy: EnvoyProcess) -> None:
    loaded = call(
        envoy, "POST", "/v1/models/load", {"model": "other", "embedding": True, "keep_alive": "1h"}
    )
    assert loaded.status == 200, loaded.body
    assert loaded.json()["message"] == "Model loaded successfully"
    assert loaded.json()["model"]["id"] == "other" and loaded.json()["model"]["loaded"] is True
    ps = call(envoy, "GET", "/api/ps").json()
    running = {model["name"]: model for model in ps["models"]}
    assert set(running) == {"fake", "other"}
    other = running["other"]
    assert set(other) == {
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    }
    assert other["context_length"] == 16  # the fake model's limit
    assert isinstance(other["size"], int | float) and other["size"] > 0
    assert len(other["digest"]) == 64 and other["details"]["format"] == "gguf"
    unloaded = call(envoy, "POST", "/v1/models/unload", {"model": "other"})
    assert unloaded.status == 200 and unloaded.json()["model"]["loaded"] is False
    assert "other" not in {m["name"] for m in call(envoy, "GET", "/api/ps").json()["models"]}


def test_causal_model_needs_pooling(envoy: EnvoyProcess) -> None:
    refused = call(envoy, "POST", "/v1/embeddings", {"model": "causal", "input": "hi"})
    error = assert_openai_error(refused, 400, "model_not_embedding")
    assert "does not support embeddings" in error["message"]
    ollama = call(envoy, "POST", "/api/embed", {"model": "causal", "input": "hi"})
    assert "does not support embeddings" in assert_ollama_error(ollama, 400)
    loaded = call(
        envoy, "POST", "/v1/models/load", {"model": "causal", "embedding": True, "pooling": "mean"}
    )
    assert loaded.status == 200, loaded.body
    assert call(envoy, "POST", "/v1/embeddings", {"model": "causal", "input": "hi"}).status == 200


def test_load_errors(envoy: EnvoyProcess) -> None:
    missing = call(envoy, "POST", "/v1/models/load", {"model": "nope", "embedding": True})
    assert "Available models:" in assert_openai_error(missing, 404, "model_not_found")["message"]
    generation = call(envoy, "POST", "/v1/models/load", {"model": "other", "embedding": False})
    assert generation.status == 501, generation.body
    assert generation.json()["error"]["code"] == "not_implemented_error"
    bad = call(envoy, "POST", "/v1/models/load", {"model": "other", "keep_alive": "soon"})
    assert "keep_alive" in assert_openai_error(bad, 400, "invalid_request_error")["message"]
