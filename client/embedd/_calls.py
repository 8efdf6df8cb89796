"""The client's methods, each written once for :class:`embedd.Client` and
:class:`embedd.AsyncClient`: a function per method takes the method's arguments, checks them
and returns the call to make (:class:`Unary` or :class:`Stream`): the request message and how
the answer becomes the value returned. The two clients differ only in how they send a call
(:mod:`embedd._base`), as httpx's and openai-python's sync and async clients share their
request building."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, ParamSpec, TypeVar

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from embedd._convert import (
    ByteMatrix,
    ClassifyResult,
    EmbedOptions,
    EmbedResult,
    FloatMatrix,
    ModelInfo,
    RerankResult,
    SparseResult,
    StreamState,
    TokenizeResult,
    as_texts,
    as_token_ids,
    check_batch_size,
    check_text,
    classify_result,
    compact_of,
    compact_type,
    embed_result,
    is_serving,
    model_info,
    model_list,
    rerank_result,
    sparse_result,
    tokenize_result,
    vectors_of,
)
from embedd.errors import DeadlineExceeded, EmbeddClientError, Unavailable
from embedd.v1 import embedder_pb2 as pb

T = TypeVar("T")
U = TypeVar("U")
P = ParamSpec("P")

EMBEDDER: Final = "embedd.v1.Embedder"
HEALTH: Final = "grpc.health.v1.Health"


@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary call, ready to send: which RPC, with what, and what its answer gives."""

    #: The RPC's name in its service, e.g. "Embed".
    method: str
    request: Message
    #: The response message -> the value the method returns.
    answer: Callable[[Any], T]
    service: str = EMBEDDER
    #: What a failed call gives instead of raising its error; None: the error is raised.
    recover: Callable[[EmbeddClientError], T] | None = None

    def failed(self, error: EmbeddClientError) -> T:
        """The value of a failed call, or its error raised."""
        if self.recover is None:
            raise error
        return self.recover(error)

    def then(self, convert: Callable[[T], U]) -> Unary[U]:
        """This call, with its answer passed through ``convert``."""
        answer, recover = self.answer, self.recover
        return Unary(
            self.method,
            self.request,
            lambda response: convert(answer(response)),
            self.service,
            None if recover is None else lambda error: convert(recover(error)),
        )


@dataclass(frozen=True)
class Stream:
    """One EmbedStream, ready to open: the caller's texts, read lazily batch by batch."""

    texts: Iterable[str] | AsyncIterable[str]
    state: StreamState
    #: The stream's own deadline (a stream lasts as long as its input, not a unary call).
    timeout: float | None


def _answered_with(
    convert: Callable[[T], U], build: Callable[P, Unary[T]], name: str, doc: str
) -> Callable[P, Unary[U]]:
    """A method taking ``build``'s arguments whose answer is ``convert`` of ``build``'s."""

    @functools.wraps(build)
    def method(*args: P.args, **kwargs: P.kwargs) -> Unary[U]:
        return build(*args, **kwargs).then(convert)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


def _vectors(result: EmbedResult) -> FloatMatrix:
    return result.vectors


# --- the methods ------------------------------------------------------------------------------


def embed_with_usage(
    texts: str | Sequence[str],
    *,
    model: str = "",
    dimensions: int | None = None,
    normalize: bool = True,
    truncate: bool = True,
) -> Unary[EmbedResult]:
    """Like :meth:`embed`, also telling the model used and the tokens counted."""
    inputs = as_texts(texts)
    request = EmbedOptions(model, dimensions, normalize, truncate).request(texts=inputs)
    return Unary("Embed", request, functools.partial(embed_result, expected=len(inputs)))


embed = _answered_with(
    _vectors,
    embed_with_usage,
    "embed",
    """Embeds texts: an (n, d) float32 matrix, one row per text in order.

    A single str is one text (shape (1, d)). ``model`` "" is the server's default;
    ``dimensions`` keeps the first N components (re-normalized when ``normalize``);
    ``truncate=False`` makes a text longer than the model's limit an error instead of
    being cut.
    """,
)


def embed_compact(
    texts: str | Sequence[str],
    output_type: str,
    *,
    model: str = "",
    dimensions: int | None = None,
    truncate: bool = True,
) -> Unary[ByteMatrix]:
    """Embeds texts as compact vectors: an (n, bytes) matrix, one row per text in order.

    ``output_type``: ``"int8"`` / ``"uint8"`` (one byte a dimension, ranges calibrated by
    the server on a fixed text set) or ``"binary"`` / ``"ubinary"`` (sign bits, 8
    dimensions a byte; binary = ubinary - 128), as sentence-transformers'
    ``quantize_embeddings``. ``dimensions`` applies before quantizing.
    """
    kind, dtype = compact_type(output_type)
    inputs = as_texts(texts)
    request = EmbedOptions(model, dimensions, True, truncate).request(texts=inputs)
    request.output_type = kind  # type: ignore[assignment]
    return Unary("Embed", request, functools.partial(compact_of, dtype=dtype, expected=len(inputs)))


def embed_tokens(
    sequences: Iterable[Iterable[int]],
    *,
    model: str = "",
    dimensions: int | None = None,
    normalize: bool = True,
    truncate: bool = True,
) -> Unary[FloatMatrix]:
    """Embeds pre-tokenized inputs (the model's token ids, special tokens included).

    Each sequence is a list (or numpy array) of ids, e.g. :meth:`tokenize`'s ``ids``.
    """
    ids = as_token_ids(sequences)
    request = EmbedOptions(model, dimensions, normalize, truncate).request(token_ids=ids)
    return Unary("Embed", request, functools.partial(vectors_of, expected=len(ids)))


def embed_stream(
    texts: Iterable[str] | AsyncIterable[str],
    *,
    batch_size: int = 64,
    model: str = "",
    dimensions: int | None = None,
    normalize: bool = True,
    truncate: bool = True,
    timeout: float | None = None,
) -> Stream:
    """Embeds any number of texts over one EmbedStream: one matrix per batch, in order.

    Texts are pulled from the iterable (with :class:`embedd.AsyncClient`, an iterable or an
    async iterable) lazily, ``batch_size`` at a time (a generator of millions is never
    materialized; the server's flow control paces the reading). Each batch is one request
    whose ``request_id`` is its number, and each answer is checked against it. The stream's
    deadline is ``timeout`` (default: none), not the client's, since a stream lasts as long
    as its input. If the iterable raises, the batches read before are still yielded, then its
    exception is raised. Stopping the iteration early cancels the stream.
    """
    check_batch_size(batch_size)
    if isinstance(texts, str):
        raise TypeError("embed_stream takes an iterable of texts, not one str")
    options = EmbedOptions(model, dimensions, normalize, truncate)
    return Stream(texts, StreamState(batch_size, options), timeout)


def rerank(
    query: str,
    documents: str | Sequence[str],
    *,
    model: str = "",
    top_n: int | None = None,
    return_documents: bool = False,
    raw_scores: bool = False,
) -> Unary[RerankResult]:
    """Ranks documents by relevance to ``query`` with a reranker (cross-encoder) model:
    the best first. ``model`` "" is the server's first reranker; ``top_n`` keeps the best
    N; ``return_documents`` echoes each document's text; ``raw_scores`` gives the logits
    instead of their sigmoid. A single str is one document."""
    if not isinstance(query, str):
        raise TypeError(f"query is a {type(query).__name__}, not a str")
    request = pb.RerankRequest(
        model=model,
        query=query,
        documents=as_texts(documents),
        return_documents=return_documents,
        raw_scores=raw_scores,
    )
    if top_n is not None:
        request.top_n = top_n
    return Unary("Rerank", request, rerank_result)


def classify(
    inputs: str | tuple[str, str] | Sequence[str | tuple[str, str]],
    *,
    model: str = "",
    raw_scores: bool = False,
) -> Unary[ClassifyResult]:
    """Every label's score for each input (a text, or a ``(text, text_pair)`` tuple) with
    a sequence classifier, highest first. ``model`` "" is the server's first classifier;
    ``raw_scores`` gives the logits instead of their softmax / sigmoid."""
    items = [inputs] if isinstance(inputs, str | tuple) else list(inputs)
    request = pb.ClassifyRequest(model=model, raw_scores=raw_scores)
    for index, item in enumerate(items):
        if isinstance(item, str):
            request.inputs.add(text=item)
        elif isinstance(item, tuple) and len(item) == 2:
            request.inputs.add(
                text=check_text(item[0], index), text_pair=check_text(item[1], index)
            )
        else:
            raise TypeError(f"input {index} is a {type(item).__name__}, not a str or a pair")
    return Unary("Classify", request, classify_result)


def embed_sparse(
    texts: str | Sequence[str], *, model: str = "", prompt_name: str = ""
) -> Unary[SparseResult]:
    """Sparse vectors of the texts with a sparse (SPLADE) encoder: each text's non-zero
    weights by token id. ``model`` "" is the server's first sparse encoder."""
    request = pb.EmbedSparseRequest(model=model, texts=as_texts(texts), prompt_name=prompt_name)
    return Unary("EmbedSparse", request, sparse_result)


def tokenize(text: str, *, model: str = "") -> Unary[TokenizeResult]:
    """The token ids and token strings of a text with the model's tokenizer."""
    return Unary("Tokenize", pb.TokenizeRequest(model=model, text=text), tokenize_result)


def models() -> Unary[list[ModelInfo]]:
    """The server's model catalogue (loaded or not)."""
    return Unary("ListModels", pb.ListModelsRequest(), model_list)


def get_model(name: str) -> Unary[ModelInfo]:
    """One model of the catalogue; :class:`embedd.NotFound` when there is none."""
    return Unary("GetModel", pb.GetModelRequest(model=name), model_info)


def health() -> Unary[bool]:
    """Whether the server reports SERVING (grpc.health.v1 Check of service "").

    An unreachable server, or one that does not answer within the timeout, gives False.
    """
    request = health_pb2.HealthCheckRequest(service="")  # the whole server
    return Unary("Check", request, is_serving, HEALTH, recover=_unreachable)


def _unreachable(error: EmbeddClientError) -> bool:
    """A failed health check: False when the server cannot be reached in time."""
    if isinstance(error, Unavailable | DeadlineExceeded):
        return False
    raise error
