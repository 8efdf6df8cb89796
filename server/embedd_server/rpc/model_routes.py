"""The native model RPCs: the catalogue, explicit load/unload (Jan/Nitro style) and the
running models (also Ollama's /api/ps, ollama_routes' OllamaPs)."""

from __future__ import annotations

import datetime

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.settings import LoadOptions
from embedd_server.core.service import ModelStatus, RunningModel
from embedd_server.errors import NotImplementedFeature
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.context import Context
from embedd_server.rpc.keep_alive import parse_keep_alive
from embedd_server.rpc.ollama_shapes import ollama_details

# Ollama prints a far-future expiry for models kept forever.
_FOREVER = datetime.datetime(2318, 1, 1, tzinfo=datetime.UTC)


def model_message(status: ModelStatus) -> pb.Model:
    """A catalogue entry as the Model message (OpenAI's model object plus our fields); an
    alias's entry is its model's, under the alias's name."""
    info = status.info
    return pb.Model(
        id=status.alias or info.name,
        object="model",
        created=info.created,
        owned_by="embedd",
        name=status.alias or info.name,
        alias_of=info.name if status.alias else "",
        dimensions=info.dimensions,
        max_input_tokens=info.max_input_tokens,
        pooling=status.pooling or info.pooling,  # what it serves with: a causal LM's from its load
        quantization=info.quantization,
        loaded=status.loaded,
        file_size_bytes=info.file_size_bytes,
        embedding=info.embedding,
        normalizes=info.normalizes,
        engine=status.engine,
        family=info.family,
        prompts=info.prompts,
        default_prompt_name=info.default_prompt_name or "",
        tokenizer=info.tokenizer,  # the index's: never read on a request
        task=info.task,
        labels=info.label_names,
    )


async def list_models(
    backend: Backend, request: pb.ListModelsRequest, context: Context
) -> pb.ListModelsResponse:
    """Embedder.ListModels (GET /v1/models)."""
    service = backend.service
    statuses = await service.list_models() + await service.list_aliases()
    models = [model_message(status) for status in statuses]
    return pb.ListModelsResponse(object="list", data=models)


async def get_model(backend: Backend, request: pb.GetModelRequest, context: Context) -> pb.Model:
    """Embedder.GetModel (GET /v1/models/{model})."""
    return model_message(await backend.service.get_model(request.model))


async def load_model(
    backend: Backend, request: pb.LoadModelRequest, context: Context
) -> pb.LoadModelResponse:
    """Embedder.LoadModel (POST /v1/models/load)."""
    if request.HasField("embedding") and not request.embedding:
        raise NotImplementedFeature(
            'embedd loads models for embeddings only; send "embedding": true.',
            param="embedding",
        )
    options = LoadOptions(
        pooling=request.pooling or None,
        n_gpu_layers=request.n_gpu_layers if request.HasField("n_gpu_layers") else None,
    )
    keep_alive = parse_keep_alive(request.keep_alive) if request.HasField("keep_alive") else None
    status = await backend.service.load_model(request.model, options, keep_alive)
    message = "Model loaded successfully"
    if keep_alive is not None and backend.service.is_default_model(request.model):
        message += "; keep_alive ignored: the default model stays loaded"
    return pb.LoadModelResponse(message=message, model=model_message(status))


async def unload_model(
    backend: Backend, request: pb.UnloadModelRequest, context: Context
) -> pb.UnloadModelResponse:
    """Embedder.UnloadModel (POST /v1/models/unload)."""
    status = await backend.service.unload_model(request.model)
    return pb.UnloadModelResponse(
        message="Model unloaded successfully", model=model_message(status)
    )


async def list_running(
    backend: Backend, request: pb.ListRunningRequest, context: Context
) -> pb.ListRunningResponse:
    """Embedder.ListRunning."""
    service = backend.service
    return pb.ListRunningResponse(
        models=[
            _running_message(running, await service.digest(running.info))
            for running in service.running()
        ]
    )


def _running_message(running: RunningModel, digest: str) -> pb.RunningModel:
    info = running.info
    return pb.RunningModel(
        name=info.name,
        model=info.name,
        size=float(info.file_size_bytes),
        digest=digest,
        details=ollama_details(info),
        expires_at=_expiry(running.expires_in_s),
        size_vram=0.0,
        context_length=info.max_input_tokens,
    )


def _expiry(seconds: float) -> str:
    now = datetime.datetime.now(datetime.UTC)
    try:
        when = now + datetime.timedelta(seconds=seconds)
    except OverflowError:  # beyond year 9999: as good as forever
        when = _FOREVER
    when = min(when, _FOREVER)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


HANDLERS: Handlers = {
    "ListModels": list_models,
    "GetModel": get_model,
    "LoadModel": load_model,
    "UnloadModel": unload_model,
    "ListRunning": list_running,
}
