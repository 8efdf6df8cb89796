"""Requests that protobuf cannot decode become INVALID_ARGUMENT, not a 500.

Envoy hands the server what the JSON said: a path parameter with invalid UTF-8 (``%ff``) or a
``Value`` nested deeper than Python protobuf's recursion limit decodes with a DecodeError,
which grpcio would answer with UNKNOWN (HTTP 500). This interceptor wraps each method's
request deserializer: an undecodable message becomes a marker the handler turns into an
:class:`~embedd_server.core.errors.InvalidInput` with the route's usual error body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from embedd_server.core.errors import InvalidInput
from embedd_server.rpc.interceptors.handlers import (
    Handler,
    WrappingInterceptor,
    behaviour_of,
    same_kind,
)
from embedd_server.rpc.status import abort, body_shape_for


class _Undecodable:
    """Stands for a request message that failed to decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _error(message: _Undecodable) -> InvalidInput:
    return InvalidInput(
        "The request could not be decoded: text must be valid UTF-8 and JSON values nested "
        f"at most ~50 levels deep ({message.reason[:200]})."
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return _Undecodable(str(exc))

    return deserialize


class DecodeGuard(WrappingInterceptor):
    """Turns undecodable requests into INVALID_ARGUMENT (REST 400)."""

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        shape = body_shape_for(details.method)
        deserializer = _tolerant(handler.request_deserializer)
        original = behaviour_of(handler)
        if handler.unary_unary is not None:

            async def checked_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, _Undecodable):
                    await abort(context, _error(request), shape)
                return await original(request, context)

            return same_kind(handler, checked_unary, deserializer)
        if handler.stream_stream is not None:

            async def checked_stream(
                requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                # An async generator function, as grpc.aio expects of a streaming handler.
                async for response in original(_checked(requests), context):
                    yield response

            return same_kind(handler, checked_stream, deserializer)
        return handler


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _error(request)
        yield request
