"""What every interceptor here does: find the RPC's handler, then return one of the same kind
that runs the interceptor's own behaviour around it."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from grpc import aio

# grpc's handler type is generic only to type checkers.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behaviour_of(handler: Handler) -> Callable[..., Any]:
    """The handler's coroutine (or async generator) function, whatever its kind."""
    kind, _ = _KINDS[handler.request_streaming, handler.response_streaming]
    behaviour: Callable[..., Any] = getattr(handler, kind)  # the stubs type grpc's sync API
    return behaviour


def same_kind(
    handler: Handler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """A handler of ``handler``'s kind running ``behaviour`` (and, when given, another
    request deserializer)."""
    _, make = _KINDS[handler.request_streaming, handler.response_streaming]
    deserializer = request_deserializer or handler.request_deserializer
    return make(behaviour, deserializer, handler.response_serializer)


class WrappingInterceptor(aio.ServerInterceptor, abc.ABC):
    """An interceptor that wraps each known method's handler (:meth:`wrap`); unknown methods
    pass through (grpcio answers UNIMPLEMENTED)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else self.wrap(handler, handler_call_details)

    @abc.abstractmethod
    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """The handler to run instead of ``handler``."""
