"""The REST surface end to end: a real Envoy in front of an in-process server on the fake engine.

The fake model 'fake' has 8 dimensions, a 16-token limit and token ids 0..15; 'other' has 4.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.run.probes import free_port
from embedd_server.run.replicas import PortInUse, check_ports_free, run_with_envoy
from embedd_server.settings import Settings
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.fakes import FakeLoader, engine_error, on_token, slow
from tests.servers import ServerThread

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
EMBEDDING_RE = re.compile(rb'"embedding":\[([^\]]*)\]')
CAT = 7  # token id of "cat"
# While set, the shared server's engine fails on every batch holding "cat".
ENGINE_FAILS_ON_CAT = threading.Event()


def _fail_while_armed() -> None:
    if ENGINE_FAILS_ON_CAT.is_set():
        engine_error()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    """A fake-engine server and a real Envoy in front of it, shared by this module."""
    root = tmp_path_factory.mktemp("rest-fake")
    with (
        ServerThread.with_fake_models(
            root / "models", FakeLoader(on_token(CAT, _fail_while_armed))
        ) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield server, envoy


@pytest.fixture(scope="module")
def envoy(stack: tuple[ServerThread, EnvoyProcess]) -> EnvoyProcess:
    return stack[1]


@pytest.fixture(scope="module")
def server(stack: tuple[ServerThread, EnvoyProcess]) -> ServerThread:
    return stack[0]


@pytest.fixture
def client(envoy: EnvoyProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=envoy.base_url + "/v1", api_key="sk-test", max_retries=0
    ) as official:
        yield official


def post(envoy: EnvoyProcess, path: str, body: Any = None, raw: bytes | None = None) -> HttpReply:
    return http(envoy.base_url + path, "POST", body=body, raw=raw)


def embedder(channel: grpc.Channel) -> Any:
    """An Embedder stub (the generated module is untyped)."""
    return pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


def native_vectors(target: str, **request: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    with grpc.insecure_channel(target) as channel:
        reply = embedder(channel).Embed(pb.EmbedRequest(**request), timeout=30)
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


def assert_openai_error(reply: HttpReply, status: int, code: str | None) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert not [name for name in reply.headers if name.lower().startswith(("grpc-", "x-http-"))]
    body = reply.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == OPENAI_ERROR_KEYS
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error


def assert_ollama_error(reply: HttpReply, status: int) -> str:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    message: str = body["error"]
    assert message
    return message


# --- OpenAI: POST /v1/embeddings -------------------------------------------------------------


def test_embeddings_float_shape_and_types(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings", {"model": "fake", "input": "hello world"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert not [name for name in reply.headers if name.lower().startswith("grpc-")]
    body = reply.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["model"] == "fake"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    for value in body["usage"].values():
        assert type(value) is int
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    [item] = body["data"]
    assert set(item) == {"object", "index", "embedding"}
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert b'"index":0' in reply.body
    assert len(item["embedding"]) == 8
    assert all(type(x) is float for x in item["embedding"])
    assert np.linalg.norm(item["embedding"]) == pytest.approx(1, abs=1e-6)


def test_floats_print_in_shortest_float32_form(envoy: EnvoyProcess) -> None:
    texts = ["hello world", "the cat sat on the mat", "a dog runs fast"]
    reply = post(envoy, "/v1/embeddings", {"model": "fake", "input": texts})
    arrays = EMBEDDING_RE.findall(reply.body)
    assert len(arrays) == 3
    for array in arrays:
        for token in array.decode().split(","):
            shortest = str(np.float32(token))  # numpy prints a float32's shortest repr
            assert float(token) == float(shortest), token
            assert len(token.lstrip("-")) <= len(shortest.lstrip("-")) + 1, token
            assert len(token) <= 16, token  # a widened double prints ~20 characters


def test_base64_decodes_to_the_float_response(envoy: EnvoyProcess) -> None:
    texts = ["hello world", "the cat sat"]
    floats = post(envoy, "/v1/embeddings", {"model": "fake", "input": texts}).json()
    encoded = post(
        envoy, "/v1/embeddings", {"model": "fake", "input": texts, "encoding_format": "base64"}
    ).json()
    assert set(encoded["data"][0]) == {"object", "index", "embedding"}
    for as_float, as_b64 in zip(floats["data"], encoded["data"], strict=True):
        assert isinstance(as_b64["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(as_float["embedding"], dtype=np.float32))
    assert [d["index"] for d in encoded["data"]] == [0, 1]


def test_rest_vectors_equal_native_grpc(envoy: EnvoyProcess, server: ServerThread) -> None:
    texts = ["hello world", "a dog runs fast", "cat"]
    body = post(envoy, "/v1/embeddings", {"model": "fake", "input": texts}).json()
    rest = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(rest, native_vectors(server.target, model="fake", texts=texts))


def test_token_id_inputs(envoy: EnvoyProcess, server: ServerThread) -> None:
    one = post(envoy, "/v1/embeddings", {"model": "fake", "input": [2, 4, 5, 3]}).json()
    many = post(
        envoy, "/v1/embeddings", {"model": "fake", "input": [[2, 4, 3], [2, 6, 7, 3]]}
    ).json()
    assert len(one["data"]) == 1
    assert one["usage"]["prompt_tokens"] == 4
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert many["usage"]["prompt_tokens"] == 7
    expected = native_vectors(
        server.target,
        model="fake",
        token_ids=[pb.TokenIds(ids=[2, 4, 3]), pb.TokenIds(ids=[2, 6, 7, 3])],
    )
    rest = np.array([d["embedding"] for d in many["data"]], dtype=np.float32)
    np.testing.assert_array_equal(rest, expected)


def test_dimensions_cuts_and_renormalizes(envoy: EnvoyProcess) -> None:
    full = post(envoy, "/v1/embeddings", {"model": "fake", "input": "hello"}).json()
    cut = post(envoy, "/v1/embeddings", {"model": "fake", "input": "hello", "dimensions": 3})
    vector = np.array(cut.json()["data"][0]["embedding"])
    assert vector.shape == (3,)
    assert np.linalg.norm(vector) == pytest.approx(1, abs=1e-6)
    head = np.array(full["data"][0]["embedding"][:3])
    np.testing.assert_allclose(vector, head / np.linalg.norm(head), atol=1e-6)
    same = post(envoy, "/v1/embeddings", {"model": "fake", "input": "hello", "dimensions": None})
    assert same.json()["data"][0]["embedding"] == full["data"][0]["embedding"]


def test_default_model_user_and_unknown_fields(envoy: EnvoyProcess) -> None:
    body = {"input": "hello", "user": "user-42", "unknown_field": {"x": 1}}
    reply = post(envoy, "/v1/embeddings", body)
    assert reply.status == 200
    assert reply.json()["model"] == "fake"
    other = post(envoy, "/v1/embeddings", {"model": "other", "input": "hello"}).json()
    assert len(other["data"][0]["embedding"]) == 4


def test_unknown_query_parameters_are_ignored(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings?api-version=2024-01-01", {"input": "hello"})
    assert reply.status == 200


def test_2048_inputs_in_one_request(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings", {"model": "fake", "input": ["hello world"] * 2048})
    assert reply.status == 200
    data = reply.json()["data"]
    assert [d["index"] for d in data] == list(range(2048))


# --- OpenAI: the official client -------------------------------------------------------------


def test_official_client_base64_default_float_and_lists(
    client: openai.OpenAI, server: ServerThread
) -> None:
    texts = ["hello world", "the cat sat"]
    default = client.embeddings.create(model="fake", input=texts)  # asks for base64
    floats = client.embeddings.create(model="fake", input=texts, encoding_format="float")
    native = native_vectors(server.target, model="fake", texts=texts)
    for response in (default, floats):
        assert response.object == "list"
        assert response.model == "fake"
        assert [d.index for d in response.data] == [0, 1]
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_array_equal(got, native)
    assert default.usage.prompt_tokens == default.usage.total_tokens == floats.usage.prompt_tokens
    single = client.embeddings.create(model="fake", input="hello world", dimensions=4)
    assert len(single.data[0].embedding) == 4
    ids = client.embeddings.create(model="fake", input=[[2, 4, 3], [2, 5, 3]])
    assert len(ids.data) == 2


def test_official_client_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake", "other"]
    for model in models.data:
        assert model.object == "model"
        assert model.owned_by == "embedd"
        assert isinstance(model.created, int)
    assert client.models.retrieve("other").id == "other"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("kwargs", "code", "param"),
    [
        ({"input": None}, "invalid_request_error", "input"),
        ({"input": []}, "invalid_request_error", "input"),
        ({"input": ["hello", 4]}, "invalid_request_error", "input"),
        ({"input": [{"text": "hello"}]}, "invalid_request_error", "input"),
        ({"input": {"text": "hello"}}, "invalid_request_error", "input"),
        ({"input": [2, -1, 3]}, "invalid_request_error", "input"),
        ({"input": [[2, 4, 3], [2, 2.5, 3]]}, "invalid_request_error", "input"),
        ({"input": [2, 999, 3]}, "invalid_request_error", "input[0]"),
        ({"input": ["hello"] * 2049}, "invalid_request_error", "input"),
        ({"input": [""]}, "invalid_request_error", "input[0]"),
        ({"input": "hello", "encoding_format": "int4"}, "invalid_request_error", "encoding_format"),
        ({"input": "hello", "dimensions": 0}, "invalid_request_error", "dimensions"),
        ({"input": "hello", "dimensions": -3}, "invalid_request_error", "dimensions"),
        ({"input": "hello", "dimensions": 9}, "invalid_request_error", "dimensions"),
        ({"input": "hello " * 30}, "context_length_exceeded", "input[0]"),
    ],
)
def test_official_client_bad_requests(
    client: openai.OpenAI, kwargs: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="fake", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.code == code
    assert caught.value.type == "invalid_request_error"
    assert caught.value.param == param


def test_official_client_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="nope", input="hello")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


# --- OpenAI: raw HTTP errors -------------------------------------------------------------------


def test_missing_input_and_null_input(envoy: EnvoyProcess) -> None:
    for body in ({"model": "fake"}, {"model": "fake", "input": None}):
        error = assert_openai_error(
            post(envoy, "/v1/embeddings", body), 400, "invalid_request_error"
        )
        assert error["param"] == "input"
    empty_body = post(envoy, "/v1/embeddings", raw=b"")
    assert_openai_error(empty_body, 400, "invalid_request_error")


def test_context_length_exceeded_names_index_tokens_and_limit(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings", {"model": "fake", "input": ["hello", "hello " * 30]})
    error = assert_openai_error(reply, 400, "context_length_exceeded")
    assert error["param"] == "input[1]"
    assert "Input 1" in error["message"]
    # 32 tokens in all; a long text is tokenized only as far as the limit needs, so the
    # message may give a lower bound ("at least N tokens"), always over the limit.
    found = re.search(r"has (at least )?(\d+) tokens", error["message"])
    assert found is not None, error["message"]
    assert 16 < int(found.group(2)) <= 32
    assert found.group(1) or int(found.group(2)) == 32
    assert "limit of 16" in error["message"]


def test_malformed_json_is_400_in_openai_shape(envoy: EnvoyProcess) -> None:
    for raw in (b"{not json", b'{"input": "hello"', b'{"input": "x", "dimensions": 2.5}'):
        error = assert_openai_error(
            post(envoy, "/v1/embeddings", raw=raw), 400, "invalid_request_error"
        )
        assert error["param"] is None
        assert error["message"].startswith("Could not parse the JSON body: ")


def test_unknown_path_is_404_in_openai_shape(envoy: EnvoyProcess) -> None:
    error = assert_openai_error(post(envoy, "/v1/nothing", {"input": "x"}), 404, "not_found")
    assert "/v1/nothing" in error["message"]
    assert_openai_error(http(envoy.base_url + "/nothing"), 404, "not_found")
    assert_openai_error(http(envoy.base_url + "/v1/models/fake", "DELETE"), 404, "not_found")


def test_get_models_shape(envoy: EnvoyProcess) -> None:
    reply = http(envoy.base_url + "/v1/models")
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    for model in body["data"]:
        assert {"id", "object", "created", "owned_by"} <= set(model)
        assert model["object"] == "model"
        assert type(model["created"]) is int
        assert isinstance(model["owned_by"], str)
    one = http(envoy.base_url + "/v1/models/fake")
    assert one.status == 200
    assert one.json() == body["data"][0]
    missing = assert_openai_error(http(envoy.base_url + "/v1/models/nope"), 404, "model_not_found")
    assert "nope" in missing["message"]


# --- Ollama: POST /api/embed --------------------------------------------------------------------


def test_ollama_embed_shape(envoy: EnvoyProcess, server: ServerThread) -> None:
    reply = post(envoy, "/api/embed", {"model": "fake", "input": ["hello world", "cat"]})
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    }
    assert body["model"] == "fake"
    for key in ("total_duration", "load_duration", "prompt_eval_count"):
        assert type(body[key]) is int, key
    assert body["total_duration"] > 0
    assert body["prompt_eval_count"] > 0
    native = native_vectors(server.target, model="fake", texts=["hello world", "cat"])
    np.testing.assert_array_equal(np.array(body["embeddings"], dtype=np.float32), native)
    single = post(envoy, "/api/embed", {"model": "fake", "input": "hello"}).json()
    assert len(single["embeddings"]) == 1


def test_ollama_truncate_options_and_dimensions(envoy: EnvoyProcess) -> None:
    long_text = "hello " * 30
    truncated = post(envoy, "/api/embed", {"model": "fake", "input": long_text})
    assert truncated.status == 200
    assert truncated.json()["prompt_eval_count"] == 16
    refused = post(envoy, "/api/embed", {"model": "fake", "input": long_text, "truncate": False})
    assert "16" in assert_ollama_error(refused, 400)
    extras = {"keep_alive": "5m", "options": {"num_ctx": 512}, "dimensions": 2}
    reply = post(envoy, "/api/embed", {"model": "fake", "input": "hello", **extras})
    assert reply.status == 200
    assert len(reply.json()["embeddings"][0]) == 2


def test_ollama_errors_in_ollama_shape(envoy: EnvoyProcess) -> None:
    # (No input at all, or null, is Ollama's preload: test_ollama_edges.py.)
    assert_ollama_error(post(envoy, "/api/embed", {"model": "fake", "input": [1, 2]}), 400)
    assert_ollama_error(post(envoy, "/api/embed", {"model": "fake", "input": {"a": 1}}), 400)
    assert_ollama_error(post(envoy, "/api/embed", {"model": "fake", "input": [""]}), 400)
    assert "nope" in assert_ollama_error(
        post(envoy, "/api/embed", {"model": "nope", "input": "x"}), 404
    )
    broken = assert_ollama_error(post(envoy, "/api/embed", raw=b"{broken"), 400)
    assert broken.startswith("Could not parse the JSON body: ")
    assert_ollama_error(post(envoy, "/api/embed", {"input": "x", "keep_alive": "soon"}), 400)
    assert_ollama_error(post(envoy, "/api/nothing", {"input": "x"}), 404)


def test_internal_error_is_500_with_a_generic_message(
    envoy: EnvoyProcess, server: ServerThread
) -> None:
    ENGINE_FAILS_ON_CAT.set()
    try:
        openai_reply = post(envoy, "/v1/embeddings", {"model": "fake", "input": [2, 7, 3]})
        ollama_reply = post(envoy, "/api/embed", {"model": "fake", "input": "cat"})
    finally:
        ENGINE_FAILS_ON_CAT.clear()
    error = assert_openai_error(openai_reply, 500, None)
    assert error["message"] == "Internal server error; the details are in the server log."
    assert "fake engine failure" not in assert_ollama_error(ollama_reply, 500)


# --- native gRPC through Envoy's port ----------------------------------------------------------


def test_native_grpc_through_envoy(envoy: EnvoyProcess, server: ServerThread) -> None:
    through_envoy = native_vectors(envoy.grpc_target, model="fake", texts=["hello world"])
    np.testing.assert_array_equal(
        through_envoy, native_vectors(server.target, model="fake", texts=["hello world"])
    )
    with grpc.insecure_channel(envoy.grpc_target) as channel:
        stub = embedder(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(pb.EmbedRequest(model="nope", texts=["x"]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in str(caught.value.details())
        batches = [pb.EmbedRequest(texts=["hello"], request_id=str(i)) for i in range(3)]
        replies = list(stub.EmbedStream(iter(batches), timeout=10))
        assert [r.request_id for r in replies] == ["0", "1", "2"]
        # The REST RPCs are plain RPCs too.
        created = pb_grpc.OpenAIStub(channel).CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="fake", input=Value(string_value="hello")),
            timeout=10,
        )
        assert created.data[0].object == "embedding"


# --- upstream down or not serving, limits, ports -----------------------------------------------


def test_upstream_down_is_503_in_both_shapes(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with EnvoyProcess.start([dead], tmp_path) as envoy:
        reply = post(envoy, "/v1/embeddings", {"input": "hello"})
        error = assert_openai_error(reply, 503, "service_unavailable")
        assert "unavailable" in error["message"]
        down = assert_ollama_error(post(envoy, "/api/embed", {"input": "hello"}), 503)
        assert down.startswith("The embedding server is unavailable; retry later")
        with (
            openai.OpenAI(base_url=envoy.base_url + "/v1", api_key="k", max_retries=0) as client,
            pytest.raises(openai.InternalServerError) as caught,
        ):
            client.embeddings.create(model="fake", input="hello")
        assert caught.value.status_code == 503
        assert caught.value.code == "service_unavailable"
        assert caught.value.type == "server_error"
        with (
            grpc.insecure_channel(envoy.grpc_target) as channel,
            pytest.raises(grpc.RpcError) as rpc,
        ):
            embedder(channel).Embed(pb.EmbedRequest(texts=["x"]), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_not_serving_takes_the_server_out_then_back(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path / "models") as server,
        EnvoyProcess.start([server.target], tmp_path / "envoy") as envoy,
    ):
        assert post(envoy, "/v1/embeddings", {"input": "hello"}).status == 200
        assert http(envoy.base_url + "/health").status == 200
        server.call(server.server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        # GET /health says so at once (the RPC reads the state), before Envoy's checks do.
        assert_openai_error(http(envoy.base_url + "/health"), 503, "service_unavailable")
        reply = wait_for_status(envoy, 503)
        assert_openai_error(reply, 503, "service_unavailable")
        server.call(server.server._set_health(health_pb2.HealthCheckResponse.SERVING))
        assert wait_for_status(envoy, 200).json()["model"] == "fake"
        assert http(envoy.base_url + "/health").json() == {"status": "serving"}


def wait_for_status(envoy: EnvoyProcess, status: int, timeout: float = 10) -> HttpReply:
    deadline = time.monotonic() + timeout
    while True:
        reply = post(envoy, "/v1/embeddings", {"input": "hello"})
        if reply.status == status or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def test_message_over_the_servers_limit_is_413(tmp_path: Path) -> None:
    limit = 1 << 20
    with (
        ServerThread.with_fake_models(tmp_path / "models", max_request_bytes=limit) as server,
        EnvoyProcess.start([server.target], tmp_path / "envoy", max_request_bytes=limit) as envoy,
    ):
        big = {"input": ["hello world " * 50_000] * 3}  # ~1.8 MB
        error = assert_openai_error(post(envoy, "/v1/embeddings", big), 413, "request_too_large")
        assert error["type"] == "invalid_request_error"
        assert "larger than" in error["message"]
        assert_ollama_error(post(envoy, "/api/embed", big), 413)


def test_full_queue_is_429_in_both_shapes(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path / "models", max_queued_texts=2) as server,
        EnvoyProcess.start([server.target], tmp_path / "envoy") as envoy,
    ):
        too_many = {"input": ["hello", "world", "cat"]}
        reply = post(envoy, "/v1/embeddings", too_many)
        assert reply.status == 429
        assert reply.json()["error"]["code"] == "rate_limit_exceeded"
        assert set(reply.json()["error"]) == OPENAI_ERROR_KEYS
        assert_ollama_error(post(envoy, "/api/embed", too_many), 429)
        with (
            openai.OpenAI(base_url=envoy.base_url + "/v1", api_key="k", max_retries=0) as client,
            pytest.raises(openai.RateLimitError) as caught,
        ):
            client.embeddings.create(model="fake", input=too_many["input"])
        assert caught.value.status_code == 429
        assert caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("field", "flag", "env"),
    [
        ("http_port", "--http-port", "EMBEDD_HTTP_PORT"),
        ("grpc_port", "--grpc-port", "EMBEDD_GRPC_PORT"),
    ],
)
def test_port_in_use_is_one_clear_line(
    field: str, flag: str, env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(**{"grpc_port": 0, "http_port": free_port(), field: port})
        with pytest.raises(PortInUse) as caught:
            check_ports_free(settings)
        message = str(caught.value)
        assert f"port {port} ({field}) is already in use" in message
        assert flag in message
        assert env in message
        started = time.monotonic()
        assert run_with_envoy(settings) == 2  # before any model is loaded: no hang
        assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("embedd run: port ")


def test_free_ports_pass_the_check() -> None:
    check_ports_free(Settings(http_port=free_port(), grpc_port=0))


def test_error_bodies_are_json_not_grpc(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings", {"model": "nope", "input": "x"})
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert json.loads(reply.body)["error"]["code"] == "model_not_found"


def test_openai_truncate_setting_is_the_default_of_the_field(tmp_path: Path) -> None:
    long_text = "hello " * 40  # the fake models take 16 tokens
    with (
        ServerThread.with_fake_models(tmp_path / "models", openai_truncate=True) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.OpenAIStub(channel)
        cut, call = stub.CreateEmbeddings.with_call(
            pb.CreateEmbeddingsRequest(input=Value(string_value=long_text))
        )
        assert cut.usage.prompt_tokens == 16
        assert dict(call.trailing_metadata())["x-embedd-truncated-inputs"] == "1"
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateEmbeddings(
                pb.CreateEmbeddingsRequest(
                    input=Value(string_value=long_text), truncate=Value(bool_value=False)
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert '"truncate": true' in str(refused.value.details())


def test_truncate_must_be_a_json_boolean(envoy: EnvoyProcess) -> None:
    # The transcoder alone would read "yes" (or "1", "t") into a bool field as true.
    for value, kind in (("yes", "a string"), ("true", "a string"), (1, "a number")):
        reply = post(envoy, "/v1/embeddings", {"input": "hello", "truncate": value})
        assert reply.status == 400, value
        error = reply.json()["error"]
        assert set(error) == OPENAI_ERROR_KEYS and error["param"] == "truncate"
        assert error["message"] == f"truncate must be a JSON boolean (true or false); got {kind}."
    for allowed in (True, False, None):
        assert post(envoy, "/v1/embeddings", {"input": "hello", "truncate": allowed}).status == 200


def test_cohere_texts_must_be_a_list_of_strings(envoy: EnvoyProcess) -> None:
    plain = post(envoy, "/v2/embed", {"texts": "hello", "input_type": "search_query"})
    assert plain.status == 400
    assert plain.json() == {
        "message": 'texts must be an array of strings (e.g. "texts": ["hello"]); got a string.'
    }
    mixed = post(envoy, "/v2/embed", {"texts": ["hello", 3]})
    assert (mixed.status, mixed.json()) == (
        400,
        {"message": "texts[1] must be a string; got a number."},
    )
    listed = post(envoy, "/v2/embed", {"texts": ["hello", "cat"]})
    assert listed.status == 200 and listed.json()["texts"] == ["hello", "cat"]


HEADERS_TOO_LARGE = (
    "Request Header Fields Too Large: the request's headers take more than 32 KiB; send fewer "
    "or shorter headers."
)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/embeddings",
            {"input": "hello"},
            {
                "error": {
                    "message": HEADERS_TOO_LARGE,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_header_fields_too_large",
                }
            },
        ),
        ("/api/embed", {"model": "fake", "input": "hello"}, {"error": HEADERS_TOO_LARGE}),
        ("/v2/embed", {"texts": ["hello"]}, {"message": HEADERS_TOO_LARGE}),
        (
            "/rerank",
            {"query": "q", "texts": ["d"]},
            {"error": HEADERS_TOO_LARGE, "error_type": "Validation"},
        ),
    ],
)
def test_oversized_headers_are_431_in_the_routes_shape(
    envoy: EnvoyProcess, path: str, body: Any, expected: Any
) -> None:
    # 59 KiB: under Envoy's own bound, so it once reached grpcio, whose metadata limit made it
    # a misleading 413. 33 KiB: just over the documented 32 KiB.
    # Over 60 KiB Envoy refuses before any filter knows the route: OpenAI's shape for all.
    for kib in (33, 59, 100) if path == "/v1/embeddings" else (33, 59):
        reply = http(envoy.base_url + path, "POST", body=body, headers={"x-big": "a" * kib * 1024})
        assert (reply.status, reply.json()) == (431, expected), kib
    # Below the bound, big headers reach the server (whose metadata limit is higher).
    fine = http(envoy.base_url + path, "POST", body=body, headers={"x-big": "a" * 24 * 1024})
    assert fine.status != 431 and fine.status < 500


def test_a_callers_grpc_timeout_is_a_504_saying_the_deadline_passed(tmp_path: Path) -> None:
    # Each input takes 0.2 s, the caller allows 50 ms: grpcio ends the call itself
    # (DEADLINE_EXCEEDED, none of our trailers), which Envoy's error filter once reported as
    # "Internal server error".
    routes: list[tuple[str, dict[str, Any], Callable[[Any], str]]] = [
        ("/v1/embeddings", {"input": "hello"}, lambda body: body["error"]["message"]),
        ("/api/embed", {"model": "fake", "input": "hello"}, lambda body: body["error"]),
        ("/v2/embed", {"texts": ["hello"]}, lambda body: body["message"]),
    ]
    with (
        ServerThread.with_fake_models(tmp_path / "models", FakeLoader(slow(0.2))) as server,
        EnvoyProcess.start([server.target], tmp_path / "envoy") as envoy,
    ):
        for path, body, message_of in routes:
            reply = http(envoy.base_url + path, "POST", body=body, headers={"grpc-timeout": "50m"})
            assert reply.status == 504, path
            message = message_of(reply.json())
            assert "deadline (its grpc-timeout header) passed" in message, path
            if path == "/v1/embeddings":
                assert reply.json()["error"]["code"] == "timeout"
