"""The native tasks beyond embedding: ``Rerank``, ``Classify`` and ``EmbedSparse`` (RPCs of
``embedd.v1.Embedder``; TEI's /rerank, /predict and /embed_sparse are tei_routes').

Each translates its request into the core's params and the outcome back; every rule about
documents, inputs, labels and scores lives in the core.
"""

from __future__ import annotations

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.classifying import ClassifyInput, ClassifyParams
from embedd_server.core.reranking import RerankOutcome, RerankParams
from embedd_server.core.service import EmbedParams
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.truncation import native_truncation

_NATIVE_TRUNCATE_HINT = "set truncation to TRUNCATION_END or TRUNCATION_START"


async def classify(
    backend: Backend, request: pb.ClassifyRequest, context: Context
) -> pb.ClassifyResponse:
    """Embedder.Classify."""
    truncate, direction = native_truncation(request.truncation)
    params = ClassifyParams(
        model=request.model,
        inputs=[_native_input(item) for item in request.inputs],
        raw_scores=request.raw_scores,
        truncate=truncate,
        truncation_direction=direction,
        truncation_hint=_NATIVE_TRUNCATE_HINT,
    )
    outcome = await backend.service.classify(params, deadline_of(context))
    return pb.ClassifyResponse(
        model=outcome.model,
        results=[
            pb.Classification(
                labels=[pb.LabelScore(label=p.label, score=p.score) for p in predictions]
            )
            for predictions in outcome.predictions
        ],
        usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
        request_id=request.request_id,
    )


async def embed_sparse(
    backend: Backend, request: pb.EmbedSparseRequest, context: Context
) -> pb.EmbedSparseResponse:
    """Embedder.EmbedSparse."""
    truncate, direction = native_truncation(request.truncation)
    params = EmbedParams(
        model=request.model,
        texts=list(request.texts),
        truncate=truncate,
        truncation_direction=direction,
        truncation_hint=_NATIVE_TRUNCATE_HINT,
        prompt_name=request.prompt_name or None,
        prompt=request.prompt if request.HasField("prompt") else None,
    )
    outcome = await backend.service.embed_sparse(params, deadline_of(context))
    return pb.EmbedSparseResponse(
        model=outcome.model,
        vectors=[
            pb.SparseVector(indices=indices.tolist(), values=values.tolist())
            for indices, values in outcome.rows
        ],
        dimensions=outcome.dimensions,
        usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
        request_id=request.request_id,
    )


def _native_input(item: pb.ClassifyInput) -> ClassifyInput:
    if item.HasField("text_pair"):
        return (item.text, item.text_pair)
    return (item.text,)


async def rerank(
    backend: Backend, request: pb.RerankRequest, context: Context
) -> pb.RerankResponse:
    """Embedder.Rerank."""
    params = RerankParams(
        model=request.model,
        query=request.query,
        documents=list(request.documents),
        top_n=request.top_n if request.HasField("top_n") else None,
        return_documents=request.return_documents,
        raw_scores=request.raw_scores,
        truncate=native_truncation(request.truncation)[0],
    )
    outcome = await backend.service.rerank(params, deadline_of(context))
    return pb.RerankResponse(
        model=outcome.model,
        results=[
            pb.RerankResult(index=r.index, relevance_score=r.score, document=r.document or "")
            for r in outcome.results
        ],
        usage=rerank_usage(outcome),
        request_id=request.request_id,
    )


def rerank_usage(outcome: RerankOutcome) -> pb.Usage:
    return pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens)


HANDLERS: Handlers = {
    "Rerank": rerank,
    "Classify": classify,
    "EmbedSparse": embed_sparse,
}
