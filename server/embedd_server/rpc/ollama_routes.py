"""The rest of Ollama's surface that embedding clients call: the legacy /api/embeddings, the
catalogue (/api/tags, /api/show), /api/pull (for models that are here), /api/version and the
"Ollama is running" root.

Open WebUI, LangChain and the official ``ollama`` client probe these before they embed; the
answers describe embedd's own models in Ollama's shapes. /api/embed and /api/ps live with the
other embedding and model routes (rest_routes, model_routes).
"""

from __future__ import annotations

from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.model_names import tagged_name
from embedd_server.core.service import EmbeddingService, EmbedParams, ModelStatus
from embedd_server.errors import InvalidInput, ModelNotFound, shorten
from embedd_server.model.catalog import EMBED, SPARSE
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.keep_alive import parse_keep_alive
from embedd_server.rpc.ollama_shapes import ollama_details, rfc3339
from embedd_server.rpc.rest_routes import ollama_prompt_options
from embedd_server.rpc.status import ollama_error_body, translate_errors

# The Ollama release whose API these routes follow (the one docs/benchmarks compares with);
# clients such as Open WebUI read it to decide which routes exist.
OLLAMA_API_VERSION = "0.24.0"
ROOT_TEXT = b"Ollama is running"
# What Ollama's /api/pull streams for a model it has, first and last lines (its PullModel in
# server/images.go), as NDJSON; with "stream": false it answers only the last, as one object.
PULL_SUCCESS = b'{"status":"success"}'
PULL_PROGRESS = b'{"status":"pulling manifest"}\n' + PULL_SUCCESS + b"\n"


class OllamaRoutes:
    """OllamaEmbeddings, OllamaTags, OllamaPull, OllamaShow, OllamaVersion and OllamaRoot."""

    def __init__(self, service: EmbeddingService) -> None:
        self._ollama_service = service

    @translate_errors(ollama_error_body)
    async def OllamaEmbeddings(
        self, request: pb.OllamaEmbeddingsRequest, context: Context
    ) -> pb.OllamaEmbeddingsResponse:
        keep_alive = (
            parse_keep_alive(request.keep_alive) if request.HasField("keep_alive") else None
        )
        if not request.prompt:
            # Ollama answers an empty prompt with an empty vector (clients use it to load a
            # model): the model must exist, and is loaded, but nothing is embedded.
            await self._ollama_service.load_if_needed(request.model, keep_alive)
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
        outcome = await self._ollama_service.embed(params, deadline_of(context))
        [vector] = vector_messages.nested_list_value(outcome.vectors).values
        return pb.OllamaEmbeddingsResponse(embedding=vector.list_value)

    @translate_errors(ollama_error_body)
    async def OllamaTags(
        self, request: pb.OllamaTagsRequest, context: Context
    ) -> pb.OllamaTagsResponse:
        # Named as Ollama lists them ("x:latest"); the aliases after the models, each with its
        # model's details (as `ollama cp` lists a copy).
        service = self._ollama_service
        statuses = await service.list_models() + await service.list_aliases()
        return pb.OllamaTagsResponse(
            models=[_tags_entry(status, await service.digest(status.info)) for status in statuses]
        )

    @translate_errors(ollama_error_body)
    async def OllamaPull(
        self, request: pb.OllamaPullRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        name = request.model or request.name
        if not name:
            raise InvalidInput("model is required", param="model")
        try:
            await self._ollama_service.get_model(name)
        except ModelNotFound:
            raise ModelNotFound(
                f"model '{shorten(name)}' not found: embedd does not download models. Import "
                "it from a Hugging Face (sentence-transformers) directory into the models "
                f"directory with `embedd import DIR --name NAME`; the models here: "
                f"{await self._model_names()}.",
                param="model",
            ) from None
        if request.HasField("stream") and not request.stream:
            return httpbody_pb2.HttpBody(
                content_type="application/json; charset=utf-8", data=PULL_SUCCESS
            )
        return httpbody_pb2.HttpBody(content_type="application/x-ndjson", data=PULL_PROGRESS)

    async def _model_names(self) -> str:
        service = self._ollama_service
        statuses = await service.list_models() + await service.list_aliases()
        return ", ".join(status.alias or status.info.name for status in statuses) or "none"

    @translate_errors(ollama_error_body)
    async def OllamaShow(
        self, request: pb.OllamaShowRequest, context: Context
    ) -> pb.OllamaShowResponse:
        status = await self._ollama_service.get_model(request.model or request.name)
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

    @translate_errors(ollama_error_body)
    async def OllamaVersion(
        self, request: pb.OllamaVersionRequest, context: Context
    ) -> pb.OllamaVersionResponse:
        return pb.OllamaVersionResponse(version=OLLAMA_API_VERSION)

    @translate_errors(ollama_error_body)
    async def OllamaRoot(
        self, request: pb.OllamaRootRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
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
