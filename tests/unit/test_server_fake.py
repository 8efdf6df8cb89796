"""The gRPC server over the fake engine, through a real channel: errors, scheduling, lifecycle."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.core.scheduler import FairQueue
from tests.fakes import (
    FakeLoader,
    engine_error,
    fake_vector,
    gated,
    on_token,
    slow,
    worker_killed,
)
from tests.servers import ServerThread
from tests.waiting import wait_until

HELLO, CAT, DOG = 4, 7, 12
ACCESS_LOGGER = "embedd_server.rpc.interceptors.access_log"


@pytest.fixture
def stub(fake_server: ServerThread) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(fake_server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)


@contextlib.contextmanager
def _serving(
    tmp_path: Path, loader: FakeLoader, **overrides: object
) -> Iterator[tuple[ServerThread, pb_grpc.EmbedderStub]]:
    """A fake-engine server whose engines behave as ``loader`` says, and a stub on it."""
    with (
        ServerThread.with_fake_models(tmp_path, loader, **overrides) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        yield server, pb_grpc.EmbedderStub(channel)


def _queue(server: ServerThread) -> FairQueue:
    """The queue of the server's default model (loaded at start, the only one loaded)."""
    [model] = server.server.registry.loaded_models()
    return model.queue


def _error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def test_embed_returns_normalized_vectors_in_order_with_usage(stub: pb_grpc.EmbedderStub) -> None:
    response = stub.Embed(pb.EmbedRequest(texts=["hello cat", "dog"], request_id="r1"))
    assert response.model == "fake" and response.request_id == "r1"
    assert [e.index for e in response.embeddings] == [0, 1]
    expected = fake_vector([2, HELLO, CAT, 3], 8)
    np.testing.assert_allclose(_vectors(response)[0], expected / np.linalg.norm(expected), 1e-6)
    assert response.usage.prompt_tokens == 4 + 3 == response.usage.total_tokens


def test_dimensions_normalize_and_token_ids(stub: pb_grpc.EmbedderStub) -> None:
    raw = stub.Embed(pb.EmbedRequest(texts=["hello"], normalize=False))
    np.testing.assert_allclose(_vectors(raw)[0], fake_vector([2, HELLO, 3], 8), 1e-6)
    cut = _vectors(stub.Embed(pb.EmbedRequest(texts=["hello"], dimensions=3)))[0]
    head = fake_vector([2, HELLO, 3], 8)[:3]
    np.testing.assert_allclose(cut, head / np.linalg.norm(head), 1e-6)
    by_ids = stub.Embed(pb.EmbedRequest(token_ids=[pb.TokenIds(ids=[2, HELLO, 3])]))
    np.testing.assert_allclose(
        _vectors(by_ids), _vectors(stub.Embed(pb.EmbedRequest(texts=["hello"])))
    )


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.EmbedRequest(texts=["hello"], model="nope"), "NOT_FOUND", ["nope", "fake, other"]),
        (pb.EmbedRequest(), "INVALID_ARGUMENT", ["no input"]),
        (pb.EmbedRequest(texts=["hello", ""]), "INVALID_ARGUMENT", ["Input 1", "empty"]),
        (pb.EmbedRequest(texts=["hello"], dimensions=0), "INVALID_ARGUMENT", ["dimensions", "8"]),
        (pb.EmbedRequest(texts=["hello"], dimensions=9), "INVALID_ARGUMENT", ["between 1 and 8"]),
        (
            pb.EmbedRequest(texts=["hello"], token_ids=[pb.TokenIds(ids=[2])]),
            "INVALID_ARGUMENT",
            ["either texts or token ids"],
        ),
        (
            pb.EmbedRequest(token_ids=[pb.TokenIds(ids=[2, 99, 3])]),
            "INVALID_ARGUMENT",
            ["token id 99", "vocabulary"],
        ),
        (
            pb.EmbedRequest(texts=["ok", "hello " * 20], truncation=pb.TRUNCATION_NONE),
            "INVALID_ARGUMENT",
            ["Input 1", "22 tokens", "limit of 16"],
        ),
    ],
)
def test_bad_requests_get_a_status_and_a_message_to_act_on(
    stub: pb_grpc.EmbedderStub, request_: pb.EmbedRequest, code: str, words: list[str]
) -> None:
    error = _error(lambda: stub.Embed(request_))
    assert error.code() == getattr(grpc.StatusCode, code)
    for word in words:
        assert word in str(error.details())


def test_too_many_inputs_names_the_limit(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path, max_inputs_per_request=3) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["a"] * 4)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4 inputs" in str(error.details()) and "at most 3" in str(error.details())


def test_truncation_is_the_default(stub: pb_grpc.EmbedderStub) -> None:
    response = stub.Embed(pb.EmbedRequest(texts=["hello " * 20]))
    assert response.usage.prompt_tokens == 16


def test_engine_failure_is_internal_without_internals(tmp_path: Path) -> None:
    with _serving(tmp_path, FakeLoader(on_token(DOG, engine_error))) as (_, stub):
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["hello", "dog"])))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in str(error.details()) and "Traceback" not in str(error.details())
        # The worker survives an engine error and serves the next request.
        assert stub.Embed(pb.EmbedRequest(texts=["hello"])).embeddings


def test_a_workers_log_line_names_the_requests_of_its_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        _serving(tmp_path, FakeLoader(on_token(DOG, engine_error))) as (_, stub),
        caplog.at_level(logging.ERROR, logger="embedd_server.core.workers"),
    ):
        _error(
            lambda: stub.Embed(
                pb.EmbedRequest(texts=["dog"]), metadata=(("x-request-id", "req-42"),)
            )
        )
    (record,) = [r for r in caplog.records if "failed on a batch" in r.getMessage()]
    assert record.request_ids == ["req-42"]  # type: ignore[attr-defined]


def test_a_small_request_does_not_wait_for_a_big_batch(tmp_path: Path) -> None:
    with _serving(tmp_path, FakeLoader(slow(0.005))) as (server, stub):
        big = stub.Embed.future(pb.EmbedRequest(texts=["hello cat"] * 400))
        wait_until(lambda: server.runtime.calls, "the big batch is being computed")
        started = time.perf_counter()
        stub.Embed(pb.EmbedRequest(texts=["dog"]))
        small_seconds = time.perf_counter() - started
        assert not big.done(), "the big batch should still be running"
        assert small_seconds < 0.5
        assert len(big.result().embeddings) == 400


def test_deadline_and_cancellation_drop_queued_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()  # workers block on their first batch: everything else queues
    with (
        _serving(tmp_path, FakeLoader(gated(gate))) as (server, stub),
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
    ):
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["cat"] * 500), timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        queue = _queue(server)
        before = queue.queued_items
        cancelled = stub.Embed.future(pb.EmbedRequest(texts=["dog"] * 500))
        wait_until(lambda: queue.queued_items == before + 500, "the 500 dogs queued")
        cancelled.cancel()
        # The server logs the call once its handler ended, which dropped the queued job.
        wait_until(
            lambda: any(r.getMessage() == "Embed CANCELLED" for r in caplog.records),
            "the server saw the cancellation",
        )
        gate.set()
        stub.Embed(pb.EmbedRequest(texts=["hello"]))
        computed = [ids for ids in server.runtime.calls if ids[1] in (CAT, DOG)]
    # Only what the two workers had already taken (one batch each) was computed.
    in_flight = server.settings.workers * server.settings.batch_sequences
    assert len(computed) <= in_flight, f"{len(computed)} abandoned inputs were computed"


def test_a_full_queue_is_refused_at_once(tmp_path: Path) -> None:
    gate = threading.Event()
    loader = FakeLoader(gated(gate))
    with _serving(tmp_path, loader, max_queued_texts=10, batch_sequences=1) as (server, stub):
        waiting = stub.Embed.future(pb.EmbedRequest(texts=["cat"] * 8))
        # Each of the two workers holds one input inside its decode; six wait in the queue.
        wait_until(lambda: _queue(server).queued_items == 6, "six of the eight queued")
        started = time.perf_counter()
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["dog"] * 5)))
        assert time.perf_counter() - started < 1
        gate.set()
        assert len(waiting.result(timeout=10).embeddings) == 8
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in str(error.details())


def test_embed_stream_answers_in_order_with_bounded_read_ahead(tmp_path: Path) -> None:
    gate = threading.Event()
    with _serving(tmp_path, FakeLoader(gated(gate))) as (server, stub):
        pulled = 0

        def batches() -> Iterator[pb.EmbedRequest]:
            nonlocal pulled
            for number in range(200):
                pulled += 1
                yield pb.EmbedRequest(texts=["hello cat dog"] * 10, request_id=str(number))

        responses = stub.EmbedStream(batches())
        window = server.settings.stream_window
        queue = _queue(server)

        def read() -> int:
            """Inputs the server took from the stream: queued, or inside a (gated) decode."""
            return queue.queued_items + len(server.runtime.calls)

        # The client offers more than the window; the server reads the window's batches...
        wait_until(
            lambda: pulled > window + 1 and read() >= window * 10,
            f"the server read {window} batches while the client offered more",
        )
        # ...and no more: its event loop goes on (it answers other calls), the stream waits.
        for _ in range(3):
            assert stub.Tokenize(pb.TokenizeRequest(text="hello")).count == 3
        assert read() == window * 10, f"{read()} inputs read from one stream, not {window * 10}"
        gate.set()
        ids = [response.request_id for response in responses]
        assert ids == [str(number) for number in range(200)] and pulled == 200


def test_stream_batch_error_names_the_batch(stub: pb_grpc.EmbedderStub) -> None:
    batches = [pb.EmbedRequest(texts=["hello"], request_id="a"), pb.EmbedRequest(request_id="b")]
    responses = stub.EmbedStream(iter(batches))
    assert next(responses).request_id == "a"
    error = _error(lambda: next(responses))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Batch 'b'" in str(error.details())


def test_tokenize_and_models(stub: pb_grpc.EmbedderStub) -> None:
    tokens = stub.Tokenize(pb.TokenizeRequest(text="hello zebra"))
    assert list(tokens.ids) == [2, HELLO, 1, 3] and tokens.count == 4
    assert list(tokens.tokens) == ["[CLS]", "hello", "[UNK]", "[SEP]"]
    models = stub.ListModels(pb.ListModelsRequest())
    assert models.object == "list"
    assert [(m.id, m.dimensions, m.loaded) for m in models.data] == [
        ("fake", 8, True),
        ("other", 4, False),
    ]
    assert stub.GetModel(pb.GetModelRequest(model="other")).max_input_tokens == 16
    assert _error(lambda: stub.GetModel(pb.GetModelRequest(model="x"))).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_other_models_load_on_demand_once(stub: pb_grpc.EmbedderStub) -> None:
    futures = [stub.Embed.future(pb.EmbedRequest(texts=["hello"], model="other")) for _ in range(8)]
    assert {len(f.result().embeddings[0].values) for f in futures} == {4}
    assert stub.GetModel(pb.GetModelRequest(model="other")).loaded


def test_a_dead_worker_answers_its_callers_and_is_replaced(tmp_path: Path) -> None:
    with _serving(tmp_path, FakeLoader(on_token(DOG, worker_killed))) as (server, stub):
        for future in [stub.Embed.future(pb.EmbedRequest(texts=["dog"] * 3)) for _ in range(4)]:
            with pytest.raises(grpc.RpcError) as info:
                future.result(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "died" in str(info.value.details())
        assert len(stub.Embed(pb.EmbedRequest(texts=["cat"] * 20)).embeddings) == 20
        pool = server.server.registry.loaded_models()[0].pool
        assert pool.alive == 2 and pool.replaced >= 1


def test_a_hung_worker_is_replaced_and_its_callers_get_unavailable(tmp_path: Path) -> None:
    unhang = threading.Event()  # a decode that never ends (until the test ends it)
    loader = FakeLoader(on_token(DOG, functools.partial(unhang.wait, 30)))
    with _serving(tmp_path, loader, worker_timeout_s=0.5) as (_, stub):
        started = time.perf_counter()
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["dog"]), timeout=10))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "hung" in str(error.details())
        assert time.perf_counter() - started < 3
        # The replacement serves others while the hung thread is still stuck.
        assert len(stub.Embed(pb.EmbedRequest(texts=["cat"] * 5)).embeddings) == 5
        unhang.set()


def test_when_no_worker_can_start_callers_are_answered_and_health_drops(tmp_path: Path) -> None:
    # Each runtime makes its two workers' engines, then refuses: no replacement can start.
    loader = FakeLoader(on_token(DOG, worker_killed), max_engines=2)
    with _serving(tmp_path, loader) as (server, stub):
        results = [stub.Embed.future(pb.EmbedRequest(texts=["dog"] * 3)) for _ in range(4)]
        for future in results:
            with pytest.raises(grpc.RpcError) as info:
                future.result(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest()).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_shutdown_finishes_calls_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    server = ServerThread.with_fake_models(tmp_path, FakeLoader(slow(0.01)))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        in_flight = stub.Embed.future(pb.EmbedRequest(texts=["hello cat"] * 100))
        wait_until(lambda: server.runtime.calls, "the 100 texts are being computed")
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
        stopper.start()
        assert len(in_flight.result(timeout=10).embeddings) == 100
        stopper.join(15)
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["hello"]), timeout=2))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert server.runtime.closed, "the model is freed after the drain"


def test_errors_echoing_non_ascii_text_keep_their_status(stub: pb_grpc.EmbedderStub) -> None:
    error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["x"], model="modèle")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "modèle" in str(error.details())
    call = cast(grpc.Call, error)
    trailers = dict(call.trailing_metadata() or ())
    assert json.loads(trailers["x-http-error-body"])["error"]["code"] == "model_not_found"


def test_reflection_resolves_method_symbols_as_ghz_asks(fake_server: ServerThread) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            for symbol in ("embedd.v1.Embedder.Embed", "embedd.v1.Embedder.Nope")
        ]
        found, missing = list(stub.ServerReflectionInfo(iter(requests)))
    assert found.file_descriptor_response.file_descriptor_proto
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_undecodable_requests_are_invalid_argument(fake_server: ServerThread) -> None:
    invalid_utf8_text = b"\x12\x01\xff"  # EmbedRequest.texts = [b"\xff"]
    with grpc.insecure_channel(fake_server.target) as channel:
        embed: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/embedd.v1.Embedder/Embed"
        )
        error = _error(lambda: embed(invalid_utf8_text, timeout=5))
        stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/embedd.v1.Embedder/EmbedStream"
        )
        stream_error = _error(lambda: list(stream(iter([invalid_utf8_text]), timeout=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in str(error.details())
    assert stream_error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_truncation_value_is_refused_naming_the_field(
    stub: pb_grpc.EmbedderStub,
) -> None:
    # Protobuf enums are open: 99 arrives as 99 and must not be taken for a known mode.
    unknown = cast(pb.Truncation.ValueType, 99)
    calls = {
        "Embed": lambda: stub.Embed(pb.EmbedRequest(texts=["hi"], truncation=unknown)),
        "EmbedStream": lambda: list(
            stub.EmbedStream(iter([pb.EmbedRequest(texts=["hi"], truncation=unknown)]))
        ),
        "Rerank": lambda: stub.Rerank(
            pb.RerankRequest(query="q", documents=["d"], truncation=unknown)
        ),
        "Classify": lambda: stub.Classify(
            pb.ClassifyRequest(inputs=[pb.ClassifyInput(text="hi")], truncation=unknown)
        ),
        "EmbedSparse": lambda: stub.EmbedSparse(
            pb.EmbedSparseRequest(texts=["hi"], truncation=unknown)
        ),
    }
    for name, call in calls.items():
        error = _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "truncation 99 is not a known Truncation" in str(error.details()), name
        assert "TRUNCATION_END (1)" in str(error.details()), name
    known = stub.Embed(pb.EmbedRequest(texts=["hi"], truncation=pb.TRUNCATION_START))
    assert len(known.embeddings) == 1
