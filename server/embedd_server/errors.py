"""The one error hierarchy of embedd.

Every failure a caller can see is an :class:`EmbeddError`. Each subclass carries the
gRPC status code and the OpenAI error ``type``/``code`` it maps to, so transports only
translate (see :mod:`embedd_server.grpc_errors`); nothing matches on exception text.
"""

from __future__ import annotations

import grpc


def shorten(value: object, limit: int = 80) -> str:
    """A caller-supplied value as it may be echoed in a message: at most ``limit`` chars."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EmbeddError(Exception):
    """Base class of every error a caller may see.

    ``message`` is sent to the caller verbatim, so it must say what went wrong and what
    to do, and must never contain secrets or tracebacks.
    """

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    openai_type: str = "server_error"
    openai_code: str | None = None
    retry_after_s: float | None = None  # when set, callers are told to wait this long

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(EmbeddError):
    """The request is malformed: empty input, wrong types, bad ``dimensions``..."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"
    openai_code = "invalid_request_error"


class InputTooLong(InvalidInput):
    """An input has more tokens than the model accepts and truncation is off."""

    openai_code = "context_length_exceeded"


class ModelNotFound(EmbeddError):
    """The requested model is not in the catalogue."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"
    openai_code = "model_not_found"


class ModelNotEmbedding(InvalidInput):
    """The model cannot produce embeddings (e.g. a causal LM without pooling)."""

    openai_code = "model_not_embedding"


class NotImplementedFeature(EmbeddError):
    """Something embedd deliberately does not do (e.g. load a model for text generation)."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501
    openai_type = "not_implemented_error"
    openai_code = "not_implemented_error"


class NotFound(EmbeddError):
    """A resource other than a model does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"
    openai_code = "not_found"


class Overloaded(EmbeddError):
    """The bounded queue is full: retry later."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_exceeded"
    openai_code = "rate_limit_exceeded"


class RateLimited(Overloaded):
    """The caller's rate limit is used up; ``retry_after_s`` says when the next call is due."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(EmbeddError):
    """The call carries no API key, or one the server does not know."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class Unavailable(EmbeddError):
    """The server is starting, draining or a worker failed: retryable."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "server_error"
    openai_code = "service_unavailable"


class Cancelled(EmbeddError):
    """The caller went away or its deadline passed before the work ran."""

    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499
    openai_type = "server_error"
    openai_code = "cancelled"


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work finished."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_code = "timeout"


class ModelImportError(EmbeddError):
    """A Hugging Face directory could not be converted to GGUF (names the file/tensor)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400
    openai_type = "invalid_request_error"
    openai_code = "model_import_failed"


class ModelLoadError(EmbeddError):
    """A GGUF file exists but could not be loaded by the engine."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500
    openai_type = "server_error"
    openai_code = "model_load_failed"


class InternalError(EmbeddError):
    """An unexpected failure. The caller sees only a generic message."""

    GENERIC_MESSAGE = "Internal server error; the details are in the server log."

    def __init__(self, message: str = GENERIC_MESSAGE) -> None:
        super().__init__(message)
