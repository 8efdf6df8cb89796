"""The asyncio client of an embedd server: :class:`AsyncClient`, the API of
:class:`embedd.Client` with ``async def`` methods."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType

import grpc
from grpc import aio
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
    check_text,
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


class AsyncClient:
    """A non-blocking client of an embedd server, for asyncio.

    The arguments are those of :class:`embedd.Client`. Create it inside a running event
    loop, and close it with ``await client.close()`` or ``async with``::

        async with AsyncClient("127.0.0.1:50051") as client:
            vectors = await client.embed(["hello world", "the cat sat"])
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
            self._channel = aio.insecure_channel(way.target, options=way.options)
        else:
            self._channel = aio.secure_channel(way.target, way.credentials, options=way.options)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> FloatMatrix:
        """Embeds texts: an (n, d) float32 matrix, one row per text (see Client.embed)."""
        result = await self.embed_with_usage(
            texts, model=model, dimensions=dimensions, normalize=normalize, truncate=truncate
        )
        return result.vectors

    async def embed_with_usage(
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
        return await self._embed(request, len(inputs))

    async def embed_compact(
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
            response = await self._stub.Embed(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return compact_of(response, dtype, len(inputs))

    async def embed_tokens(
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
        return (await self._embed(request, len(ids))).vectors

    async def _embed(self, request: pb.EmbedRequest, count: int) -> EmbedResult:
        with rpc_errors():
            response = await self._stub.Embed(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return embed_result(response, count)

    def embed_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        batch_size: int = 64,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> AsyncGenerator[FloatMatrix, None]:
        """Embeds any number of texts over one EmbedStream: ``async for`` one matrix per batch.

        ``texts`` may be an iterable or an async iterable; it is read lazily, ``batch_size``
        at a time. Otherwise as :meth:`embedd.Client.embed_stream`.
        """
        check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError("embed_stream takes an iterable of texts, not one str")
        state = StreamState(batch_size, EmbedOptions(model, dimensions, normalize, truncate))
        return self._stream(texts, state, timeout)

    async def _stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        state: StreamState,
        timeout: float | None,
    ) -> AsyncGenerator[FloatMatrix, None]:
        requests = (
            _async_stream_requests(texts, state)
            if isinstance(texts, AsyncIterable)
            else stream_requests(texts, state)
        )
        call = self._stub.EmbedStream(requests, timeout=timeout, metadata=self._metadata)
        try:
            try:
                async for response in call:
                    yield state.answer(response)
            except grpc.RpcError as err:
                raise state.failed(err) from err
            state.finish()
        finally:
            call.cancel()  # a no-op once the stream is done; stops it when abandoned

    async def rerank(
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
            response = await self._stub.Rerank(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return rerank_result(response)

    async def classify(
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
            response = await self._stub.Classify(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return classify_result(response)

    async def embed_sparse(
        self, texts: str | Sequence[str], *, model: str = "", prompt_name: str = ""
    ) -> SparseResult:
        """Sparse vectors of the texts with a sparse (SPLADE) encoder: each text's non-zero
        weights by token id. ``model`` "" is the server's first sparse encoder."""
        request = sparse_request(texts, model=model, prompt_name=prompt_name)
        with rpc_errors():
            response = await self._stub.EmbedSparse(
                request, timeout=self.timeout, metadata=self._metadata
            )
        return sparse_result(response)

    async def tokenize(self, text: str, *, model: str = "") -> TokenizeResult:
        """The token ids and token strings of a text with the model's tokenizer."""
        with rpc_errors():
            response = await self._stub.Tokenize(
                pb.TokenizeRequest(model=model, text=text),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        return tokenize_result(response)

    async def models(self) -> list[ModelInfo]:
        """The server's model catalogue (loaded or not)."""
        with rpc_errors():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        return [model_info(model) for model in response.data]

    async def get_model(self, name: str) -> ModelInfo:
        """One model of the catalogue; :class:`embedd.NotFound` when there is none."""
        with rpc_errors():
            response = await self._stub.GetModel(
                pb.GetModelRequest(model=name), timeout=self.timeout, metadata=self._metadata
            )
        return model_info(response)

    async def health(self) -> bool:
        """Whether the server reports SERVING; an unreachable server gives False."""
        try:
            with rpc_errors():
                response = await self._health.Check(
                    health_request(), timeout=self.timeout, metadata=self._metadata
                )
        except (Unavailable, DeadlineExceeded):
            return False
        return is_serving(response)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"


async def _async_stream_requests(
    texts: AsyncIterable[str], state: StreamState
) -> AsyncIterator[pb.EmbedRequest]:
    """:func:`embedd._convert.stream_requests` for an async iterable of texts."""
    batch: list[str] = []
    index = 0
    try:
        async for text in texts:
            batch.append(check_text(text, index))
            index += 1
            if len(batch) == state.batch_size:
                yield state.request(batch)
                batch = []
    except Exception as exc:
        state.error = exc
    if batch:
        yield state.request(batch)
