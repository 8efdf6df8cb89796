"""The rerank RPCs: native ``Rerank``, Jina's / Cohere's ``/v1/rerank`` and ``/v2/rerank``
(``CreateRerank``), and TEI's ``/rerank`` (``TeiRerank``).

Each translates its request into the core's RerankParams and the outcome back into its API's
response shape; every rule about documents, scores and models lives in the core.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.reranking import RerankOutcome, RerankParams
from embedd_server.core.service import EmbeddingService
from embedd_server.errors import InvalidInput
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.status import rerank_error_body, tei_error_body, translate_errors
from embedd_server.rpc.truncation import native_truncation

DOCUMENT_SHAPES = 'each document must be a string or an object with a "text" string'


class RerankRoutes:
    """The rerank RPCs of embedd.v1.Embedder (mixed into its servicer)."""

    def __init__(self, service: EmbeddingService) -> None:
        self._rerank_service = service

    @translate_errors()
    async def Rerank(self, request: pb.RerankRequest, context: Context) -> pb.RerankResponse:
        params = RerankParams(
            model=request.model,
            query=request.query,
            documents=list(request.documents),
            top_n=request.top_n if request.HasField("top_n") else None,
            return_documents=request.return_documents,
            raw_scores=request.raw_scores,
            truncate=native_truncation(request.truncation)[0],
        )
        outcome = await self._rerank_service.rerank(params, deadline_of(context))
        return pb.RerankResponse(
            model=outcome.model,
            results=[
                pb.RerankResult(index=r.index, relevance_score=r.score, document=r.document or "")
                for r in outcome.results
            ],
            usage=_usage(outcome),
            request_id=request.request_id,
        )

    @translate_errors(rerank_error_body)
    async def CreateRerank(
        self, request: pb.CreateRerankRequest, context: Context
    ) -> pb.CreateRerankResponse:
        params = RerankParams(
            model=request.model,
            query=request.query,
            documents=rest_documents(request.documents),
            top_n=request.top_n if request.HasField("top_n") else None,
            return_documents=request.return_documents,
            raw_scores=request.raw_scores,
        )
        outcome = await self._rerank_service.rerank(params, deadline_of(context))
        return pb.CreateRerankResponse(
            id=str(uuid.uuid4()),
            model=outcome.model,
            results=[
                pb.CreateRerankResult(
                    index=r.index,
                    relevance_score=r.score,
                    document=None if r.document is None else pb.RerankDocument(text=r.document),
                )
                for r in outcome.results
            ],
            usage=_usage(outcome),
            meta=pb.RerankMeta(
                api_version=pb.RerankApiVersion(version="2"),
                billed_units=pb.RerankBilledUnits(search_units=1),
            ),
        )

    @translate_errors(tei_error_body)
    async def TeiRerank(
        self, request: pb.TeiRerankRequest, context: Context
    ) -> struct_pb2.ListValue:
        params = RerankParams(
            model=request.model,
            query=request.query,
            documents=list(request.texts),
            return_documents=request.return_text,
            raw_scores=request.raw_scores,
            truncate=request.truncate if request.HasField("truncate") else True,
        )
        outcome = await self._rerank_service.rerank(params, deadline_of(context))
        results = struct_pb2.ListValue()
        for r in outcome.results:
            item = results.add_struct()
            item.update({"index": r.index, "score": r.score})
            if r.document is not None:
                item["text"] = r.document
        return results


def rest_documents(values: Sequence[struct_pb2.Value]) -> list[str]:
    """Jina's / Cohere's documents: strings or ``{"text": ...}`` objects, as texts."""
    documents: list[str] = []
    for index, value in enumerate(values):
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            documents.append(value.string_value)
            continue
        if kind == "struct_value":
            text = value.struct_value.fields.get("text")
            if text is not None and text.WhichOneof("kind") == "string_value":
                documents.append(text.string_value)
                continue
        raise InvalidInput(
            f"Document {index} is not text: {DOCUMENT_SHAPES}.", param=f"documents[{index}]"
        )
    return documents


def _usage(outcome: RerankOutcome) -> pb.Usage:
    return pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens)
