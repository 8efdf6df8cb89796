"""embedd.Client and embedd.AsyncClient send the same request messages for the same arguments.

Both clients declare their methods once (embedd._base), so this pins that for every public
method: a recording gRPC server answers each RPC with a well-formed canned response and keeps
the requests it received, and the sync and the async call of each method must leave the same
requests (and in the RPC the method is meant for).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from embedd import AsyncClient, Client
from embedd._base import BaseClient
from embedd._calls import Method, StreamMethod
from embedd.v1 import embedder_pb2 as pb

Received = list[tuple[str, Message]]


def _embeddings(count: int) -> list[pb.Embedding]:
    """``count`` rows that read both as float vectors and as 2-byte compact vectors."""
    return [pb.Embedding(index=i, values=[1.0, 0.0], data=b"\x01\x02") for i in range(count)]


def _embed(request: pb.EmbedRequest) -> pb.EmbedResponse:
    count = len(request.texts) + len(request.token_ids)
    return pb.EmbedResponse(embeddings=_embeddings(count), request_id=request.request_id)


@dataclass
class Recorder:
    """The requests a server received, in order, with the full name of their RPC."""

    received: Received = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def unary(self, name: str, answer: Callable[[Any], Message]) -> Callable[[Any, Any], Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            with self.lock:
                self.received.append((name, request))
            return answer(request)

        return handle

    def stream(self, name: str) -> Callable[[Iterator[Any], Any], Iterator[Message]]:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Message]:
            for request in requests:
                with self.lock:
                    self.received.append((name, request))
                yield _embed(request)

        return handle

    def take(self) -> Received:
        with self.lock:
            taken, self.received = self.received, []
        return taken


# The canned answer of each unary RPC, by service and method, with its request type.
UNARY: dict[str, dict[str, tuple[type[Message], Callable[[Any], Message]]]] = {
    "embedd.v1.Embedder": {
        "Embed": (pb.EmbedRequest, _embed),
        "Rerank": (pb.RerankRequest, lambda _: pb.RerankResponse(model="r")),
        "Classify": (pb.ClassifyRequest, lambda _: pb.ClassifyResponse(model="c")),
        "EmbedSparse": (pb.EmbedSparseRequest, lambda _: pb.EmbedSparseResponse(model="s")),
        "Tokenize": (pb.TokenizeRequest, lambda _: pb.TokenizeResponse(model="m", ids=[1])),
        "ListModels": (pb.ListModelsRequest, lambda _: pb.ListModelsResponse()),
        "GetModel": (pb.GetModelRequest, lambda request: pb.Model(name=request.model)),
    },
    "grpc.health.v1.Health": {
        "Check": (
            health_pb2.HealthCheckRequest,
            lambda _: health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING),
        ),
    },
}


def _handlers(recorder: Recorder) -> list[grpc.GenericRpcHandler]:
    handlers = []
    for service, methods in UNARY.items():
        table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            method: grpc.unary_unary_rpc_method_handler(
                recorder.unary(f"{service}/{method}", answer),
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for method, (request_type, answer) in methods.items()
        }
        if service == "embedd.v1.Embedder":
            table["EmbedStream"] = grpc.stream_stream_rpc_method_handler(
                recorder.stream(f"{service}/EmbedStream"),
                request_deserializer=pb.EmbedRequest.FromString,
                response_serializer=pb.EmbedResponse.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(service, table))
    return handlers


@pytest.fixture(scope="module")
def recording_server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(_handlers(recorder))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=None)


# Each public method with arguments that set every field it can, and the RPC it must call.
CALLS: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
    "embed": (
        "Embed",
        (["hello", "world"],),
        {"model": "m", "dimensions": 3, "normalize": False, "truncate": False},
    ),
    "embed_with_usage": ("Embed", ("hello",), {"model": "m", "dimensions": 2}),
    "embed_compact": ("Embed", (["a", "b"], "ubinary"), {"model": "m", "truncate": False}),
    "embed_tokens": ("Embed", ([[2, 4, 3], [2, 3]],), {"dimensions": 2, "normalize": False}),
    "embed_stream": (
        "EmbedStream",
        (["a", "b", "c", "d", "e"],),
        {"batch_size": 2, "model": "m", "dimensions": 2, "normalize": False, "truncate": False},
    ),
    "rerank": (
        "Rerank",
        ("query", ["doc one", "doc two"]),
        {"model": "r", "top_n": 1, "return_documents": True, "raw_scores": True},
    ),
    "classify": ("Classify", ([("a", "b"), "c"],), {"model": "c", "raw_scores": True}),
    "embed_sparse": ("EmbedSparse", (["a", "b"],), {"model": "s", "prompt_name": "query"}),
    "tokenize": ("Tokenize", ("hello world",), {"model": "m"}),
    "models": ("ListModels", (), {}),
    "get_model": ("GetModel", ("m",), {}),
    "health": ("Check", (), {}),
}


def test_every_method_is_checked() -> None:
    declared = {
        name for name, value in vars(BaseClient).items() if isinstance(value, Method | StreamMethod)
    }
    assert declared == set(CALLS)


def _sync_call(client: Client, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = getattr(client, name)(*args, **kwargs)
    return list(result) if name == "embed_stream" else result


async def _async_call(
    client: AsyncClient, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if name == "embed_stream":
        return [batch async for batch in client.embed_stream(*args, **kwargs)]
    return await getattr(client, name)(*args, **kwargs)


@pytest.mark.parametrize("name", list(CALLS))
def test_sync_and_async_send_the_same_requests(
    recording_server: tuple[str, Recorder], name: str
) -> None:
    target, recorder = recording_server
    rpc, args, kwargs = CALLS[name]
    recorder.take()
    with Client(target, timeout=30) as client:
        _sync_call(client, name, args, kwargs)
    sent_sync = recorder.take()

    async def scenario() -> None:
        async with AsyncClient(target, timeout=30) as aclient:
            await _async_call(aclient, name, args, kwargs)

    asyncio.run(scenario())
    sent_async = recorder.take()

    assert sent_sync, f"{name} sent nothing"
    assert {rpc_name.rsplit("/", 1)[1] for rpc_name, _ in sent_sync} == {rpc}
    assert sent_async == sent_sync


def test_the_requests_carry_the_arguments(recording_server: tuple[str, Recorder]) -> None:
    """The comparison above is of real requests: spot-check that they say what was asked."""
    target, recorder = recording_server
    recorder.take()
    with Client(target, timeout=30) as client:
        assert list(client.embed_stream(["a", "b", "c"], batch_size=2, model="m")) != []
        client.rerank("q", "doc", top_n=1)
    first, second, rerank = (request for _, request in recorder.take())
    assert isinstance(first, pb.EmbedRequest) and isinstance(second, pb.EmbedRequest)
    assert isinstance(rerank, pb.RerankRequest)
    assert (list(first.texts), first.request_id, first.model) == (["a", "b"], "0", "m")
    assert (list(second.texts), second.request_id) == (["c"], "1")
    assert (rerank.query, list(rerank.documents), rerank.top_n) == ("q", ["doc"], 1)


def test_arguments_are_checked_alike() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError) as sync_error:
        client.embed(["hello", b"world"])  # type: ignore[list-item]

    async def scenario() -> None:
        async with AsyncClient("127.0.0.1:1") as aclient:
            with pytest.raises(TypeError) as async_error:
                await aclient.embed(["hello", b"world"])  # type: ignore[list-item]
            assert (
                str(async_error.value) == str(sync_error.value) == "input 1 is a bytes, not a str"
            )

    asyncio.run(scenario())
