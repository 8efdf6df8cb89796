"""Requests that protobuf cannot decode become INVALID_ARGUMENT, not a 500.

Envoy hands the server what the JSON said: a path parameter with invalid UTF-8 (``%ff``) or a
``Value`` nested deeper than Python protobuf's recursion limit decodes with a DecodeError,
which grpcio would answer with UNKNOWN (HTTP 500). This interceptor wraps each method's
request deserializer: an undecodable message becomes a marker the handler turns into an
:class:`~embedd_server.core.errors.InvalidInput` with the route's usual error body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from embedd_server.core.errors import InvalidInput
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


class DecodeGuard(aio.ServerInterceptor):
    """Turns undecodable requests into INVALID_ARGUMENT (REST 400)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        shape = body_shape_for(handler_call_details.method)
        deserializer = _tolerant(handler.request_deserializer)
        # The stubs type grpc's sync API; these are the aio behaviours.
        if handler.unary_unary is not None:
            unary: Callable[..., Any] = handler.unary_unary

            async def checked_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, _Undecodable):
                    await abort(context, _error(request), shape)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                checked_unary, deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            streaming: Callable[..., Any] = handler.stream_stream

            async def checked_stream(
                requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                # An async generator function, as grpc.aio expects of a streaming handler.
                async for response in streaming(_checked(requests), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                checked_stream, deserializer, handler.response_serializer
            )
        return handler


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _error(request)
        yield request
