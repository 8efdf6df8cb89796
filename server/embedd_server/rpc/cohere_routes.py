"""The ``embedd.v1.Cohere`` API: Cohere's POST /v2/embed, texts in, several vector types at
once from one forward pass."""

from __future__ import annotations

import base64
import uuid

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.quantization import FLOAT, OUTPUT_TYPES
from embedd_server.core.service import EmbedParams
from embedd_server.core.tokenization import LEFT, RIGHT
from embedd_server.errors import InvalidInput, shorten
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.json_fields import string_list

BASE64 = "base64"  # little-endian float32, base64: computed from the float vectors
EMBEDDING_TYPES = (*OUTPUT_TYPES, BASE64)
# Cohere's truncate -> (truncate at all, direction). START drops the start: keeps the end.
TRUNCATE_MODES = {"NONE": (False, RIGHT), "START": (True, LEFT), "END": (True, RIGHT)}
API_VERSION = "2"


def _embedding_types(request: pb.CohereEmbedRequest) -> list[str]:
    types = list(dict.fromkeys(request.embedding_types)) or [FLOAT]
    for kind in types:
        if kind not in EMBEDDING_TYPES:
            raise InvalidInput(
                f"embedding_types may hold {', '.join(EMBEDDING_TYPES)}; got '{shorten(kind)}'.",
                param="embedding_types",
            )
    return types


def _truncation(request: pb.CohereEmbedRequest) -> tuple[bool, str]:
    mode = (request.truncate or "END").upper()
    if mode not in TRUNCATE_MODES:
        raise InvalidInput(
            f"truncate must be NONE, START or END; got '{shorten(request.truncate)}'.",
            param="truncate",
        )
    return TRUNCATE_MODES[mode]


def _refuse_non_text(request: pb.CohereEmbedRequest) -> None:
    for name in ("images", "inputs"):
        value: struct_pb2.Value = getattr(request, name)
        kind = value.WhichOneof("kind") if request.HasField(name) else None
        if kind is None or kind == "null_value":
            continue
        if kind == "list_value" and not value.list_value.values:
            continue
        raise InvalidInput(
            f"embedd embeds text only: send the texts in 'texts', not '{name}'.", param=name
        )


def _base64_rows(vectors: FloatMatrix) -> struct_pb2.ListValue:
    rows = vectors.astype("<f4", copy=False)
    return struct_pb2.ListValue(
        values=[
            struct_pb2.Value(string_value=base64.b64encode(row.tobytes()).decode("ascii"))
            for row in rows
        ]
    )


async def cohere_embed(
    backend: Backend, request: pb.CohereEmbedRequest, context: Context
) -> pb.CohereEmbedResponse:
    """Cohere.CohereEmbed (POST /v2/embed)."""
    _refuse_non_text(request)
    texts = string_list(request.texts if request.HasField("texts") else None, "texts")
    if not texts:
        raise InvalidInput("texts is missing or empty; give at least one text.", param="texts")
    types = _embedding_types(request)
    truncate, direction = _truncation(request)
    if request.HasField("output_dimension") and request.output_dimension < 1:
        raise InvalidInput(
            f"output_dimension must be at least 1; got {request.output_dimension}.",
            param="output_dimension",
        )
    params = EmbedParams(
        model=request.model,
        texts=texts,
        dimensions=request.output_dimension if request.HasField("output_dimension") else None,
        truncate=truncate,
        truncation_direction=direction,
        truncation_hint='send "truncate": "END" or "START"',
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        input_type=request.input_type or None,
        output_types=tuple(kind for kind in types if kind != BASE64) or (FLOAT,),
    )
    outcome = await backend.service.embed(params, deadline_of(context))
    embeddings = pb.CohereEmbeddings()
    for kind in types:
        if kind == FLOAT:
            rows = vector_messages.nested_list_value(outcome.vectors)
        elif kind == BASE64:
            rows = _base64_rows(outcome.vectors)
        else:
            rows = vector_messages.nested_integer_list_value(outcome.compact[kind])
        getattr(embeddings, kind).CopyFrom(rows)
    return pb.CohereEmbedResponse(
        id=str(uuid.uuid4()),
        response_type="embeddings_by_type",
        embeddings=embeddings,
        texts=texts,
        meta=pb.CohereMeta(
            api_version=pb.CohereApiVersion(version=API_VERSION),
            billed_units=pb.CohereBilledUnits(input_tokens=float(outcome.prompt_tokens)),
        ),
    )


SERVICE = pb.DESCRIPTOR.services_by_name["Cohere"]
HANDLERS: Handlers = {
    "CohereEmbed": cohere_embed,
}
