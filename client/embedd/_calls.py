"""How a client method is written once for :class:`embedd.Client` and
:class:`embedd.AsyncClient`, as httpx's and openai-python's sync and async clients share their
request building. A method of :class:`embedd._base.BaseClient` decorated with :class:`Method`
(or :class:`StreamMethod`) takes the arguments, checks them, and returns the call to make: a
:class:`Unary` (the request message, and how the answer becomes the value returned) or a
:class:`Stream`. Each client only says how it sends a call: blocking, or as a coroutine."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Final, Generic, ParamSpec, TypeVar, overload

from google.protobuf.message import Message

from embedd._convert import FloatMatrix, StreamState
from embedd.errors import EmbeddClientError

if TYPE_CHECKING:
    from embedd._base import BaseClient
    from embedd.aio import AsyncClient
    from embedd.client import Client

T = TypeVar("T")
U = TypeVar("U")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])

EMBEDDER: Final = "embedd.v1.Embedder"
HEALTH: Final = "grpc.health.v1.Health"

#: What EmbedStream reads: an iterable of texts (AsyncClient: or an async iterable).
AnyTexts = Iterable[str] | AsyncIterable[str]


@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary call, ready to send: which RPC, with what, and what its answer gives."""

    #: The RPC's name in its service, e.g. "Embed".
    method: str
    request: Message
    #: The response message -> the value the method returns.
    answer: Callable[[Any], T]
    service: str = EMBEDDER
    #: What a failed call gives instead of raising its error; None: the error is raised.
    recover: Callable[[EmbeddClientError], T] | None = None

    def failed(self, error: EmbeddClientError) -> T:
        """The value of a failed call, or its error raised."""
        if self.recover is None:
            raise error
        return self.recover(error)

    def then(self, convert: Callable[[T], U]) -> Unary[U]:
        """This call, with its answer passed through ``convert``."""
        answer, recover = self.answer, self.recover
        return Unary(
            self.method,
            self.request,
            lambda response: convert(answer(response)),
            self.service,
            None if recover is None else lambda error: convert(recover(error)),
        )


@dataclass(frozen=True)
class Stream:
    """One EmbedStream, ready to open: the caller's texts, read lazily batch by batch."""

    texts: AnyTexts
    state: StreamState
    #: The stream's own deadline (a stream lasts as long as its input, not a unary call).
    timeout: float | None


class _Declared:
    """A client method written as a function that builds its call: the method has that
    function's name, docstring and signature (for help() and inspect)."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self.__name__ = self.__qualname__ = build.__name__
        self.__doc__ = build.__doc__
        self.__signature__ = inspect.signature(build)
        # The bound method: no client argument, and no return annotation (the function
        # returns the call; the method, the answer).
        _, *parameters = self.__signature__.parameters.values()
        self._bound_signature = inspect.Signature(parameters)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__, self.__qualname__ = name, f"{owner.__qualname__}.{name}"

    def __call__(self, client: BaseClient, *args: Any, **kwargs: Any) -> Any:
        """The method called through the class: ``Client.embed(client, texts)``."""
        return getattr(client, self.__name__)(*args, **kwargs)

    def _named(self, method: F) -> F:
        """``method``, bound to a client, under this method's name, docstring and signature."""
        method.__name__, method.__qualname__ = self.__name__, self.__qualname__
        method.__doc__ = self.__doc__
        method.__signature__ = self._bound_signature  # type: ignore[attr-defined]
        return method


class Method(_Declared, Generic[P, T]):
    """A unary method: on a :class:`embedd.Client` it sends the call and returns the answer;
    on an :class:`embedd.AsyncClient` it is a coroutine function of the same arguments."""

    def __init__(self, build: Callable[Concatenate[Any, P], Unary[T]]) -> None:
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
        if client is None:
            return self
        build = self.build

        def call(*args: P.args, **kwargs: P.kwargs) -> Unary[T]:
            return build(client, *args, **kwargs)

        return self._named(client._bind(call))

    def answered(self, convert: Callable[[T], U], doc: str) -> Method[P, U]:
        """A method of the same arguments and call whose answer is ``convert`` of this one's."""
        build = self.build

        def converted(client: Any, /, *args: P.args, **kwargs: P.kwargs) -> Unary[U]:
            return build(client, *args, **kwargs).then(convert)

        converted.__signature__ = self.__signature__  # type: ignore[attr-defined]
        converted.__doc__ = doc
        return Method(converted)


class StreamMethod(_Declared, Generic[P]):
    """The EmbedStream method: a generator of the batches' vectors on a
    :class:`embedd.Client`, an async generator on an :class:`embedd.AsyncClient` (which also
    reads an async iterable). The arguments are checked when it is called."""

    def __init__(self, build: Callable[Concatenate[Any, AnyTexts, P], Stream]) -> None:
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
            return client._stream(build(client, texts, *args, **kwargs))

        return self._named(method)
