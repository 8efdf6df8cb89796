"""The client's errors: one exception class per gRPC status a caller may want to handle.

Every method of :class:`embedd.Client` and :class:`embedd.AsyncClient` turns a failed RPC
(:class:`grpc.RpcError`) into an :class:`EmbeddClientError` subclass via
:func:`from_rpc_error`, so callers never need to import grpc to handle failures::

    try:
        client.embed(texts, model="nope")
    except embedd.NotFound as exc:
        print(exc.details)
"""

from __future__ import annotations

import grpc


class EmbeddClientError(Exception):
    """A call to the embedd server failed.

    ``code`` is the gRPC status code and ``details`` the server's message (it says what
    went wrong and usually what to do about it). ``str(error)`` is ``details``.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = self.default_code if code is None else code
        self.details: str = details
        super().__init__(details or self.code.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class InvalidArgument(EmbeddClientError):
    """The request was malformed: empty text, bad ``dimensions``, input too long..."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EmbeddClientError):
    """The model (or another named resource) does not exist on the server."""

    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(EmbeddClientError):
    """The server's queue is full, or a message exceeded the size limit: retry later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EmbeddClientError):
    """The server cannot be reached, is starting or is draining: retryable."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EmbeddClientError):
    """The call's deadline (``timeout``) passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(EmbeddClientError):
    """The server (or a proxy in front of it) rejected the credentials (``api_key``)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class InternalServerError(EmbeddClientError):
    """The server failed unexpectedly, or its answer did not make sense."""

    default_code = grpc.StatusCode.INTERNAL


class Cancelled(EmbeddClientError):
    """The call was cancelled (by the client, or by the server shutting down)."""

    default_code = grpc.StatusCode.CANCELLED


# The one mapping from gRPC status codes to exception classes; other codes give the base class.
_ERROR_CLASSES: dict[grpc.StatusCode, type[EmbeddClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.DATA_LOSS: InternalServerError,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(err: grpc.RpcError) -> EmbeddClientError:
    """The :class:`EmbeddClientError` subclass matching a failed RPC's status code."""
    code_of = getattr(err, "code", None)
    details_of = getattr(err, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _ERROR_CLASSES.get(code, EmbeddClientError)
    return cls(details or code.name, code)


__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "EmbeddClientError",
    "InternalServerError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
