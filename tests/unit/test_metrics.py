"""Observability on the fake engine: the Prometheus endpoint, request ids and access log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf.struct_pb2 import Value
from prometheus_client.parser import text_string_to_metric_families

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.core.request_info import RequestInfo, _current
from embedd_server.core.scheduler import FairQueue, Job
from embedd_server.logs import JsonFormatter, RequestIdFilter, TextFormatter
from embedd_server.rpc.server import EmbeddServer, StartupError
from embedd_server.run.probes import free_port
from embedd_server.settings import Settings
from tests.fakes import FakeLoader, gated, on_token, worker_killed, write_fake_gguf
from tests.servers import ServerThread

ACCESS_LOGGER = "embedd_server.rpc.interceptors.access_log"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerThread) -> Samples:
    """Every sample of /metrics, keyed by (sample name, labels). A call is counted in the
    server loop's turn after its answer went out: one turn of the loop first settles that."""
    server.call(asyncio.sleep(0))
    port = server.settings.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A fake-engine server with its metrics endpoint on a free port."""
    with ServerThread.with_fake_models(tmp_path, metrics_port=free_port()) as server:
        yield server


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)


def access_lines(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[logging.LogRecord]:
    """The access log lines, once there are ``count``: a failed call is logged just after
    its status went out, so the client may see the error a moment before the line."""
    deadline = time.monotonic() + 5
    while True:
        lines = [record for record in caplog.records if record.name == ACCESS_LOGGER]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_requests_stages_batches_and_state_are_counted(
    server: ServerThread, stub: pb_grpc.EmbedderStub
) -> None:
    tokens = 0
    for _ in range(5):
        tokens += stub.Embed(pb.EmbedRequest(texts=["hello world", "the cat"])).usage.prompt_tokens
    for bad in (pb.EmbedRequest(texts=[""]), pb.EmbedRequest(model="nope", texts=["x"])):
        with pytest.raises(grpc.RpcError):
            stub.Embed(bad)
    streamed = stub.EmbedStream(iter([pb.EmbedRequest(texts=["a dog"])] * 2))
    tokens += sum(response.usage.prompt_tokens for response in streamed)

    samples = scrape(server)
    requests = "embedd_requests_total"
    assert value(samples, requests, method="Embed", model="fake", code="OK") == 5
    # Errors before a model is resolved carry no model: a caller's typo is not a label.
    assert value(samples, requests, method="Embed", model="", code="INVALID_ARGUMENT") == 1
    assert value(samples, requests, method="Embed", model="", code="NOT_FOUND") == 1
    assert value(samples, requests, method="EmbedStream", model="fake", code="OK") == 1
    assert value(samples, "embedd_request_duration_seconds_count", method="Embed") == 7
    for stage in ("queue", "tokenize"):
        assert value(samples, "embedd_stage_duration_seconds_count", stage=stage) == 7
    assert value(samples, "embedd_stage_duration_seconds_count", stage="compute") >= 1
    assert value(samples, "embedd_batch_size_texts_sum") == 12
    assert value(samples, "embedd_batch_size_tokens_sum") == tokens
    assert value(samples, "embedd_input_tokens_total", model="fake") == tokens
    assert value(samples, "embedd_queue_texts", model="fake") == 0
    assert value(samples, "embedd_queue_tokens", model="fake") == 0
    assert value(samples, "embedd_workers_alive", model="fake") == 2
    assert value(samples, "embedd_models_loaded") == 1
    assert value(samples, "embedd_model_loads_total", model="fake") == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    stub.Embed(pb.EmbedRequest(model="other", texts=["hello"]))
    assert value(scrape(server), "embedd_models_loaded") == 2


def test_queue_gauges_show_waiting_texts_and_tokens(tmp_path: Path) -> None:
    gate = threading.Event()  # both workers block inside their first decode
    with (
        ServerThread.with_fake_models(
            tmp_path, FakeLoader(gated(gate)), metrics_port=free_port(), batch_sequences=1
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        call = pb_grpc.EmbedderStub(channel).Embed.future(
            pb.EmbedRequest(texts=["hello world"] * 6)  # [CLS] hello world [SEP]: 4 tokens
        )
        deadline = time.monotonic() + 5
        while value(samples := scrape(server), "embedd_queue_texts", model="fake") != 4:
            assert time.monotonic() < deadline, "two inputs taken, four waiting"
            time.sleep(0.02)
        assert value(samples, "embedd_queue_tokens", model="fake") == 16
        gate.set()
        assert len(call.result(timeout=10).embeddings) == 6
        samples = scrape(server)
    assert value(samples, "embedd_queue_texts", model="fake") == 0
    assert value(samples, "embedd_queue_tokens", model="fake") == 0
    assert value(samples, "embedd_batch_size_texts_count") == 6


def test_queue_tokens_follow_taken_cancelled_and_expired_jobs() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue(100)
        kept = Job([[1] * 3, [2] * 5], 2, loop)
        queue.submit(kept)
        (item,) = queue.take_batch(max_tokens=100, max_items=1)
        assert (item.job, kept.started_at is not None) == (kept, True)
        assert (queue.queued_items, queue.queued_tokens) == (1, 5)
        cancelled = Job([[3] * 7], 2, loop)
        expired = Job([[4] * 11], 2, loop, deadline=time.monotonic() - 1)
        for job in (cancelled, expired):
            queue.submit(job)
        assert (queue.queued_items, queue.queued_tokens) == (3, 23)
        cancelled.cancel()
        batch = queue.take_batch(max_tokens=100, max_items=10)
        assert [(item.job, item.index) for item in batch] == [(kept, 1)]
        assert (queue.queued_items, queue.queued_tokens) == (0, 0)
    finally:
        loop.close()


def test_a_call_past_its_deadline_is_logged_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedd_server")
    gate = threading.Event()  # the workers block: the call waits past its deadline
    with (
        ServerThread.with_fake_models(tmp_path, FakeLoader(gated(gate))) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        try:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.EmbedderStub(channel).Embed(
                    pb.EmbedRequest(texts=["cat"] * 50), timeout=0.3
                )
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            (line,) = access_lines(caplog)
        finally:
            gate.set()
    assert line.code == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
    assert line.duration_ms >= 250  # type: ignore[attr-defined]


def test_worker_replacements_are_counted(tmp_path: Path) -> None:
    dies_on_dog = FakeLoader(on_token(12, worker_killed))  # 12: "dog"
    with (
        ServerThread.with_fake_models(tmp_path, dies_on_dog, metrics_port=free_port()) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(pb.EmbedRequest(texts=["dog"]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.Embed(pb.EmbedRequest(texts=["cat"]))
        samples = scrape(server)
    assert value(samples, "embedd_worker_replacements_total", model="fake") == 1
    assert value(samples, "embedd_workers_alive", model="fake") == 2
    assert value(samples, "embedd_requests_total", method="Embed", model="fake", code="UNAVAILABLE")


def test_metrics_are_served_on_loopback_only(server: ServerThread) -> None:
    port = server.settings.metrics_port
    assert server.server.metrics.address == ("127.0.0.1", port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this finds the outward address
        outward = probe.getsockname()[0]
    if not outward.startswith("127."):
        with pytest.raises(OSError), socket.create_connection((outward, port), timeout=2):
            pass


def test_metrics_port_zero_serves_nothing(tmp_path: Path) -> None:
    with ServerThread.with_fake_models(tmp_path, metrics_port=0) as server:
        assert server.server.metrics.address is None


def test_a_taken_metrics_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    write_fake_gguf(tmp_path / "fake.gguf")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(
            grpc_port=0, models_dir=tmp_path, default_model="fake", metrics_port=port
        )
        server = EmbeddServer(settings, FakeLoader())

        async def start() -> None:
            try:
                await server.start()
            finally:
                await server.stop(0)

        with pytest.raises(StartupError) as caught:
            asyncio.run(start())
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "--metrics-port" in message and "EMBEDD_METRICS_PORT" in message


def test_request_id_from_metadata_is_logged(
    stub: pb_grpc.EmbedderStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedd_server")
    _, call = stub.Embed.with_call(
        pb.EmbedRequest(texts=["hello secret world"]), metadata=(("x-request-id", "abc-123"),)
    )
    assert "x-request-id" not in dict(call.trailing_metadata())  # the caller knows it
    (line,) = access_lines(caplog)
    assert line.levelno == logging.INFO
    expected: dict[str, object] = {"request_id": "abc-123", "method": "Embed", "code": "OK"}
    expected |= {"model": "fake", "inputs": 1, "tokens": 5}  # [CLS] hello [UNK] world [SEP]
    assert {key: getattr(line, key, None) for key in expected} == expected
    assert line.duration_ms > 0  # type: ignore[attr-defined]
    entry = json.loads(JsonFormatter().format(line))
    assert entry["request_id"] == "abc-123" and entry["code"] == "OK"
    assert "request_id='abc-123'" in TextFormatter().format(line)
    assert all("secret" not in JsonFormatter().format(record) for record in caplog.records)


def test_a_request_id_is_generated_when_none_is_sent_and_returned(
    stub: pb_grpc.EmbedderStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedd_server")
    _, call = stub.Embed.with_call(pb.EmbedRequest(texts=["hello"]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(texts=[""]))
    streamed = stub.EmbedStream(iter([pb.EmbedRequest(texts=["cat"])]))
    assert len(list(streamed)) == 1
    first, second, third = access_lines(caplog, count=3)
    assert (first.code, second.code) == ("OK", "INVALID_ARGUMENT")  # type: ignore[attr-defined]
    records = (first, second, third)
    ids = [str(uuid.UUID(record.request_id)) for record in records]  # type: ignore[attr-defined]
    assert len(set(ids)) == 3
    assert dict(call.trailing_metadata())["x-request-id"] == ids[0]
    assert dict(streamed.trailing_metadata())["x-request-id"] == ids[2]
    # An error stays a trailers-only reply with its own trailers (the REST error body).
    error = cast(grpc.Call, caught.value)
    assert dict(error.initial_metadata()) == {}
    assert "x-http-error-body" in dict(error.trailing_metadata())


def test_records_logged_inside_an_rpc_carry_its_request_id(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedd_server")
    caplog.handler.addFilter(RequestIdFilter())  # as configure_logging installs it
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.OpenAIStub(channel).CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="fake", input=Value(string_value="hello"), user="u-7"),
            metadata=(("x-request-id", "rest-42"),),
        )
    (core,) = [record for record in caplog.records if getattr(record, "user", None) == "u-7"]
    assert core.request_id == "rest-42"  # type: ignore[attr-defined]
    (line,) = access_lines(caplog)
    assert line.method == "CreateEmbeddings"  # type: ignore[attr-defined]
    outside = logging.makeLogRecord({"msg": "no rpc here"})
    assert RequestIdFilter().filter(outside) and not hasattr(outside, "request_id")
    token = _current.set(RequestInfo("inner", "Embed"))
    try:
        inside = logging.makeLogRecord({"msg": "in an rpc"})
        RequestIdFilter().filter(inside)
        assert inside.request_id == "inner"  # type: ignore[attr-defined]
    finally:
        _current.reset(token)


def test_calls_refused_by_access_control_are_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedd_server")
    with (
        ServerThread.with_fake_models(tmp_path, metrics_port=free_port(), api_keys="k-1") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.EmbedderStub(channel).Embed(
                pb.EmbedRequest(texts=["hello"]), metadata=(("x-request-id", "no-key-1"),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (line,) = access_lines(caplog)  # written once counted
        samples = scrape(server)
    code = "UNAUTHENTICATED"
    assert value(samples, "embedd_requests_total", method="Embed", model="", code=code) == 1
    assert (line.request_id, line.code) == ("no-key-1", code)  # type: ignore[attr-defined]
    assert all("k-1" not in JsonFormatter().format(record) for record in caplog.records)
