"""Request ids and metrics through a real Envoy, in front of a server on the fake engine."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.run.probes import free_port
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerThread

ACCESS_LOGGER = "embedd_server.rpc.interceptors.access_log"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    root = tmp_path_factory.mktemp("observability")
    with (
        ServerThread.with_fake_models(root / "models", metrics_port=free_port()) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield server, envoy


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> logging.LogRecord:
    """The server's access log line of a request id (failed calls log a moment late)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == ACCESS_LOGGER and getattr(record, "request_id", "") == request_id:
                return record
        time.sleep(0.01)
    raise AssertionError(f"no access log line with request_id {request_id}")


def test_rest_request_id_reaches_the_server_log(
    stack: tuple[ServerThread, EnvoyProcess], caplog: pytest.LogCaptureFixture
) -> None:
    _, envoy = stack
    caplog.set_level(logging.INFO, logger="embedd_server")
    reply = http(
        envoy.base_url + "/v1/embeddings",
        "POST",
        body={"model": "fake", "input": ["hello world", "the cat"]},
        headers={"x-request-id": "abc-123"},
    )
    assert reply.status == 200
    assert reply.headers["x-request-id"] == "abc-123"  # Envoy's echo
    line = access_line(caplog, "abc-123")
    expected: dict[str, object] = {
        "method": "CreateEmbeddings",
        "code": "OK",
        "model": "fake",
        "inputs": 2,
    }
    assert {key: getattr(line, key, None) for key in expected} == expected


def test_rest_errors_keep_their_body_and_are_logged_with_the_id(
    stack: tuple[ServerThread, EnvoyProcess], caplog: pytest.LogCaptureFixture
) -> None:
    _, envoy = stack
    caplog.set_level(logging.INFO, logger="embedd_server")
    reply = http(
        envoy.base_url + "/api/embed",
        "POST",
        body={"model": "nope", "input": "x"},
        headers={"x-request-id": "ollama-404"},
    )
    assert reply.status == 404
    assert "does not exist" in reply.json()["error"]
    assert reply.headers["x-request-id"] == "ollama-404"
    line = access_line(caplog, "ollama-404")
    assert (line.method, line.code) == ("OllamaEmbed", "NOT_FOUND")  # type: ignore[attr-defined]


def test_envoy_gives_an_id_to_calls_that_bring_none(
    stack: tuple[ServerThread, EnvoyProcess], caplog: pytest.LogCaptureFixture
) -> None:
    _, envoy = stack
    caplog.set_level(logging.INFO, logger="embedd_server")
    with grpc.insecure_channel(envoy.grpc_target) as channel:
        _, call = pb_grpc.EmbedderStub(channel).Embed.with_call(pb.EmbedRequest(texts=["hello"]))
    # Envoy made the id and returns it; the server logged the same one.
    request_id = str(dict(call.initial_metadata())["x-request-id"])
    uuid.UUID(request_id)
    assert access_line(caplog, request_id).method == "Embed"  # type: ignore[attr-defined]


def test_rest_routes_are_counted_as_their_rpc(stack: tuple[ServerThread, EnvoyProcess]) -> None:
    server, envoy = stack
    reply = http(envoy.base_url + "/v1/embeddings", "POST", body={"input": "hello"})
    assert reply.status == 200
    server.call(asyncio.sleep(0))  # calls are counted in the loop's turn after their answer
    with urllib.request.urlopen(f"http://127.0.0.1:{server.settings.metrics_port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    counted = {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for sample in families["embedd_requests"].samples
        if sample.name == "embedd_requests_total"
    }
    assert counted[("CreateEmbeddings", "OK")] >= 1


def test_truncated_inputs_are_in_the_header_the_access_log_and_the_metric(
    stack: tuple[ServerThread, EnvoyProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server, envoy = stack
    caplog.set_level(logging.INFO, logger="embedd_server")
    long_text = "hello " * 40  # the fake models take 16 tokens
    reply = http(
        envoy.base_url + "/api/embed",
        "POST",
        body={"model": "fake", "input": [long_text, "hello", long_text]},
        headers={"x-request-id": "cut-2"},
    )
    assert reply.status == 200, reply.body
    assert reply.headers["x-embedd-truncated-inputs"] == "2"
    line = access_line(caplog, "cut-2")
    assert (line.inputs, line.truncated) == (3, 2)  # type: ignore[attr-defined]
    server.call(asyncio.sleep(0))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.settings.metrics_port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    [counted] = [
        sample.value
        for sample in families["embedd_truncated_inputs"].samples
        if sample.name == "embedd_truncated_inputs_total" and sample.labels["model"] == "fake"
    ]
    assert counted >= 2
    # Native gRPC callers get the count as trailing metadata.
    with grpc.insecure_channel(envoy.grpc_target) as channel:
        _, call = pb_grpc.EmbedderStub(channel).Embed.with_call(
            pb.EmbedRequest(texts=[long_text], truncation=pb.TRUNCATION_START)
        )
    assert dict(call.trailing_metadata())["x-embedd-truncated-inputs"] == "1"
