"""The synchronous client of an embedd server (``embedd.v1.Embedder`` over gRPC)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Generator
from types import TracebackType
from typing import ParamSpec, TypeVar

import grpc

from embedd._base import BaseClient
from embedd._calls import Stream, Unary
from embedd._convert import Connection, FloatMatrix, rpc_errors, stream_requests
from embedd.errors import EmbeddClientError

T = TypeVar("T")
P = ParamSpec("P")


class Client(BaseClient):
    """A blocking client of an embedd server.

    ``target`` is ``host:port`` of the gRPC server. ``timeout`` is the deadline in seconds of
    each unary call (None: no deadline); ``metadata`` is sent with every call, and ``api_key``
    adds ``authorization: Bearer <api_key>``. ``max_message_mb`` bounds messages both ways,
    like the server's setting of the same name.

    TLS: a target ``https://host:port``, ``tls=True`` or any ``tls_*`` argument makes the
    channel TLS (plaintext otherwise). ``tls_ca`` is the CA that signed the server's
    certificate (default: grpc's bundle of public CAs); ``tls_cert`` and ``tls_key`` are this
    client's certificate and key for a server that requires one (mutual TLS);
    ``tls_server_name`` checks the server's certificate against another name than the
    target's host. Each is a PEM file's path or its content as bytes. Behind ``embedd run``,
    gRPC over TLS is on Envoy's port (the REST port)::

        Client("https://embedd.example.com:8080", tls_ca="ca.pem")

    Every method raises an :class:`embedd.EmbeddClientError` subclass when the call fails.
    Use it as a context manager, or call :meth:`close`::

        with Client("127.0.0.1:50051") as client:
            vectors = client.embed(["hello world", "the cat sat"])  # (2, d) float32

    The methods (embed, embed_with_usage, embed_compact, embed_tokens, embed_stream, rerank,
    classify, embed_sparse, tokenize, models, get_model, health) are declared once for this
    client and :class:`embedd.AsyncClient`, in :class:`embedd._base.BaseClient`.
    """

    _channel: grpc.Channel

    def _open(self, way: Connection) -> grpc.Channel:
        if way.credentials is None:
            return grpc.insecure_channel(way.target, options=way.options)
        return grpc.secure_channel(way.target, way.credentials, options=way.options)

    def _bind(self, build: Callable[P, Unary[T]]) -> Callable[P, T]:
        def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return self._send(build(*args, **kwargs))

        return method

    def _send(self, call: Unary[T]) -> T:
        try:
            with rpc_errors():
                response = self._rpc(call)(
                    call.request, timeout=self.timeout, metadata=self._metadata
                )
        except EmbeddClientError as error:
            return call.failed(error)
        return call.answer(response)

    def _stream(self, call: Stream) -> Generator[FloatMatrix, None, None]:
        if isinstance(call.texts, AsyncIterable):
            raise TypeError("Client.embed_stream reads an iterable; for an async one, AsyncClient")
        state = call.state
        stream = self._open_stream(stream_requests(call.texts, state), call)
        with state.answering(stream):
            for response in stream:
                yield state.answer(response)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
