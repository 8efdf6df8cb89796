"""Binds each API's handler functions to its gRPC service.

Every API is a module of plain async handlers, ``(backend, request, context) -> response``, and
a ``HANDLERS`` table naming the RPC each one answers; its ``SERVICE`` is the proto service.
Here each handler gets the backend, the error translation of its service's declared error
shape (rpc/edge.py, rpc/status.py) and the service's message (de)serializers, as one generic
handler per service. A service with an RPC that has no handler, or a handler for no RPC,
refuses to start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc import aio

from embedd_server.rpc import (
    cohere_routes,
    edge,
    native_routes,
    ollama_routes,
    openai_routes,
    rerank_routes,
    tei_routes,
)
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.status import BODY_SHAPES, translate_errors, translate_stream_errors

# The API modules, one per service: the native API first.
APIS: tuple[ModuleType, ...] = (
    native_routes,
    openai_routes,
    ollama_routes,
    cohere_routes,
    rerank_routes,
    tei_routes,
)


def bound_handlers(
    service: ServiceDescriptor, handlers: Handlers, backend: Backend
) -> dict[str, Callable[..., Any]]:
    """Each RPC of ``service``: its handler with the backend bound, failures translated."""
    missing = sorted(set(service.methods_by_name) - set(handlers))
    unknown = sorted(set(handlers) - set(service.methods_by_name))
    if missing or unknown:
        raise TypeError(
            f"{service.full_name}: RPCs without a handler {missing}, handlers without an RPC "
            f"{unknown}"
        )
    shape = BODY_SHAPES[edge.shape_of_service(service)]
    bound: dict[str, Callable[..., Any]] = {}
    for method in service.methods:
        handler = functools.partial(handlers[method.name], backend)
        streaming = method.client_streaming or method.server_streaming
        translate = translate_stream_errors if streaming else translate_errors
        bound[method.name] = translate(handler, shape)
    return bound


def _method_handler(
    method: MethodDescriptor, handler: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return kind(
        handler,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def generic_handler(api: ModuleType, backend: Backend) -> grpc.GenericRpcHandler:
    """One API module's service as a gRPC generic handler."""
    service: ServiceDescriptor = api.SERVICE
    bound = bound_handlers(service, api.HANDLERS, backend)
    return grpc.method_handlers_generic_handler(
        service.full_name,
        {name: _method_handler(service.methods_by_name[name], fn) for name, fn in bound.items()},
    )


def add_services(server: aio.Server, backend: Backend, apis: Iterable[ModuleType] = APIS) -> None:
    """Serves every API's service on ``server``."""
    server.add_generic_rpc_handlers(tuple(generic_handler(api, backend) for api in apis))


def service_names(apis: Iterable[ModuleType] = APIS) -> tuple[str, ...]:
    """The full names of the services served (for reflection)."""
    return tuple(api.SERVICE.full_name for api in apis)
