"""The ``embedd.v1.Ollama`` API: Ollama's surface that embedding clients call: /api/embed, the
legacy /api/embeddings, the catalogue (/api/tags, /api/show, /api/ps), /api/pull (for models
that are here), /api/version and the "Ollama is running" root.

Open WebUI, LangChain and the official ``ollama`` client probe these before they embed; the
answers describe embedd's own models in Ollama's shapes, and errors are Ollama's
``{"error": "..."}`` (the service declares it). /api/ps answers as the native ListRunning.
"""

from __future__ import annotations

import math

from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.model_names import tagged_name
from embedd_server.core.service import EmbedParams, ModelStatus
from embedd_server.errors import InputTooLong, InvalidInput, ModelNotFound, shorten
from embedd_server.model.catalog import EMBED, SPARSE
from embedd_server.rpc import model_routes
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.chunks import chunk_objects, requested_chunking
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.json_fields import json_kind, requested_dimensions
from embedd_server.rpc.keep_alive import parse_keep_alive
from embedd_server.rpc.ollama_shapes import ollama_details, rfc3339

# The Ollama release whose API these routes follow (the one docs/benchmarks compares with);
# clients such as Open WebUI read it to decide which routes exist.
OLLAMA_API_VERSION = "0.24.0"
ROOT_TEXT = b"Ollama is running"
# What Ollama's /api/pull streams for a model it has, first and last lines (its PullModel in
# server/images.go), as NDJSON; with "stream": false it answers only the last, as one object.
PULL_SUCCESS = b'{"status":"success"}'
PULL_PROGRESS = b'{"status":"pulling manifest"}\n' + PULL_SUCCESS + b"\n"


async def ollama_embeddings(
    backend: Backend, request: pb.OllamaEmbeddingsRequest, context: Context
) -> pb.OllamaEmbeddingsResponse:
    """Ollama.OllamaEmbeddings (POST /api/embeddings)."""
    keep_alive = parse_keep_alive(request.keep_alive) if request.HasField("keep_alive") else None
    if not request.prompt:
        # Ollama answers an empty prompt with an empty vector (clients use it to load a
        # model): the model must exist, and is loaded, but nothing is embedded.
        await backend.service.load_if_needed(request.model, keep_alive)
        return pb.OllamaEmbeddingsResponse(embedding=struct_pb2.ListValue())
    options = ollama_prompt_options(request.options if request.HasField("options") else None)
    params = EmbedParams(
        model=request.model,
        texts=[request.prompt],
        truncate=True,  # the legacy route has no truncate field; Ollama cuts to the context
        keep_alive_s=keep_alive,
        prompt_name=options.get("prompt_name"),
        prompt=options.get("prompt"),
        input_type=options.get("input_type"),
    )
    outcome = await backend.service.embed(params, deadline_of(context))
    [vector] = vector_messages.nested_list_value(outcome.vectors).values
    return pb.OllamaEmbeddingsResponse(embedding=vector.list_value)


async def ollama_tags(
    backend: Backend, request: pb.OllamaTagsRequest, context: Context
) -> pb.OllamaTagsResponse:
    """Ollama.OllamaTags (GET /api/tags)."""
    # Named as Ollama lists them ("x:latest"); the aliases after the models, each with its
    # model's details (as `ollama cp` lists a copy).
    service = backend.service
    statuses = await service.list_models() + await service.list_aliases()
    return pb.OllamaTagsResponse(
        models=[_tags_entry(status, await service.digest(status.info)) for status in statuses]
    )


async def ollama_pull(
    backend: Backend, request: pb.OllamaPullRequest, context: Context
) -> httpbody_pb2.HttpBody:
    """Ollama.OllamaPull (POST /api/pull)."""
    name = request.model or request.name
    if not name:
        raise InvalidInput("model is required", param="model")
    try:
        await backend.service.get_model(name)
    except ModelNotFound:
        raise ModelNotFound(
            f"model '{shorten(name)}' not found: embedd does not download models. Import "
            "it from a Hugging Face (sentence-transformers) directory into the models "
            f"directory with `embedd import DIR --name NAME`; the models here: "
            f"{await _model_names(backend)}.",
            param="model",
        ) from None
    if request.HasField("stream") and not request.stream:
        return httpbody_pb2.HttpBody(
            content_type="application/json; charset=utf-8", data=PULL_SUCCESS
        )
    return httpbody_pb2.HttpBody(content_type="application/x-ndjson", data=PULL_PROGRESS)


async def _model_names(backend: Backend) -> str:
    service = backend.service
    statuses = await service.list_models() + await service.list_aliases()
    return ", ".join(status.alias or status.info.name for status in statuses) or "none"


async def ollama_show(
    backend: Backend, request: pb.OllamaShowRequest, context: Context
) -> pb.OllamaShowResponse:
    """Ollama.OllamaShow (POST /api/show)."""
    status = await backend.service.get_model(request.model or request.name)
    info = status.info
    model_info = struct_pb2.Struct()
    model_info.update(
        {
            "general.architecture": info.architecture,
            "general.file_type": info.quantization.upper(),
            "general.parameter_count": info.parameters,
            f"{info.architecture}.embedding_length": info.dimensions,
            # What embedd embeds at most (sentence-transformers' max_seq_length when the
            # model has one), which is what a client chunking its texts needs.
            f"{info.architecture}.context_length": info.max_input_tokens,
            f"{info.architecture}.pooling_type": info.pooling,
            # embedd's own: what the model is and what serves it ("" until loaded).
            "embedd.family": info.family,
            "embedd.task": info.task,
            "embedd.engine": status.engine,
        }
    )
    if info.label_names:
        model_info["embedd.labels"] = list(info.label_names)
    return pb.OllamaShowResponse(
        modelfile=f"FROM {info.path.name}\n",
        details=ollama_details(info),
        model_info=model_info,
        capabilities=["embedding"] if info.task in (EMBED, SPARSE) else [],
        modified_at=rfc3339(info.created),
    )


async def ollama_version(
    backend: Backend, request: pb.OllamaVersionRequest, context: Context
) -> pb.OllamaVersionResponse:
    """Ollama.OllamaVersion (GET /api/version)."""
    return pb.OllamaVersionResponse(version=OLLAMA_API_VERSION)


async def ollama_root(
    backend: Backend, request: pb.OllamaRootRequest, context: Context
) -> httpbody_pb2.HttpBody:
    """Ollama.OllamaRoot (GET /, HEAD /)."""
    return httpbody_pb2.HttpBody(content_type="text/plain; charset=utf-8", data=ROOT_TEXT)


def _tags_entry(status: ModelStatus, digest: str) -> pb.OllamaModel:
    """A model (or an alias of one) in /api/tags' shape, with its file's sha256."""
    info = status.info
    name = tagged_name(status.alias or info.name)
    return pb.OllamaModel(
        name=name,
        model=name,
        modified_at=rfc3339(info.created),
        size=float(info.file_size_bytes),
        digest=digest,
        details=ollama_details(info),
    )


async def ollama_embed(
    backend: Backend, request: pb.OllamaEmbedRequest, context: Context
) -> pb.OllamaEmbedResponse:
    """Ollama.OllamaEmbed (POST /api/embed)."""
    texts = ollama_inputs(request.input if request.HasField("input") else None)
    options = request.options if request.HasField("options") else None
    prompt_options = ollama_prompt_options(options)
    keep_alive = parse_keep_alive(request.keep_alive) if request.HasField("keep_alive") else None
    num_ctx = ollama_num_ctx(options)
    if not texts:
        # Ollama answers no input with no vectors once the model is loaded: how its
        # clients preload a model. Its answer has no durations or counts.
        name = await backend.service.load_if_needed(request.model, keep_alive)
        return pb.OllamaEmbedResponse(
            model=request.model or name, embeddings=struct_pb2.ListValue()
        )
    params = EmbedParams(
        model=request.model,
        texts=texts,
        dimensions=requested_dimensions(request),
        truncate=request.truncate if request.HasField("truncate") else True,
        truncation_hint='send "truncate": true (the default)',
        max_tokens=num_ctx,
        max_tokens_param=NUM_CTX,
        keep_alive_s=keep_alive,
        prompt_name=prompt_options.get("prompt_name"),
        prompt=prompt_options.get("prompt"),
        input_type=prompt_options.get("input_type"),
        chunking=requested_chunking(request),
    )
    try:
        outcome = await backend.service.embed(params, deadline_of(context))
    except InputTooLong as error:
        raise ollama_too_long(error, num_ctx) from None
    except InvalidInput as error:
        if error.param != NUM_CTX:
            raise
        raise InvalidInput(f"{OLLAMA_NO_ROOM}: {error.message}", param=NUM_CTX) from None
    response = pb.OllamaEmbedResponse(
        # Ollama echoes the name as sent (an alias, "x:latest"); '' is our default model.
        model=request.model or outcome.model,
        embeddings=vector_messages.nested_list_value(outcome.vectors),
        total_duration=float(round(outcome.total_seconds * 1e9)),
        load_duration=float(round(outcome.load_seconds * 1e9)),
        prompt_eval_count=outcome.prompt_tokens,
    )
    if outcome.chunks is not None:  # the chunks extension only where chunks were asked for
        response.chunks.CopyFrom(chunk_objects(outcome.chunks))
    return response


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
        f"{json_kind(kind)}.",
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
                f"options.{key} must be a string; got {json_kind(kind)}.", param=f"options.{key}"
            )
        found[key] = value.string_value
    return found


SERVICE = pb.DESCRIPTOR.services_by_name["Ollama"]
HANDLERS: Handlers = {
    "OllamaEmbed": ollama_embed,
    "OllamaEmbeddings": ollama_embeddings,
    "OllamaTags": ollama_tags,
    "OllamaPull": ollama_pull,
    "OllamaShow": ollama_show,
    "OllamaVersion": ollama_version,
    "OllamaRoot": ollama_root,
    "OllamaPs": model_routes.list_running,
}
