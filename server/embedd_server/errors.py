"""The one error hierarchy of embedd.

Every failure a caller can see is an :class:`EmbeddError`; its class says *what* went wrong
(the kind), its message and ``param`` say the details. Which gRPC code, HTTP status and
OpenAI/Ollama fields a kind becomes is the transport's business: one table in
:mod:`embedd_server.rpc.status`. Nothing matches on exception text.
"""

from __future__ import annotations


def shorten(value: object, limit: int = 80) -> str:
    """A caller-supplied value as it may be echoed in a message: at most ``limit`` chars."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EmbeddError(Exception):
    """Base class of every error a caller may see.

    ``message`` is sent to the caller verbatim, so it must say what went wrong and what
    to do, and must never contain secrets or tracebacks.
    """

    retry_after_s: float | None = None  # when set, callers are told to wait this long

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(EmbeddError):
    """The request is malformed: empty input, wrong types, bad ``dimensions``..."""


class EmptyInput(InvalidInput):
    """The request has nothing to work on: no inputs, or an empty text (TEI answers these
    apart from other invalid requests)."""


class InputTooLong(InvalidInput):
    """An input has more tokens than the model accepts and truncation is off.

    ``index``, ``tokens`` and ``limit`` say which input, how many tokens it has (a lower bound
    when ``at_least``) and how many it may have, for routes that word the error their API's
    way."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        index: int = 0,
        tokens: int = 0,
        limit: int = 0,
        at_least: bool = False,
    ) -> None:
        super().__init__(message, param=param)
        self.index = index
        self.tokens = tokens
        self.limit = limit
        self.at_least = at_least


class ModelNotFound(EmbeddError):
    """The requested model is not in the catalogue."""


class ModelWrongTask(InvalidInput):
    """A model was asked for what its task does not do (core/tasks.py names the routes)."""


class ModelNotEmbedding(ModelWrongTask):
    """The model cannot produce embeddings (e.g. a causal LM without pooling, a reranker)."""


class ModelNotReranker(ModelWrongTask):
    """A rerank was asked of a model that is not a cross-encoder."""


class ModelNotClassifier(ModelWrongTask):
    """A classification was asked of a model that is not a sequence classifier."""


class ModelNotSparse(ModelWrongTask):
    """Sparse vectors were asked of a model that is not a sparse (SPLADE) encoder."""


class NotImplementedFeature(EmbeddError):
    """Something embedd deliberately does not do (e.g. load a model for text generation)."""


class NotFound(EmbeddError):
    """A resource other than a model does not exist."""


class Overloaded(EmbeddError):
    """The bounded queue is full: retry later."""


class RateLimited(Overloaded):
    """The caller's rate limit is used up; ``retry_after_s`` says when the next call is due."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(EmbeddError):
    """The request is larger than the server accepts (``--max-request-bytes``)."""


class Unauthenticated(EmbeddError):
    """The call carries no API key, or one the server does not know."""


class PermissionDenied(EmbeddError):
    """The caller is known but may not do this (e.g. model control without an admin key)."""


class Conflict(EmbeddError):
    """The request contradicts the server's state (e.g. a model loaded with other options)."""


class Unavailable(EmbeddError):
    """The server is starting, draining or a worker failed: retryable."""


class Cancelled(EmbeddError):
    """The caller went away or its deadline passed before the work ran."""


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work finished."""


class ModelImportError(EmbeddError):
    """A Hugging Face directory could not be converted to GGUF (names the file/tensor)."""


class ModelLoadError(EmbeddError):
    """A GGUF file exists but could not be loaded by the engine."""


class InternalError(EmbeddError):
    """An unexpected failure. The caller sees only a generic message."""

    GENERIC_MESSAGE = "Internal server error; the details are in the server log."

    def __init__(self, message: str = GENERIC_MESSAGE) -> None:
        super().__init__(message)
