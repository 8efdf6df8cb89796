"""Every method of :class:`embedd.Client` and :class:`embedd.AsyncClient`, written once: each
checks its arguments and builds its call (the request message, and how the answer becomes the
value returned) with the conversions of :mod:`embedd._convert`; how a call is sent is each
client's own (:mod:`embedd._calls`)."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, Unpack

from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedd._calls import EMBEDDER, HEALTH, AnyTexts, Method, Stream, StreamMethod, Unary
from embedd._convert import (
    DEFAULT_TARGET,
    ByteMatrix,
    ChannelOptions,
    ClassifyResult,
    Connection,
    EmbedOptions,
    EmbedResult,
    FloatMatrix,
    ModelInfo,
    RerankResult,
    SparseResult,
    StreamState,
    Texts,
    TokenizeResult,
    as_texts,
    as_token_ids,
    call_metadata,
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
from embedd._convert import connection as connection_of
from embedd.errors import DeadlineExceeded, EmbeddClientError, Unavailable
from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc

T = TypeVar("T")
P = ParamSpec("P")


class BaseClient(ABC):
    """What :class:`embedd.Client` and :class:`embedd.AsyncClient` share: the constructor and
    the methods. The arguments are documented on :class:`embedd.Client`; those of the
    channel (``max_message_mb``, ``tls``, ``tls_*``) are :class:`ChannelOptions`, declared
    once for the clients and :func:`embedd._convert.connection`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        **channel: Unpack[ChannelOptions],
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = call_metadata(metadata, api_key)
        way = connection_of(target, **channel)
        self._channel = self._open(way)
        self._stubs: dict[str, Any] = {
            EMBEDDER: embedder_pb2_grpc.EmbedderStub(self._channel),
            HEALTH: health_pb2_grpc.HealthStub(self._channel),
        }

    # --- what each client does its own way ------------------------------------------------

    @abstractmethod
    def _open(self, way: Connection) -> Any:
        """The channel to the server (grpc's or grpc.aio's)."""

    @abstractmethod
    def _bind(self, call: Callable[P, Unary[T]]) -> Callable[P, Any]:
        """The method that sends the call ``call`` builds: blocking, or as a coroutine."""

    @abstractmethod
    def _stream(self, call: Stream) -> Any:
        """The EmbedStream of ``call``: a generator of the batches' vectors, or an async one."""

    def _rpc(self, call: Unary[Any]) -> Any:
        """The stub's multi-callable of a call's RPC."""
        return getattr(self._stubs[call.service], call.method)

    def _open_stream(self, requests: Any, call: Stream) -> Any:
        """The EmbedStream call sending ``requests`` (an iterator, or an async iterator)."""
        return self._stubs[EMBEDDER].EmbedStream(
            requests, timeout=call.timeout, metadata=self._metadata
        )

    # --- the methods --------------------------------------------------------------------------

    @Method
    def embed_with_usage(
        self,
        texts: Texts,
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

    embed = embed_with_usage.answered(
        lambda result: result.vectors,
        """Embeds texts: an (n, d) float32 matrix, one row per text in order.

        A single str is one text (shape (1, d)). ``model`` "" is the server's default;
        ``dimensions`` keeps the first N components (re-normalized when ``normalize``);
        ``truncate=False`` makes a text longer than the model's limit an error instead of
        being cut.
        """,
    )

    @Method
    def embed_compact(
        self,
        texts: Texts,
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
        answer = functools.partial(compact_of, dtype=dtype, expected=len(inputs))
        return Unary("Embed", request, answer)

    @Method
    def embed_tokens(
        self,
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

    @StreamMethod
    def embed_stream(
        self,
        texts: AnyTexts,
        *,
        batch_size: int = 64,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Stream:
        """Embeds any number of texts over one EmbedStream: one matrix per batch, in order.

        Texts are pulled from the iterable (with :class:`embedd.AsyncClient`, an iterable or
        an async iterable) lazily, ``batch_size`` at a time (a generator of millions is never
        materialized; the server's flow control paces the reading). Each batch is one request
        whose ``request_id`` is its number, and each answer is checked against it. The
        stream's deadline is ``timeout`` (default: none), not the client's, since a stream
        lasts as long as its input. If the iterable raises, the batches read before are still
        yielded, then its exception is raised. Stopping the iteration early cancels the
        stream.
        """
        check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError("embed_stream takes an iterable of texts, not one str")
        options = EmbedOptions(model, dimensions, normalize, truncate)
        return Stream(texts, StreamState(batch_size, options), timeout)

    @Method
    def rerank(
        self,
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

    @Method
    def classify(
        self,
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

    @Method
    def embed_sparse(
        self, texts: Texts, *, model: str = "", prompt_name: str = ""
    ) -> Unary[SparseResult]:
        """Sparse vectors of the texts with a sparse (SPLADE) encoder: each text's non-zero
        weights by token id. ``model`` "" is the server's first sparse encoder."""
        texts = as_texts(texts)
        request = pb.EmbedSparseRequest(model=model, texts=texts, prompt_name=prompt_name)
        return Unary("EmbedSparse", request, sparse_result)

    @Method
    def tokenize(self, text: str, *, model: str = "") -> Unary[TokenizeResult]:
        """The token ids and token strings of a text with the model's tokenizer."""
        return Unary("Tokenize", pb.TokenizeRequest(model=model, text=text), tokenize_result)

    @Method
    def models(self) -> Unary[list[ModelInfo]]:
        """The server's model catalogue (loaded or not)."""
        return Unary("ListModels", pb.ListModelsRequest(), model_list)

    @Method
    def get_model(self, name: str) -> Unary[ModelInfo]:
        """One model of the catalogue; :class:`embedd.NotFound` when there is none."""
        return Unary("GetModel", pb.GetModelRequest(model=name), model_info)

    @Method
    def health(self) -> Unary[bool]:
        """Whether the server reports SERVING (grpc.health.v1 Check of service "").

        An unreachable server, or one that does not answer within the timeout, gives False.
        """
        request = health_pb2.HealthCheckRequest(service="")  # the whole server
        return Unary("Check", request, is_serving, HEALTH, recover=_unreachable)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


def _unreachable(error: EmbeddClientError) -> bool:
    """A failed health check: False when the server cannot be reached in time."""
    if isinstance(error, Unavailable | DeadlineExceeded):
        return False
    raise error
