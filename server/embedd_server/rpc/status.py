"""The one place where errors become gRPC statuses (and REST error bodies).

:data:`STATUS_TABLE` maps each kind of :class:`EmbeddError` to its gRPC code, HTTP status
and OpenAI error ``type``/``code``; the most specific class listed wins. Every RPC handler
is wrapped by :func:`translate_errors`: an :class:`EmbeddError` becomes its gRPC code and
message; anything else is logged with its traceback and becomes INTERNAL with a
generic message, so internals never leak to callers.

For the REST routes, the handler also attaches the complete HTTP error body as trailing
metadata (:data:`HTTP_ERROR_KEY`); Envoy's Lua filter turns it into the response body, so
OpenAI clients get OpenAI's error JSON, Ollama clients Ollama's, rerank clients Cohere's /
Jina's and TEI clients TEI's. Which one an RPC speaks is its service's declaration in the
protos (``rpc/edge.py``); :data:`BODY_SHAPES` writes each shape.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio

from embedd_server import errors
from embedd_server.errors import EmbeddError, InternalError, shorten
from embedd_server.rpc import edge

log = logging.getLogger(__name__)

HTTP_ERROR_KEY = "x-http-error-body"
RETRY_AFTER_KEY = "retry-after"  # whole seconds; Envoy passes it on as HTTP Retry-After

Request = TypeVar("Request")
Response = TypeVar("Response")
BodyShape = Callable[[EmbeddError], dict[str, Any]]


@dataclass(frozen=True)
class Status:
    """What one kind of error becomes on each protocol."""

    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str
    openai_code: str | None


_INVALID = "invalid_request_error"
Code = grpc.StatusCode

# Kind -> status on every protocol. Subclasses listed here override their base class.
STATUS_TABLE: dict[type[EmbeddError], Status] = {
    errors.EmbeddError: Status(Code.INTERNAL, 500, "server_error", None),
    errors.InvalidInput: Status(Code.INVALID_ARGUMENT, 400, _INVALID, _INVALID),
    errors.InputTooLong: Status(Code.INVALID_ARGUMENT, 400, _INVALID, "context_length_exceeded"),
    errors.ModelNotEmbedding: Status(Code.INVALID_ARGUMENT, 400, _INVALID, "model_not_embedding"),
    errors.ModelNotReranker: Status(Code.INVALID_ARGUMENT, 400, _INVALID, "model_not_reranker"),
    errors.ModelNotClassifier: Status(Code.INVALID_ARGUMENT, 400, _INVALID, "model_not_classifier"),
    errors.ModelNotSparse: Status(Code.INVALID_ARGUMENT, 400, _INVALID, "model_not_sparse"),
    errors.ModelNotFound: Status(Code.NOT_FOUND, 404, _INVALID, "model_not_found"),
    errors.NotFound: Status(Code.NOT_FOUND, 404, _INVALID, "not_found"),
    errors.NotImplementedFeature: Status(
        Code.UNIMPLEMENTED, 501, "not_implemented_error", "not_implemented_error"
    ),
    errors.Overloaded: Status(
        Code.RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded", "rate_limit_exceeded"
    ),
    errors.RequestTooLarge: Status(Code.RESOURCE_EXHAUSTED, 413, _INVALID, "request_too_large"),
    errors.Unauthenticated: Status(Code.UNAUTHENTICATED, 401, _INVALID, "invalid_api_key"),
    errors.PermissionDenied: Status(Code.PERMISSION_DENIED, 403, _INVALID, "permission_denied"),
    errors.Conflict: Status(Code.FAILED_PRECONDITION, 409, _INVALID, "conflict"),
    errors.Unavailable: Status(Code.UNAVAILABLE, 503, "server_error", "service_unavailable"),
    errors.Cancelled: Status(Code.CANCELLED, 499, "server_error", "cancelled"),
    errors.DeadlineExceeded: Status(Code.DEADLINE_EXCEEDED, 504, "server_error", "timeout"),
    errors.ModelImportError: Status(Code.FAILED_PRECONDITION, 400, _INVALID, "model_import_failed"),
    errors.ModelLoadError: Status(
        Code.FAILED_PRECONDITION, 500, "server_error", "model_load_failed"
    ),
}


def status_of(error: EmbeddError) -> Status:
    """The status of an error: that of the nearest class in its MRO listed in the table."""
    for kind in type(error).__mro__:
        status = STATUS_TABLE.get(kind)
        if status is not None:
            return status
    raise AssertionError("unreachable: EmbeddError is in the table")


def openai_error_body(error: EmbeddError) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": error.message,
            "type": status_of(error).openai_type,
            "param": error.param,
            "code": status_of(error).openai_code,
        }
    }


def ollama_error_body(error: EmbeddError) -> dict[str, Any]:
    """Ollama's error object: {"error": "..."}."""
    return {"error": error.message}


def rerank_error_body(error: EmbeddError) -> dict[str, Any]:
    """The rerank routes' error object: Cohere's ``message`` and Jina's ``detail`` (clients
    of /v1/rerank read one or the other), with the same text."""
    return {"message": error.message, "detail": error.message}


def cohere_error_body(error: EmbeddError) -> dict[str, Any]:
    """Cohere's error object: {"message": "..."}."""
    return {"message": error.message}


def tei_status(error: EmbeddError) -> tuple[int, str]:
    """TEI's HTTP status and ``error_type`` for an error, as TEI's ``From<ErrorType> for
    StatusCode`` maps them: an empty batch or text is ``Empty`` (400), any other invalid
    request ``Validation`` (422: too long, bad dimensions, unknown prompt, bad shapes), a model
    asked for what its task does not do or a failure of the model ``Backend`` (424, TEI's
    "model is not an embedding model"), a full queue ``Overloaded`` (429), a server that does
    not serve ``Unhealthy`` (503). What TEI has no kind for keeps embedd's status (404 for an
    unknown ``model``, 401/403 for keys, 413 for a body over the limit, 499/504 for calls
    cancelled or past their deadline)."""
    for kind, status, name in _TEI_KINDS:
        if isinstance(error, kind):
            return status, name
    status = status_of(error).http_status
    return _TEI_BY_STATUS.get(status, (status, "Backend" if status >= 500 else "Validation"))


# TEI's status and error_type of the kinds it tells apart, most specific first.
_TEI_KINDS: tuple[tuple[type[EmbeddError], int, str], ...] = (
    (errors.EmptyInput, 400, "Empty"),
    (errors.ModelWrongTask, 424, "Backend"),
    (errors.InvalidInput, 422, "Validation"),
)
# ... and of the others, by embedd's HTTP status: internal failures and what an engine cannot
# do are TEI's backend errors.
_TEI_BY_STATUS = {
    429: (429, "Overloaded"),
    503: (503, "Unhealthy"),
    500: (424, "Backend"),
    501: (424, "Backend"),
}


def tei_error_body(error: EmbeddError) -> dict[str, Any]:
    """TEI's error object: {"error": "...", "error_type": "Validation" | "Empty" | ...}."""
    return {"error": error.message, "error_type": tei_status(error)[1]}


# The HTTP status of the shapes whose API has its own (TEI's); the others take the table's.
_HTTP_STATUS_BY_SHAPE: dict[BodyShape, Callable[[EmbeddError], int]] = {
    tei_error_body: lambda error: tei_status(error)[0],
}


def http_status_of(error: EmbeddError, shape: BodyShape) -> int:
    """The HTTP status an error answers with on a route of the given error shape."""
    special = _HTTP_STATUS_BY_SHAPE.get(shape)
    return special(error) if special is not None else status_of(error).http_status


# Each error shape the protos name (rpc/edge.py's shape_names) -> how its body is written.
BODY_SHAPES: dict[str, BodyShape] = {
    "openai": openai_error_body,
    "ollama": ollama_error_body,
    "cohere": cohere_error_body,
    "rerank": rerank_error_body,
    "tei": tei_error_body,
}


def body_shape_for(method: str) -> BodyShape:
    """The REST error body of a full method name (/embedd.v1.Ollama/OllamaEmbed...): the one
    its service declares; OpenAI's for a method no service of ours has."""
    return BODY_SHAPES[edge.shapes_by_method().get(method, "openai")]


def _as_embedd_error(exc: BaseException) -> EmbeddError:
    if isinstance(exc, EmbeddError):
        return exc
    log.error("unexpected error in an RPC", exc_info=exc)
    return InternalError()


def _trailers(error: EmbeddError, shape: BodyShape) -> tuple[tuple[str, str], ...]:
    # gRPC metadata values must be ASCII: non-ASCII text travels \u-escaped in the JSON.
    body = json.dumps(shape(error), ensure_ascii=True, separators=(",", ":"))
    trailers = [(HTTP_ERROR_KEY, body), ("x-http-status", str(http_status_of(error, shape)))]
    if error.retry_after_s is not None:
        trailers.append((RETRY_AFTER_KEY, str(max(1, math.ceil(error.retry_after_s)))))
    return tuple(trailers)


# Envoy refuses oversized trailers (and then resets other calls on the connection too).
_MAX_MESSAGE_CHARS = 1_000


def _shortened(error: EmbeddError) -> EmbeddError:
    """The error with its message cut to a size any proxy passes."""
    error.message = shorten(error.message, _MAX_MESSAGE_CHARS + len("..."))
    return error


async def abort(
    context: aio.ServicerContext[Any, Any], exc: BaseException, shape: BodyShape
) -> None:
    """Ends the RPC with the error's status, message and REST body (never returns)."""
    error = _shortened(_as_embedd_error(exc))
    await context.abort(
        status_of(error).grpc_code, error.message, trailing_metadata=_trailers(error, shape)
    )


UnaryHandler = Callable[[Request, aio.ServicerContext[Any, Any]], Awaitable[Response]]
StreamHandler = Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Response]]


def translate_errors(
    handler: UnaryHandler[Request, Response], shape: BodyShape
) -> UnaryHandler[Request, Response]:
    """A unary handler whose every failure becomes a proper status (and a body of ``shape``)."""

    @functools.wraps(handler)
    async def wrapper(request: Request, context: aio.ServicerContext[Any, Any]) -> Response:
        try:
            return await handler(request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            failure: BaseException = exc
        await abort(context, failure, shape)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def translate_stream_errors(
    handler: StreamHandler[Response], shape: BodyShape
) -> StreamHandler[Response]:
    """Like translate_errors, for a streaming handler (an async generator)."""

    @functools.wraps(handler)
    async def wrapper(
        requests: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Response]:
        try:
            async for response in handler(requests, context):
                yield response
            return
        except aio.AbortError:
            raise
        except Exception as exc:
            failure: BaseException = exc
        await abort(context, failure, shape)

    return wrapper
