"""The synchronous client of an embedd server (``embedd.v1.Embedder`` over gRPC)."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2_grpc

from embedd._convert import (
    DEFAULT_TARGET,
    ByteMatrix,
    ClassifyResult,
    EmbedOptions,
    EmbedResult,
    FloatMatrix,
    ModelInfo,
    PemSource,
    RerankResult,
    SparseResult,
    StreamState,
    TokenizeResult,
    as_texts,
    as_token_ids,
    call_metadata,
    check_batch_size,
    classify_request,
    classify_result,
    compact_of,
    compact_type,
    connection,
    embed_result,
    health_request,
    is_serving,
    model_info,
    rerank_request,
    rerank_result,
    rpc_errors,
    sparse_request,
    sparse_result,
    stream_requests,
    tokenize_result,
)
from embedd.errors import DeadlineExceeded, Unavailable
from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc


class Client:
    """A blocking client of an embedd server.

    ``target`` is ``host:port`` of the gRPC server. ``timeout`` is the deadline in seconds of
    each unary call (None: no deadline); ``metadata`` is sent with every call, and ``api_key``
    adds ``authorization: Bearer <api_key>``. ``max_message_mb`` bounds messages both ways,
    like the server's setting of the same name.

    TLS: a target ``https://host:port``, ``tls=True`` or any ``tls_*`` argument makes the
    channel TLS (plaintext otherwise). ``tls_ca`` is the CA that signed the server's
    certificate (default: grpc's bundle of public CAs); ``tls_cert`` and ``tls_key`` are this
    client's certificate and key for a server that requires one (mutual TLS);
    ``tls_server_name`` checks the server's certificate against another name than the
    target's host. Each is a PEM file's path or its content as bytes. Behind ``embedd run``,
    gRPC over TLS is on Envoy's port (the REST port)::

        Client("https://embedd.example.com:8080", tls_ca="ca.pem")

    Every method raises an :class:`embedd.EmbeddClientError` subclass when the call fails.
    Use it as a context manager, or call :meth:`close`::

        with Client("127.0.0.1:50051") as client:
            vectors = client.embed(["hello world", "the cat sat"])  # (2, d) float32
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        max_message_mb: int = 64,
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = call_metadata(metadata, api_key)
        way = connection(
            target,
            max_message_mb=max_message_mb,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        if way.credentials is None:
            self._channel = grpc.insecure_channel(way.target, options=way.options)
        else:
            self._channel = grpc.secure_channel(way.target, way.credentials, options=way.options)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> FloatMatrix:
        """Embeds texts: an (n, d) float32 matrix, one row per text in order.

        A single str is one text (shape (1, d)). ``model`` "" is the server's default;
        ``dimensions`` keeps the first N components (re-normalized when ``normalize``);
        ``truncate=False`` makes a text longer than the model's limit an error instead of
        being cut.
        """
        return self.embed_with_usage(
            texts, model=model, dimensions=dimensions, normalize=normalize, truncate=truncate
        ).vectors

    def embed_with_usage(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> EmbedResult:
        """Like :meth:`embed`, also telling the model used and the tokens counted."""
        inputs = as_texts(texts)
        request = EmbedOptions(model, dimensions, normalize, truncate).request(texts=inputs)
        return self._embed(request, len(inputs))

    def embed_compact(
        self,
        texts: str | Sequence[str],
        output_type: str,
        *,
        model: str = "",
        dimensions: int | None = None,
        truncate: bool = True,
    ) -> ByteMatrix:
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
        with rpc_errors():
            response = self._stub.Embed(request, timeout=self.timeout, metadata=self._metadata)
        return compact_of(response, dtype, len(inputs))

    def embed_tokens(
        self,
        sequences: Iterable[Iterable[int]],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> FloatMatrix:
        """Embeds pre-tokenized inputs (the model's token ids, special tokens included).

        Each sequence is a list (or numpy array) of ids, e.g. :meth:`tokenize`'s ``ids``.
        """
        ids = as_token_ids(sequences)
        request = EmbedOptions(model, dimensions, normalize, truncate).request(token_ids=ids)
        return self._embed(request, len(ids)).vectors

    def _embed(self, request: pb.EmbedRequest, count: int) -> EmbedResult:
        with rpc_errors():
            response = self._stub.Embed(request, timeout=self.timeout, metadata=self._metadata)
        return embed_result(response, count)

    def embed_stream(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 64,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Generator[FloatMatrix, None, None]:
        """Embeds any number of texts over one EmbedStream: one matrix per batch, in order.

        Texts are pulled from the iterable lazily, ``batch_size`` at a time (a generator of
        millions is never materialized; the server's flow control paces the reading). Each
        batch is one request whose ``request_id`` is its number, and each answer is checked
        against it. The stream's deadline is ``timeout`` (default: none), not the client's,
        since a stream lasts as long as its input. If the iterable raises, the batches read
        before are still yielded, then its exception is raised. Stopping the iteration early
        cancels the stream.
        """
        check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError("embed_stream takes an iterable of texts, not one str")
        state = StreamState(batch_size, EmbedOptions(model, dimensions, normalize, truncate))
        return self._stream(texts, state, timeout)

    def _stream(
        self, texts: Iterable[str], state: StreamState, timeout: float | None
    ) -> Generator[FloatMatrix, None, None]:
        call = self._stub.EmbedStream(
            stream_requests(texts, state), timeout=timeout, metadata=self._metadata
        )
        try:
            try:
                for response in call:
                    yield state.answer(response)
            except grpc.RpcError as err:
                raise state.failed(err) from err
            state.finish()
        finally:
            call.cancel()  # a no-op once the stream is done; stops it when abandoned

    def rerank(
        self,
        query: str,
        documents: str | Sequence[str],
        *,
        model: str = "",
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
    ) -> RerankResult:
        """Ranks documents by relevance to ``query`` with a reranker (cross-encoder) model:
        the best first. ``model`` "" is the server's first reranker; ``top_n`` keeps the best
        N; ``return_documents`` echoes each document's text; ``raw_scores`` gives the logits
        instead of their sigmoid."""
        request = rerank_request(
            query,
            documents,
            model=model,
            top_n=top_n,
            return_documents=return_documents,
            raw_scores=raw_scores,
        )
        with rpc_errors():
            response = self._stub.Rerank(request, timeout=self.timeout, metadata=self._metadata)
        return rerank_result(response)

    def classify(
        self,
        inputs: str | tuple[str, str] | Sequence[str | tuple[str, str]],
        *,
        model: str = "",
        raw_scores: bool = False,
    ) -> ClassifyResult:
        """Every label's score for each input (a text, or a ``(text, text_pair)`` tuple) with
        a sequence classifier, highest first. ``model`` "" is the server's first classifier;
        ``raw_scores`` gives the logits instead of their softmax / sigmoid."""
        request = classify_request(inputs, model=model, raw_scores=raw_scores)
        with rpc_errors():
            response = self._stub.Classify(request, timeout=self.timeout, metadata=self._metadata)
        return classify_result(response)

    def embed_sparse(
        self, texts: str | Sequence[str], *, model: str = "", prompt_name: str = ""
    ) -> SparseResult:
        """Sparse vectors of the texts with a sparse (SPLADE) encoder: each text's non-zero
        weights by token id. ``model`` "" is the server's first sparse encoder."""
        request = sparse_request(texts, model=model, prompt_name=prompt_name)
        with rpc_errors():
            response = self._stub.EmbedSparse(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return sparse_result(response)

    def tokenize(self, text: str, *, model: str = "") -> TokenizeResult:
        """The token ids and token strings of a text with the model's tokenizer."""
        with rpc_errors():
            response = self._stub.Tokenize(
                pb.TokenizeRequest(model=model, text=text),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        return tokenize_result(response)

    def models(self) -> list[ModelInfo]:
        """The server's model catalogue (loaded or not)."""
        with rpc_errors():
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        return [model_info(model) for model in response.data]

    def get_model(self, name: str) -> ModelInfo:
        """One model of the catalogue; :class:`embedd.NotFound` when there is none."""
        with rpc_errors():
            response = self._stub.GetModel(
                pb.GetModelRequest(model=name), timeout=self.timeout, metadata=self._metadata
            )
        return model_info(response)

    def health(self) -> bool:
        """Whether the server reports SERVING (grpc.health.v1 Check of service "").

        An unreachable server, or one that does not answer within the timeout, gives False.
        """
        try:
            with rpc_errors():
                response = self._health.Check(
                    health_request(), timeout=self.timeout, metadata=self._metadata
                )
        except (Unavailable, DeadlineExceeded):
            return False
        return is_serving(response)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"
