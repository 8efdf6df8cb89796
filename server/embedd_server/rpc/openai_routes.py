"""The ``embedd.v1.OpenAI`` API: OpenAI's POST /v1/embeddings (also POST /embeddings).

The handler translates OpenAI's request shape into the core's EmbedParams and the outcome back
into OpenAI's exact response shape. Rules about inputs and vectors stay in the core; errors
take OpenAI's shape, which the service declares (rpc/services.py applies it).
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.quantization import BINARY, FLOAT, INT8, OUTPUT_TYPES, UBINARY, UINT8
from embedd_server.core.service import EmbedParams
from embedd_server.core.tokenization import RIGHT
from embedd_server.errors import InvalidInput, shorten
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.chunks import chunk_span, requested_chunking
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.json_fields import json_kind, optional_bool, requested_dimensions

log = logging.getLogger(__name__)

OPENAI_INPUT_SHAPES = (
    "input must be a string, an array of strings, an array of token ids or an array of "
    "arrays of token ids"
)
# OpenAI's two, then the compact vectors (arrays of integers; core.quantization says how).
ENCODING_FORMATS = (FLOAT, "base64", INT8, UINT8, BINARY, UBINARY)
# Token ids sent to an OpenAI-shaped route are mostly tiktoken's, for OpenAI's vocabulary.
TIKTOKEN_HINT = (
    "Ids from another tokenizer (e.g. tiktoken's, which LangChain's OpenAIEmbeddings sends by "
    "default) do not fit this model: send the texts instead (OpenAIEmbeddings("
    "check_embedding_ctx_length=False))."
)
_MAX_TOKEN_ID = 2**32 - 1  # token ids are uint32, as in the native TokenIds message


async def create_embeddings(
    backend: Backend, request: pb.CreateEmbeddingsRequest, context: Context
) -> pb.CreateEmbeddingsResponse:
    """OpenAI.CreateEmbeddings (POST /v1/embeddings, POST /embeddings)."""
    encoding = request.encoding_format or FLOAT
    if encoding not in ENCODING_FORMATS:
        raise InvalidInput(
            f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}; got "
            f"'{shorten(encoding)}'.",
            param="encoding_format",
        )
    texts, token_ids = openai_inputs(request.input if request.HasField("input") else None)
    if request.user:
        log.info("embeddings request", extra={"user": request.user})
    params = EmbedParams(
        model=request.model,
        texts=texts,
        token_ids=token_ids,
        dimensions=requested_dimensions(request),
        # OpenAI fails with context_length_exceeded: the default unless the server's
        # openai_truncate setting or the request's truncate extension says otherwise.
        truncate=_openai_truncate(request, backend.openai_truncate),
        truncation_direction=request.truncation_direction or RIGHT,
        truncation_hint='send "truncate": true',
        foreign_ids_hint=TIKTOKEN_HINT,
        prompt_name=request.prompt_name or None,
        prompt=request.prompt if request.HasField("prompt") else None,
        input_type=request.input_type or None,
        output_types=(encoding,) if encoding in OUTPUT_TYPES else (FLOAT,),
        chunking=requested_chunking(request),
    )
    outcome = await backend.service.embed(params, deadline_of(context))
    if encoding == "base64":
        values = [value.SerializeToString() for value in _base64_value(outcome.vectors)]
    elif encoding == FLOAT:
        values = vector_messages.float_value_rows(outcome.vectors)
    else:
        values = vector_messages.integer_value_rows(outcome.compact[encoding])
    response = pb.CreateEmbeddingsResponse(
        object="list",
        model=outcome.model,
        usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
    )
    heads = (pb.OpenAIEmbedding(object="embedding", index=i) for i in range(len(values)))
    if outcome.chunks is not None:  # the chunk extension only where chunks were asked for
        heads = (
            pb.OpenAIEmbedding(object="embedding", index=i, chunk=chunk_span(chunk))
            for i, chunk in enumerate(outcome.chunks)
        )
    rows = vector_messages.with_field(heads, "embedding", values)
    return vector_messages.append_rows(response, "data", rows)


def _openai_truncate(request: pb.CreateEmbeddingsRequest, default: bool) -> bool:
    """The request's ``truncate`` extension (a JSON boolean), else the server's default."""
    given = optional_bool(request.truncate if request.HasField("truncate") else None, "truncate")
    return default if given is None else given


def openai_inputs(value: struct_pb2.Value | None) -> tuple[list[str], list[list[int]]]:
    """OpenAI's ``input`` as (texts, token id sequences); exactly one of them is non-empty."""
    kind = None if value is None else value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput("input is missing; " + OPENAI_INPUT_SHAPES + ".", param="input")
    if kind == "string_value":
        return [value.string_value], []  # type: ignore[union-attr]
    if kind != "list_value":
        raise InvalidInput(f"{OPENAI_INPUT_SHAPES}; got {json_kind(kind)}.", param="input")
    items = value.list_value.values  # type: ignore[union-attr]
    if not items:
        raise InvalidInput("input is an empty array; give at least one input.", param="input")
    kinds = {item.WhichOneof("kind") for item in items}
    if kinds == {"string_value"}:
        return [item.string_value for item in items], []
    if kinds == {"number_value"}:
        return [], [_token_ids(items, "input")]
    if kinds == {"list_value"}:
        return [], [
            _token_ids(item.list_value.values, f"input[{index}]")
            for index, item in enumerate(items)
        ]
    raise InvalidInput(
        f"{OPENAI_INPUT_SHAPES}; got an array of {', '.join(sorted(map(json_kind, kinds)))}.",
        param="input",
    )


def _token_ids(items: Sequence[struct_pb2.Value], param: str) -> list[int]:
    ids = []
    for item in items:
        if item.WhichOneof("kind") != "number_value":
            raise InvalidInput(f"{param} must hold only token ids (integers).", param="input")
        number = item.number_value
        if not (math.isfinite(number) and number.is_integer() and number >= 0):
            raise InvalidInput(
                f"{param} holds {number:g}, not a token id (a non-negative integer).",
                param="input",
            )
        if number > _MAX_TOKEN_ID:  # beyond any vocabulary; int() would print 300 digits
            raise InvalidInput(
                f"{param} holds {number:g}, outside any model's vocabulary.", param="input"
            )
        ids.append(int(number))
    if not ids:
        raise InvalidInput(f"{param} is an empty array of token ids.", param="input")
    return ids


def _base64_value(vectors: FloatMatrix) -> list[struct_pb2.Value]:
    little_endian = vectors.astype("<f4", copy=False)
    return [
        struct_pb2.Value(string_value=base64.b64encode(row.tobytes()).decode("ascii"))
        for row in little_endian
    ]


SERVICE = pb.DESCRIPTOR.services_by_name["OpenAI"]
HANDLERS: Handlers = {
    "CreateEmbeddings": create_embeddings,
}
