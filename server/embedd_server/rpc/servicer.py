"""The native ``embedd.v1.Embedder`` RPCs: translate protobuf <-> the core, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.core.quantization import BINARY, FLOAT, INT8, UBINARY, UINT8
from embedd_server.core.service import EmbeddingService, EmbedOutcome, EmbedParams
from embedd_server.errors import EmbeddError, InvalidInput, Unavailable
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.cohere_routes import CohereRoutes
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.model_routes import ModelRoutes
from embedd_server.rpc.ollama_routes import OllamaRoutes
from embedd_server.rpc.rerank_routes import RerankRoutes
from embedd_server.rpc.rest_routes import RestRoutes
from embedd_server.rpc.status import translate_errors, translate_stream_errors
from embedd_server.rpc.task_routes import TaskRoutes
from embedd_server.rpc.tei_routes import TeiRoutes
from embedd_server.rpc.truncation import native_truncation


def params_from_request(request: pb.EmbedRequest) -> EmbedParams:
    """An EmbedRequest as the core's EmbedParams."""
    truncate, direction = native_truncation(request.truncation)
    return EmbedParams(
        model=request.model,
        texts=list(request.texts),
        token_ids=[list(sequence.ids) for sequence in request.token_ids],
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        normalize=request.normalize if request.HasField("normalize") else True,
        truncate=truncate,
        truncation_direction=direction,
        truncation_hint="set truncation to TRUNCATION_END or TRUNCATION_START",
        prompt_name=request.prompt_name or None,
        prompt=request.prompt if request.HasField("prompt") else None,
        output_types=(_output_type(request.output_type),),
    )


_OUTPUT_TYPES: dict[int, str] = {
    pb.OUTPUT_TYPE_FLOAT: FLOAT,
    pb.OUTPUT_TYPE_INT8: INT8,
    pb.OUTPUT_TYPE_UINT8: UINT8,
    pb.OUTPUT_TYPE_BINARY: BINARY,
    pb.OUTPUT_TYPE_UBINARY: UBINARY,
}


def _output_type(value: int) -> str:
    found = _OUTPUT_TYPES.get(value)
    if found is None:
        raise InvalidInput(f"output_type {value} is not a known OutputType.", param="output_type")
    return found


def response_from_outcome(outcome: EmbedOutcome, request_id: str) -> pb.EmbedResponse:
    """The core's EmbedOutcome as an EmbedResponse."""
    [kind] = outcome.compact.keys() or [FLOAT]
    response = pb.EmbedResponse(
        model=outcome.model,
        usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
        request_id=request_id,
    )
    if kind == FLOAT:
        rows = vector_messages.embedding_rows(outcome.vectors)
        return vector_messages.append_rows(response, "embeddings", rows)
    response.embeddings.extend(
        pb.Embedding(index=index, data=row.tobytes())
        for index, row in enumerate(outcome.compact[kind])
    )
    return response


class EmbedderServicer(
    TeiRoutes,
    RestRoutes,
    OllamaRoutes,
    CohereRoutes,
    RerankRoutes,
    TaskRoutes,
    ModelRoutes,
    pb_grpc.EmbedderServicer,
):
    """embedd.v1.Embedder over one EmbeddingService.

    ``serving`` says whether the server serves (the gRPC health service's state), for the
    REST health route; ``openai_truncate`` is /v1/embeddings' default for ``truncate``;
    ``max_answer_bytes`` the largest message the server sends (its max_message_mb).
    """

    def __init__(
        self,
        service: EmbeddingService,
        stream_window: int,
        serving: Callable[[], bool] = lambda: True,
        openai_truncate: bool = False,
        max_answer_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        RestRoutes.__init__(self, service, openai_truncate)
        OllamaRoutes.__init__(self, service)
        CohereRoutes.__init__(self, service)
        RerankRoutes.__init__(self, service)
        TaskRoutes.__init__(self, service)
        ModelRoutes.__init__(self, service)
        TeiRoutes.__init__(self, service, serving, max_answer_bytes)
        self._service = service
        self._stream_window = stream_window
        self._serving = serving

    @translate_errors()
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        outcome = await self._service.embed(params_from_request(request), deadline_of(context))
        return response_from_outcome(outcome, request.request_id)

    @translate_errors()
    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        if not self._serving():
            raise Unavailable(
                "The server is not serving (starting, draining or without workers); retry later."
            )
        return pb.HealthResponse(status="serving")

    @translate_stream_errors
    async def EmbedStream(
        self, requests: AsyncIterator[pb.EmbedRequest], context: Context
    ) -> AsyncIterator[pb.EmbedResponse]:
        # At most `stream_window` batches are read and not yet answered: the reader takes a
        # slot BEFORE reading the next message, so when the window is full nothing more is
        # read and HTTP/2 flow control pushes back on the client.
        slots = asyncio.Semaphore(self._stream_window)
        answers: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()
        reader = asyncio.create_task(
            self._read_stream(requests, slots, answers, deadline_of(context))
        )
        try:
            while (task := await answers.get()) is not None:
                response = await task
                slots.release()
                yield response
        finally:
            reader.cancel()
            _cancel_queued(answers)

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.EmbedRequest],
        slots: asyncio.Semaphore,
        answers: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None],
        deadline: float | None,
    ) -> None:
        iterator = aiter(requests)
        try:
            while True:
                await slots.acquire()
                request = await anext(iterator, None)
                if request is None:
                    break
                answers.put_nowait(asyncio.create_task(self._embed_batch(request, deadline)))
        except Exception as exc:  # reading failed: the answer loop raises it in order
            answers.put_nowait(asyncio.create_task(_raise(exc)))
        answers.put_nowait(None)

    async def _embed_batch(
        self, request: pb.EmbedRequest, deadline: float | None
    ) -> pb.EmbedResponse:
        try:
            outcome = await self._service.embed(params_from_request(request), deadline)
        except EmbeddError as error:
            if request.request_id:
                error.message = f"Batch '{request.request_id}': {error.message}"
            raise
        return response_from_outcome(outcome, request.request_id)

    @translate_errors()
    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        if not request.text:
            raise InvalidInput("text is empty; give the text to tokenize.", param="text")
        outcome = await self._service.tokenize(request.model, request.text)
        return pb.TokenizeResponse(
            model=outcome.model,
            ids=outcome.ids,
            count=len(outcome.ids),
            tokens=outcome.tokens,
            max_input_tokens=outcome.max_input_tokens,
        )


async def _raise(exc: Exception) -> pb.EmbedResponse:
    raise exc


def _cancel_queued(window: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None]) -> None:
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            task = window.get_nowait()
            if task is not None:
                task.cancel()
