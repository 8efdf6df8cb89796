"""The native ``embedd.v1.Embedder`` API: translate protobuf <-> the core, nothing more.

Embed, EmbedStream, Tokenize and Health are here; the model RPCs are model_routes', Rerank,
Classify and EmbedSparse task_routes'. rpc/services.py binds them to the service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.quantization import BINARY, FLOAT, INT8, UBINARY, UINT8
from embedd_server.core.scheduler import BULK, INTERACTIVE
from embedd_server.core.service import EmbedOutcome, EmbedParams
from embedd_server.errors import EmbeddError, InvalidInput, Unavailable
from embedd_server.rpc import model_routes, task_routes
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.chunks import chunk_span, requested_chunking
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.truncation import native_truncation


def params_from_request(request: pb.EmbedRequest, *, stream: bool = False) -> EmbedParams:
    """An EmbedRequest as the core's EmbedParams (``stream``: a batch of EmbedStream, bulk
    unless it or its call names another lane)."""
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
        lane=_LANES[request.lane] if request.lane in _LANES else _unknown_lane(request.lane),
        bulk_by_default=stream,
        chunking=requested_chunking(request),
    )


_LANES: dict[int, str | None] = {
    pb.LANE_UNSPECIFIED: None,
    pb.LANE_INTERACTIVE: INTERACTIVE,
    pb.LANE_BULK: BULK,
}


def _unknown_lane(value: int) -> str:
    raise InvalidInput(f"lane {value} is not a known Lane.", param="lane")


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
        vector_messages.append_rows(response, "embeddings", rows)
    else:
        response.embeddings.extend(
            pb.Embedding(index=index, data=row.tobytes())
            for index, row in enumerate(outcome.compact[kind])
        )
    for embedding, chunk in zip(response.embeddings, outcome.chunks or (), strict=False):
        embedding.chunk.CopyFrom(chunk_span(chunk))
    return response


async def embed(backend: Backend, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
    """Embedder.Embed."""
    outcome = await backend.service.embed(params_from_request(request), deadline_of(context))
    return response_from_outcome(outcome, request.request_id)


async def health(
    backend: Backend, request: pb.HealthRequest, context: Context
) -> pb.HealthResponse:
    """Embedder.Health (GET /health)."""
    if not backend.serving():
        raise Unavailable(
            "The server is not serving (starting, draining or without workers); retry later."
        )
    return pb.HealthResponse(status="serving")


async def embed_stream(
    backend: Backend, requests: AsyncIterator[pb.EmbedRequest], context: Context
) -> AsyncIterator[pb.EmbedResponse]:
    """Embedder.EmbedStream."""
    # At most `stream_window` batches are read and not yet answered: the reader takes a
    # slot BEFORE reading the next message, so when the window is full nothing more is
    # read and HTTP/2 flow control pushes back on the client.
    slots = asyncio.Semaphore(backend.stream_window)
    answers: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()
    reader = asyncio.create_task(
        _read_stream(backend, requests, slots, answers, deadline_of(context))
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
    backend: Backend,
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
            answers.put_nowait(asyncio.create_task(_embed_batch(backend, request, deadline)))
    except Exception as exc:  # reading failed: the answer loop raises it in order
        answers.put_nowait(asyncio.create_task(_raise(exc)))
    answers.put_nowait(None)


async def _embed_batch(
    backend: Backend, request: pb.EmbedRequest, deadline: float | None
) -> pb.EmbedResponse:
    try:
        outcome = await backend.service.embed(params_from_request(request, stream=True), deadline)
    except EmbeddError as error:
        if request.request_id:
            error.message = f"Batch '{request.request_id}': {error.message}"
        raise
    return response_from_outcome(outcome, request.request_id)


async def tokenize(
    backend: Backend, request: pb.TokenizeRequest, context: Context
) -> pb.TokenizeResponse:
    """Embedder.Tokenize."""
    if not request.text:
        raise InvalidInput("text is empty; give the text to tokenize.", param="text")
    outcome = await backend.service.tokenize(request.model, request.text)
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


SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"]
HANDLERS: Handlers = {
    "Embed": embed,
    "EmbedStream": embed_stream,
    "Tokenize": tokenize,
    "Health": health,
    **model_routes.HANDLERS,
    **task_routes.HANDLERS,
}
