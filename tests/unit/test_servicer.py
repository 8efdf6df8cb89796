"""The servicer alone, under grpcio-testing: no network, statuses and error trailers.

grpc_testing drives synchronous servicers, so a small shim per service runs our asyncio
handlers (bound as the server binds them) on an event loop thread and adapts the test
context's abort() to the aio signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf.struct_pb2 import ListValue, Value

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.service import EmbeddingService
from embedd_server.rpc.backend import Backend
from embedd_server.rpc.services import APIS, bound_handlers
from embedd_server.settings import Settings
from tests.fakes import FakeLoader, engine_error, on_token, write_fake_gguf


class _AioContext:
    """The part of grpc.aio.ServicerContext our handlers use, over grpc_testing's context."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        remaining: float | None = self._context.time_remaining()
        return remaining

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        # grpc_testing's own abort() drops trailing metadata, so set the status by hand.
        self._context.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted


class _Aborted(Exception):
    """Raised by _AioContext.abort, like grpc.aio's AbortError."""


class _SyncShim:
    """Exposes each bound async handler of a service as the sync callable grpc_testing
    invokes."""

    def __init__(self, handlers: dict[str, Callable[..., Any]], loop: asyncio.AbstractEventLoop):
        self._handlers = handlers
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Any, Any], Any]:
        method = self._handlers[name]

        def call(request: Any, context: Any) -> Any:
            coroutine = method(request, _AioContext(context))
            try:
                return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)
            except _Aborted:
                return None  # the status set on the context ends the RPC

        return call


Invoke = Callable[[str, Any], tuple[Any, Any, grpc.StatusCode, str]]


@pytest.fixture
def rpc(tmp_path: Path) -> Iterator[Invoke]:
    with _servicer(tmp_path, FakeLoader()) as invoke:
        yield invoke


@contextlib.contextmanager
def _servicer(tmp_path: Path, loader: FakeLoader) -> Iterator[Invoke]:
    """The servicer over a fake-engine registry; invoke(method, request) runs one RPC."""
    write_fake_gguf(tmp_path / "fake.gguf")
    settings = Settings(models_dir=tmp_path, default_model="fake", workers=1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine_settings = settings.engine_settings()
    registry = ModelRegistry(engine_settings, loader)
    backend = Backend(EmbeddingService(engine_settings, registry), stream_window=2)
    shims = {
        api.SERVICE: _SyncShim(bound_handlers(api.SERVICE, api.HANDLERS, backend), loop)
        for api in APIS
    }
    server = grpc_testing.server_from_dictionary(shims, grpc_testing.strict_real_time())

    def invoke(method: str, request: Any) -> tuple[Any, Any, grpc.StatusCode, str]:
        [service] = [service for service in shims if method in service.methods_by_name]
        call = server.invoke_unary_unary(service.methods_by_name[method], (), request, None)
        response, trailers, code, details = call.termination()
        return response, dict(trailers or ()), code, details

    try:
        yield invoke
    finally:
        asyncio.run_coroutine_threadsafe(registry.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_embed_answers_ok(rpc: Any) -> None:
    response, _, code, _ = rpc("Embed", pb.EmbedRequest(texts=["hello cat"], request_id="7"))
    assert code == grpc.StatusCode.OK
    assert response.request_id == "7" and len(response.embeddings[0].values) == 8


def test_unknown_model_is_not_found_with_an_openai_error_trailer(rpc: Any) -> None:
    _, trailers, code, details = rpc("Embed", pb.EmbedRequest(texts=["x"], model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    body = json.loads(trailers["x-http-error-body"])
    assert body["error"]["code"] == "model_not_found" and trailers["x-http-status"] == "404"


def test_openai_input_shapes_are_validated(rpc: Any) -> None:
    mixed = Value(list_value=ListValue(values=[Value(string_value="a"), Value(number_value=1)]))
    _, trailers, code, details = rpc("CreateEmbeddings", pb.CreateEmbeddingsRequest(input=mixed))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "array of" in details
    assert json.loads(trailers["x-http-error-body"])["error"]["type"] == "invalid_request_error"


def test_ollama_errors_use_ollama_shape(rpc: Any) -> None:
    request = pb.OllamaEmbedRequest(model="nope", input=Value(string_value="x"))
    _, trailers, code, _ = rpc("OllamaEmbed", request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert set(json.loads(trailers["x-http-error-body"])) == {"error"}


def test_unexpected_failures_are_internal_and_generic(tmp_path: Path) -> None:
    with _servicer(tmp_path, FakeLoader(on_token(4, engine_error))) as rpc:  # 4: "hello"
        _, _, code, details = rpc("Embed", pb.EmbedRequest(texts=["hello"]))
    assert code == grpc.StatusCode.INTERNAL
    assert details == "Internal server error; the details are in the server log."
