"""What :class:`embedd.Client` and :class:`embedd.AsyncClient` share: the constructor (the
channel's settings, the metadata) and every public method, declared once from
:mod:`embedd._calls`. Each client only says how it sends a call: :meth:`BaseClient._bind`
(a unary call: blocking, or a coroutine) and ``_stream`` (an EmbedStream: a generator, or an
async generator)."""

from __future__ import annotations

import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from grpc_health.v1 import health_pb2_grpc

from embedd import _calls
from embedd._calls import EMBEDDER, HEALTH, Stream, Unary
from embedd._convert import DEFAULT_TARGET, Connection, FloatMatrix, PemSource, call_metadata
from embedd._convert import connection as connection_of
from embedd.v1 import embedder_pb2_grpc

if TYPE_CHECKING:
    from embedd.aio import AsyncClient
    from embedd.client import Client

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")

#: What EmbedStream reads: an iterable of texts (AsyncClient: or an async iterable).
AnyTexts = Iterable[str] | AsyncIterable[str]


class _Declared:
    """A method declared from the function that builds its call: its name, docstring and
    signature (for help() and inspect) are that function's."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self.__name__ = self.__qualname__ = build.__name__
        self.__doc__ = build.__doc__
        parameters = inspect.signature(build).parameters.values()
        # No return annotation: the function returns the call, the method the answer.
        self._signature = inspect.Signature(list(parameters))
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        self.__signature__ = self._signature.replace(parameters=[self_parameter, *parameters])

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__, self.__qualname__ = name, f"{owner.__qualname__}.{name}"

    def __call__(self, client: BaseClient, *args: Any, **kwargs: Any) -> Any:
        """The method called through the class: ``Client.embed(client, texts)``."""
        return getattr(client, self.__name__)(*args, **kwargs)

    def _named(self, method: F) -> F:
        """``method``, bound to a client, under this method's name, docstring and signature."""
        method.__name__, method.__qualname__ = self.__name__, self.__qualname__
        method.__doc__ = self.__doc__
        method.__signature__ = self._signature  # type: ignore[attr-defined]
        return method


class Method(_Declared, Generic[P, T]):
    """A client method declared once: ``build`` checks the arguments and makes the call;
    on a :class:`embedd.Client` the method sends it and returns the answer, on an
    :class:`embedd.AsyncClient` it is a coroutine function of the same arguments."""

    def __init__(self, build: Callable[P, Unary[T]]) -> None:
        super().__init__(build)
        self.build = build

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Method[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: BaseClient | None, owner: type[Any]) -> Any:
        return self if client is None else self._named(client._bind(self.build))


class StreamMethod(_Declared, Generic[P]):
    """The EmbedStream method declared once: a generator of the batches' vectors on a
    :class:`embedd.Client`, an async generator on an :class:`embedd.AsyncClient` (which also
    reads an async iterable). The arguments are checked when it is called."""

    def __init__(self, build: Callable[Concatenate[AnyTexts, P], Stream]) -> None:
        super().__init__(build)
        self.build = build

    @overload
    def __get__(self, client: None, owner: type[Any]) -> StreamMethod[P]: ...
    @overload
    def __get__(
        self, client: Client, owner: type[Any]
    ) -> Callable[Concatenate[Iterable[str], P], Generator[FloatMatrix, None, None]]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type[Any]
    ) -> Callable[Concatenate[AnyTexts, P], AsyncGenerator[FloatMatrix, None]]: ...
    def __get__(self, client: BaseClient | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        build = self.build

        def method(texts: AnyTexts, *args: P.args, **kwargs: P.kwargs) -> Any:
            return client._stream(build(texts, *args, **kwargs))

        return self._named(method)


class BaseClient:
    """The part of a client of an embedd server that does not depend on how it waits.

    ``target`` is ``host:port`` of the gRPC server. ``timeout`` is the deadline in seconds of
    each unary call (None: no deadline); ``metadata`` is sent with every call, and ``api_key``
    adds ``authorization: Bearer <api_key>``. ``max_message_mb`` bounds messages both ways,
    like the server's setting of the same name. ``tls`` and ``tls_*``: see
    :class:`embedd.Client`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        max_message_mb: int = 64,
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = call_metadata(metadata, api_key)
        way = connection_of(
            target,
            max_message_mb=max_message_mb,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        self._channel = self._open(way)
        self._stubs: dict[str, Any] = {
            EMBEDDER: embedder_pb2_grpc.EmbedderStub(self._channel),
            HEALTH: health_pb2_grpc.HealthStub(self._channel),
        }

    def _open(self, way: Connection) -> Any:
        """The channel to the server (grpc's or grpc.aio's)."""
        raise NotImplementedError

    def _bind(self, build: Callable[P, Unary[T]]) -> Callable[P, Any]:
        """The method that makes ``build``'s call and sends it."""
        raise NotImplementedError

    def _stream(self, call: Stream) -> Any:
        """The EmbedStream of ``call``, as a generator of the batches' vectors."""
        raise NotImplementedError

    def _rpc(self, call: Unary[Any]) -> Any:
        """The stub's multi-callable of a call's RPC."""
        return getattr(self._stubs[call.service], call.method)

    def _open_stream(self, requests: Any, call: Stream) -> Any:
        """The EmbedStream call sending ``requests`` (an iterator, or an async iterator)."""
        return self._stubs[EMBEDDER].EmbedStream(
            requests, timeout=call.timeout, metadata=self._metadata
        )

    embed = Method(_calls.embed)
    embed_with_usage = Method(_calls.embed_with_usage)
    embed_compact = Method(_calls.embed_compact)
    embed_tokens = Method(_calls.embed_tokens)
    embed_stream = StreamMethod(_calls.embed_stream)
    rerank = Method(_calls.rerank)
    classify = Method(_calls.classify)
    embed_sparse = Method(_calls.embed_sparse)
    tokenize = Method(_calls.tokenize)
    models = Method(_calls.models)
    get_model = Method(_calls.get_model)
    health = Method(_calls.health)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"
