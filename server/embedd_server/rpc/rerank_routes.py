"""The ``embedd.v1.Rerank`` API: Jina's / Cohere's ``/v1/rerank`` and ``/v2/rerank``
(``CreateRerank``), errors in both clients' shape (``message`` and ``detail``).

The handler translates the request into the core's RerankParams and the outcome back into the
APIs' response shape; every rule about documents, scores and models lives in the core. The
native ``Rerank`` is task_routes', TEI's ``/rerank`` tei_routes'.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.reranking import RerankParams
from embedd_server.errors import InvalidInput
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.task_routes import rerank_usage

DOCUMENT_SHAPES = 'each document must be a string or an object with a "text" string'


async def create_rerank(
    backend: Backend, request: pb.CreateRerankRequest, context: Context
) -> pb.CreateRerankResponse:
    """Rerank.CreateRerank (POST /v1/rerank, POST /v2/rerank)."""
    params = RerankParams(
        model=request.model,
        query=request.query,
        documents=rest_documents(request.documents),
        top_n=request.top_n if request.HasField("top_n") else None,
        return_documents=request.return_documents,
        raw_scores=request.raw_scores,
    )
    outcome = await backend.service.rerank(params, deadline_of(context))
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
        usage=rerank_usage(outcome),
        meta=pb.RerankMeta(
            api_version=pb.RerankApiVersion(version="2"),
            billed_units=pb.RerankBilledUnits(search_units=1),
        ),
    )


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


SERVICE = pb.DESCRIPTOR.services_by_name["Rerank"]
HANDLERS: Handlers = {
    "CreateRerank": create_rerank,
}
