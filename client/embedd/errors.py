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

from typing import Any

import grpc

# The one mapping from gRPC status codes to exception classes, filled by the classes
# themselves (their ``codes``); other codes give the base class.
_ERROR_CLASSES: dict[grpc.StatusCode, type[EmbeddClientError]] = {}


class EmbeddClientError(Exception):
    """A call to the embedd server failed.

    ``code`` is the gRPC status code and ``details`` the server's message (it says what
    went wrong and usually what to do about it). ``str(error)`` is ``details``.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init_subclass__(cls, codes: tuple[grpc.StatusCode, ...] = (), **kwargs: Any) -> None:
        """A subclass declares the status codes it stands for (the first is its default);
        :func:`from_rpc_error` maps each to it."""
        super().__init_subclass__(**kwargs)
        if codes:
            cls.default_code = codes[0]
            _ERROR_CLASSES.update(dict.fromkeys(codes, cls))

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = self.default_code if code is None else code
        self.details: str = details
        super().__init__(details or self.code.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class InvalidArgument(EmbeddClientError, codes=(grpc.StatusCode.INVALID_ARGUMENT,)):
    """The request was malformed: empty text, bad ``dimensions``, input too long..."""


class NotFound(EmbeddClientError, codes=(grpc.StatusCode.NOT_FOUND,)):
    """The model (or another named resource) does not exist on the server."""


class ResourceExhausted(EmbeddClientError, codes=(grpc.StatusCode.RESOURCE_EXHAUSTED,)):
    """The server's queue is full, or a message exceeded the size limit: retry later."""


class Unavailable(EmbeddClientError, codes=(grpc.StatusCode.UNAVAILABLE,)):
    """The server cannot be reached, is starting or is draining: retryable."""


class DeadlineExceeded(EmbeddClientError, codes=(grpc.StatusCode.DEADLINE_EXCEEDED,)):
    """The call's deadline (``timeout``) passed before the server answered."""


class Unauthenticated(EmbeddClientError, codes=(grpc.StatusCode.UNAUTHENTICATED,)):
    """The server (or a proxy in front of it) rejected the credentials (``api_key``)."""


class InternalServerError(
    EmbeddClientError, codes=(grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS)
):
    """The server failed unexpectedly, or its answer did not make sense."""


class Cancelled(EmbeddClientError, codes=(grpc.StatusCode.CANCELLED,)):
    """The call was cancelled (by the client, or by the server shutting down)."""


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
