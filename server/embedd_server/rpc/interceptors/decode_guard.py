"""Requests that protobuf cannot decode become INVALID_ARGUMENT, not a 500; requests larger
than ``--max-request-bytes`` become RESOURCE_EXHAUSTED (REST 413) before they are decoded.

Envoy hands the server what the JSON said: a path parameter with invalid UTF-8 (``%ff``) or a
``Value`` nested deeper than Python protobuf's recursion limit decodes with a DecodeError,
which grpcio would answer with UNKNOWN (HTTP 500). This interceptor wraps each method's
request deserializer: an undecodable message becomes a marker the handler turns into an
:class:`~embedd_server.errors.InvalidInput` with the route's usual error body.

The size check happens on the same bytes, before any decoding: grpcio's own limit
(``max_message_mb``) would answer with a message that names neither the setting nor what to
do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from embedd_server.errors import EmbeddError, InvalidInput, RequestTooLarge
from embedd_server.rpc.interceptors.handlers import (
    Handler,
    WrappingInterceptor,
    behaviour_of,
    same_kind,
)
from embedd_server.rpc.status import abort, body_shape_for


class _Refused:
    """Stands for a request message that was not decoded: why, as the caller's error."""

    def __init__(self, error: EmbeddError) -> None:
        self.error = error


def _undecodable(reason: str) -> _Refused:
    return _Refused(
        InvalidInput(
            "The request could not be decoded: text must be valid UTF-8 and JSON values "
            f"nested at most ~50 levels deep ({reason[:200]})."
        )
    )


def too_large(size: int, limit: int) -> RequestTooLarge:
    """The error for a request message of ``size`` bytes over the server's ``limit``."""
    return RequestTooLarge(
        f"The request is {size} bytes, more than this server's limit of {limit} bytes "
        "(its --max-request-bytes setting); send fewer or shorter inputs per request (each "
        "message of an EmbedStream counts alone)."
    )


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, limit: int
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return _Refused(too_large(len(data), limit))
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return _undecodable(str(exc))

    return deserialize


class DecodeGuard(WrappingInterceptor):
    """Turns undecodable requests into INVALID_ARGUMENT (REST 400), and request messages over
    ``max_request_bytes`` into RESOURCE_EXHAUSTED (REST 413)."""

    def __init__(self, max_request_bytes: int) -> None:
        self._limit = max_request_bytes

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        shape = body_shape_for(details.method)
        deserializer = _tolerant(handler.request_deserializer, self._limit)
        original = behaviour_of(handler)
        if handler.unary_unary is not None:

            async def checked_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, _Refused):
                    await abort(context, request.error, shape)
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
        if isinstance(request, _Refused):
            raise request.error
        yield request
