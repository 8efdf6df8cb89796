"""The asyncio client of an embedd server: :class:`AsyncClient`, the API of
:class:`embedd.Client` with ``async def`` methods."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from grpc import aio

from embedd._base import BaseClient
from embedd._calls import Stream, Unary
from embedd._convert import (
    Connection,
    FloatMatrix,
    async_stream_requests,
    rpc_errors,
    stream_requests,
)
from embedd.errors import EmbeddClientError

T = TypeVar("T")
P = ParamSpec("P")


class AsyncClient(BaseClient):
    """A non-blocking client of an embedd server, for asyncio.

    The arguments and the methods are those of :class:`embedd.Client`; each method is a
    coroutine function, and ``embed_stream`` an async generator that also reads an async
    iterable of texts. Create it inside a running event loop, and close it with
    ``await client.close()`` or ``async with``::

        async with AsyncClient("127.0.0.1:50051") as client:
            vectors = await client.embed(["hello world", "the cat sat"])
    """

    _channel: aio.Channel

    def _open(self, way: Connection) -> aio.Channel:
        if way.credentials is None:
            return aio.insecure_channel(way.target, options=way.options)
        return aio.secure_channel(way.target, way.credentials, options=way.options)

    def _bind(self, build: Callable[P, Unary[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self._send(build(*args, **kwargs))

        return method

    async def _send(self, call: Unary[T]) -> T:
        try:
            with rpc_errors():
                response = await self._rpc(call)(
                    call.request, timeout=self.timeout, metadata=self._metadata
                )
        except EmbeddClientError as error:
            return call.failed(error)
        return call.answer(response)

    async def _stream(self, call: Stream) -> AsyncGenerator[FloatMatrix, None]:
        state = call.state
        texts = call.texts
        requests = (
            async_stream_requests(texts, state)
            if isinstance(texts, AsyncIterable)
            else stream_requests(texts, state)
        )
        stream = self._open_stream(requests, call)
        with state.answering(stream):
            async for response in stream:
                yield state.answer(response)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
