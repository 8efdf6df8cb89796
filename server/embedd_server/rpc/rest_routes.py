"""The REST-shaped RPCs that Envoy's transcoder exposes: OpenAI's and Ollama's embeddings.

They translate OpenAI's / Ollama's request shapes into the core's EmbedParams and the outcome
back into those APIs' exact response shapes. Rules about inputs and vectors stay in the core.
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
from embedd_server.core.service import EmbeddingService, EmbedParams
from embedd_server.core.tokenization import RIGHT
from embedd_server.errors import InputTooLong, InvalidInput, shorten
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.json_fields import optional_bool
from embedd_server.rpc.keep_alive import parse_keep_alive
from embedd_server.rpc.status import ollama_error_body, translate_errors

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


class RestRoutes:
    """The REST-facing RPCs of embedd.v1.Embedder (mixed into its servicer)."""

    def __init__(self, service: EmbeddingService, openai_truncate: bool = False) -> None:
        self._rest_service = service
        self._openai_truncate = openai_truncate

    @translate_errors()
    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: Context
    ) -> pb.CreateEmbeddingsResponse:
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
            dimensions=_dimensions(request),
            # OpenAI fails with context_length_exceeded: the default unless the server's
            # openai_truncate setting or the request's truncate extension says otherwise.
            truncate=_openai_truncate(request, self._openai_truncate),
            truncation_direction=request.truncation_direction or RIGHT,
            truncation_hint='send "truncate": true',
            foreign_ids_hint=TIKTOKEN_HINT,
            prompt_name=request.prompt_name or None,
            prompt=request.prompt if request.HasField("prompt") else None,
            input_type=request.input_type or None,
            output_types=(encoding,) if encoding in OUTPUT_TYPES else (FLOAT,),
        )
        outcome = await self._rest_service.embed(params, deadline_of(context))
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
        rows = vector_messages.with_field(heads, "embedding", values)
        return vector_messages.append_rows(response, "data", rows)

    @translate_errors(ollama_error_body)
    async def OllamaEmbed(
        self, request: pb.OllamaEmbedRequest, context: Context
    ) -> pb.OllamaEmbedResponse:
        texts = ollama_inputs(request.input if request.HasField("input") else None)
        options = request.options if request.HasField("options") else None
        prompt_options = ollama_prompt_options(options)
        keep_alive = (
            parse_keep_alive(request.keep_alive) if request.HasField("keep_alive") else None
        )
        num_ctx = ollama_num_ctx(options)
        if not texts:
            # Ollama answers no input with no vectors once the model is loaded: how its
            # clients preload a model. Its answer has no durations or counts.
            name = await self._rest_service.load_if_needed(request.model, keep_alive)
            return pb.OllamaEmbedResponse(
                model=request.model or name, embeddings=struct_pb2.ListValue()
            )
        params = EmbedParams(
            model=request.model,
            texts=texts,
            dimensions=_dimensions(request),
            truncate=request.truncate if request.HasField("truncate") else True,
            truncation_hint='send "truncate": true (the default)',
            max_tokens=num_ctx,
            max_tokens_param=NUM_CTX,
            keep_alive_s=keep_alive,
            prompt_name=prompt_options.get("prompt_name"),
            prompt=prompt_options.get("prompt"),
            input_type=prompt_options.get("input_type"),
        )
        try:
            outcome = await self._rest_service.embed(params, deadline_of(context))
        except InputTooLong as error:
            raise ollama_too_long(error, num_ctx) from None
        except InvalidInput as error:
            if error.param != NUM_CTX:
                raise
            raise InvalidInput(f"{OLLAMA_NO_ROOM}: {error.message}", param=NUM_CTX) from None
        return pb.OllamaEmbedResponse(
            # Ollama echoes the name as sent (an alias, "x:latest"); '' is our default model.
            model=request.model or outcome.model,
            embeddings=vector_messages.nested_list_value(outcome.vectors),
            total_duration=float(round(outcome.total_seconds * 1e9)),
            load_duration=float(round(outcome.load_seconds * 1e9)),
            prompt_eval_count=outcome.prompt_tokens,
        )


def _openai_truncate(request: pb.CreateEmbeddingsRequest, default: bool) -> bool:
    """The request's ``truncate`` extension (a JSON boolean), else the server's default."""
    given = optional_bool(request.truncate if request.HasField("truncate") else None, "truncate")
    return default if given is None else given


def _dimensions(request: pb.CreateEmbeddingsRequest | pb.OllamaEmbedRequest) -> int | None:
    if not request.HasField("dimensions"):
        return None
    if request.dimensions < 1:
        raise InvalidInput(
            f"dimensions must be at least 1; got {request.dimensions}.", param="dimensions"
        )
    return request.dimensions


def openai_inputs(value: struct_pb2.Value | None) -> tuple[list[str], list[list[int]]]:
    """OpenAI's ``input`` as (texts, token id sequences); exactly one of them is non-empty."""
    kind = None if value is None else value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput("input is missing; " + OPENAI_INPUT_SHAPES + ".", param="input")
    if kind == "string_value":
        return [value.string_value], []  # type: ignore[union-attr]
    if kind != "list_value":
        raise InvalidInput(f"{OPENAI_INPUT_SHAPES}; got {_json_kind(kind)}.", param="input")
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
        f"{OPENAI_INPUT_SHAPES}; got an array of {', '.join(sorted(map(_json_kind, kinds)))}.",
        param="input",
    )


def ollama_inputs(value: struct_pb2.Value | None) -> list[str]:
    """Ollama's ``input``: a string or an array of strings. None, null, "" and [] are no
    input (Ollama then only loads the model)."""
    kind = None if value is None else value.WhichOneof("kind")
    if kind in (None, "null_value"):
        return []
    if kind == "string_value":
        return [value.string_value] if value.string_value else []  # type: ignore[union-attr]
    if kind == "list_value":
        items = value.list_value.values  # type: ignore[union-attr]
        if all(item.WhichOneof("kind") == "string_value" for item in items):
            return [item.string_value for item in items]
    raise InvalidInput(
        f"invalid input type: input must be a string or an array of strings; got "
        f"{_json_kind(kind)}.",
        param="input",
    )


# Ollama's words (its server/routes.go) for an over-long input with truncate false, which
# tools look for ("context length"), and for a num_ctx that leaves no room for any text.
OLLAMA_TOO_LONG = "the input length exceeds the context length"
OLLAMA_NO_ROOM = "input after truncation exceeds maximum context length"
NUM_CTX = "options.num_ctx"


def ollama_num_ctx(options: struct_pb2.Struct | None) -> int | None:
    """``options.num_ctx``: the most tokens an input may have (None: the model's limit). As in
    Ollama, a fraction is cut to an integer and 0 or less means unset; not a number is a 400
    in Ollama's words."""
    if options is None or "num_ctx" not in options.fields:
        return None
    value = options.fields["num_ctx"]
    kind = value.WhichOneof("kind")
    if kind == "null_value":
        return None
    if kind != "number_value" or not math.isfinite(value.number_value):
        raise InvalidInput('option "num_ctx" must be of type integer', param=NUM_CTX)
    number = int(value.number_value)
    return number if number > 0 else None


def ollama_too_long(error: InputTooLong, num_ctx: int | None) -> InputTooLong:
    """An over-long input's error in Ollama's words, then embedd's details."""
    count = f"at least {error.tokens}" if error.at_least else str(error.tokens)
    source = " (options.num_ctx)" if error.limit == num_ctx else ""
    return InputTooLong(
        f"{OLLAMA_TOO_LONG}: input {error.index} has {count} tokens, more than the context "
        f'length of {error.limit}{source}; shorten it, or send "truncate": true (the default) '
        "to cut it to the context length.",
        param=error.param,
        index=error.index,
        tokens=error.tokens,
        limit=error.limit,
        at_least=error.at_least,
    )


PROMPT_OPTIONS = ("prompt_name", "prompt", "input_type")


def ollama_prompt_options(options: struct_pb2.Struct | None) -> dict[str, str]:
    """The prompt fields of Ollama's ``options`` (strings); other options are ignored."""
    found: dict[str, str] = {}
    if options is None:
        return found
    for key in PROMPT_OPTIONS:
        if key not in options.fields:
            continue
        value = options.fields[key]
        kind = value.WhichOneof("kind")
        if kind == "null_value":
            continue
        if kind != "string_value":
            raise InvalidInput(
                f"options.{key} must be a string; got {_json_kind(kind)}.", param=f"options.{key}"
            )
        found[key] = value.string_value
    return found


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


def _json_kind(kind: str | None) -> str:
    """A Value's kind in JSON words; an unset Value (no kind) reads as null."""
    return {
        "null_value": "null",
        "number_value": "a number",
        "string_value": "a string",
        "bool_value": "a boolean",
        "struct_value": "an object",
        "list_value": "an array",
    }.get(kind or "null_value", str(kind))


def _base64_value(vectors: FloatMatrix) -> list[struct_pb2.Value]:
    little_endian = vectors.astype("<f4", copy=False)
    return [
        struct_pb2.Value(string_value=base64.b64encode(row.tobytes()).decode("ascii"))
        for row in little_endian
    ]
