"""Which engine serves a model: the runtime loader the server hands the registry.

``engine = "auto"`` (the default) picks ONNX Runtime for what it was measured to serve faster
at the same vectors (docs/design.md, "Engines" and "Families"): a BERT or ModernBERT encoder
with mean or CLS pooling, a BERT / XLM-RoBERTa / ModernBERT cross-encoder (pooling rank), or a
Gemma3 encoder (``gemma-embedding``, EmbeddingGemma: llama.cpp's tanh-GELU goes through an f16
table, ONNX Runtime is exact and was measured faster), f32 or f16 weights, on the CPU. Everything
else (other architectures, quantized files, pooling chosen at load time, GPU offload) runs on
llama.cpp, except MPNet (architecture ``mpnet``, ours), which llama.cpp has no graph for: ONNX
Runtime serves it in every case it can. ``engine = "llama.cpp"`` or ``"onnxruntime"`` forces
one; a model the forced engine cannot serve is then refused by name.

llama.cpp cannot serve a cross-encoder with two token types (BERT's: the document of a pair
is type 1; llama.cpp gives every token type 0) nor a classifier head whose activation is not
tanh (DistilBERT's ReLU), so such a model in a quantized file, which ONNX Runtime doesn't serve
either, is refused with both reasons. Nor can it serve a SPLADE sparse encoder (``task``
sparse: an MLM head and SPLADE pooling): ONNX Runtime alone does.
"""

from __future__ import annotations

import logging

from embedd_server.compute.engine import Runtime
from embedd_server.compute.settings import ENGINES, EngineSettings, LoadOptions
from embedd_server.engines.llama import ENGINE_NAME as LLAMA
from embedd_server.engines.llama import (
    load_llama_runtime,
    pools_without_prompt,
    rank_refusal,
)
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import CLASSIFY, OWN_ARCHITECTURES, RERANK, SPARSE, ModelInfo

log = logging.getLogger(__name__)

AUTO, _, ONNX = ENGINES
_ONNX_ARCHITECTURES = frozenset({"bert", "gemma-embedding", "modern-bert", "mpnet"})
# Architectures of ours, which llama.cpp has no graph for: ONNX Runtime is their only engine,
# so it serves whatever weights it reads (quantized ones dequantized), on the CPU even where
# the settings offload to a GPU.
_LLAMA_LACKS = OWN_ARCHITECTURES
_ONNX_POOLINGS = frozenset({"mean", "cls", "rank"})
_ONNX_WEIGHTS = frozenset({"f32", "f16"})


def onnx_refusal(info: ModelInfo, settings: EngineSettings, options: LoadOptions) -> str | None:
    """Why ONNX Runtime can't (or, being slower or less exact there, shouldn't) serve this
    model; None when it can."""
    if info.architecture not in _ONNX_ARCHITECTURES:
        return (
            f"architecture {info.architecture!r} (ONNX Runtime serves "
            f"{', '.join(sorted(_ONNX_ARCHITECTURES))})"
        )
    if (why := _pooling_refusal(info, options)) is not None:
        return why
    if info.architecture in _LLAMA_LACKS:
        return None  # its only engine: any weights, on the CPU
    n_gpu_layers = settings.n_gpu_layers if options.n_gpu_layers is None else options.n_gpu_layers
    if info.quantization not in _ONNX_WEIGHTS:
        return f"{info.quantization} weights (ONNX Runtime computes f32 from f32 or f16)"
    if n_gpu_layers != 0:
        return "GPU offload (llama.cpp serves GPUs)"
    return None


def _pooling_refusal(info: ModelInfo, options: LoadOptions) -> str | None:
    """Why ONNX Runtime's graph can't pool this model as asked; None when it can."""
    if info.task == SPARSE:  # SPLADE pools in its own graph, whatever llama.cpp's pooling says
        if options.pooling is not None:
            return f"pooling {options.pooling!r} (a SPLADE model pools with SpladePooling only)"
    elif options.pooling is not None or info.pooling not in _ONNX_POOLINGS:
        return (
            f"pooling {options.pooling or info.pooling!r} (ONNX Runtime pools mean or cls, or "
            "scores with a cross-encoder's own head)"
        )
    return None


def llama_refusal(info: ModelInfo) -> str | None:
    """Why llama.cpp can't serve this model exactly; None when it can."""
    if (family := _LLAMA_LACKS.get(info.architecture)) is not None:
        return f"llama.cpp has no {family} architecture; engine=auto or onnxruntime serve it"
    if info.task == SPARSE:
        return (
            "it is a SPLADE sparse encoder, and llama.cpp has neither its masked-language-model "
            "head nor SPLADE pooling"
        )
    if info.task not in (RERANK, CLASSIFY):
        return None
    return rank_refusal(info)


def engine_for(info: ModelInfo, settings: EngineSettings, options: LoadOptions) -> str:
    """The engine that serves ``info``: the setting, or the measured choice for ``auto``."""
    refusal = onnx_refusal(info, settings, options)
    if settings.engine == ONNX and refusal is not None:
        raise ModelLoadError(
            f"engine=onnxruntime cannot serve {info.name}: {refusal}. "
            "Use engine=auto or engine=llama.cpp."
        )
    if settings.engine == ONNX or (settings.engine == AUTO and refusal is None):
        return ONNX
    if (why := llama_refusal(info)) is not None:
        if info.architecture in _LLAMA_LACKS:
            if refusal is None:
                raise ModelLoadError(f"engine=llama.cpp cannot serve {info.name}: {why}.")
            raise ModelLoadError(
                f"No engine can serve {info.name}: {why}, but ONNX Runtime not with its "
                f"{refusal}. Load it with the pooling its file names."
            )
        if refusal is None:
            raise ModelLoadError(
                f"engine=llama.cpp cannot serve {info.name}: {why}. "
                "Use engine=auto or engine=onnxruntime, which compute it exactly."
            )
        raise ModelLoadError(
            f"No engine can serve {info.name}: llama.cpp because {why}; ONNX Runtime because "
            f"of its {refusal}. Re-import the model with --type f16 or --type f32 and load it "
            "on the CPU (ONNX Runtime then serves it)."
        )
    return LLAMA


def load_runtime(info: ModelInfo, settings: EngineSettings, options: LoadOptions) -> Runtime:
    """The production loader: the model on the engine :func:`engine_for` picks."""
    engine = engine_for(info, settings, options)
    log.info("%s: engine %s", info.name, engine)
    if engine == ONNX:
        from embedd_server.engines.onnx import OnnxRuntime

        return OnnxRuntime(
            info.path,
            threads=settings.onnx_cores(),
            max_batch_tokens=settings.onnx_batch_tokens,
            int8=settings.int8,
            processes=settings.processes_for(ONNX),
            spinning=settings.onnx_spins(ONNX),
            log_json=settings.log_json,
            pool_from_starts=pools_without_prompt(info, options),
            workers=settings.workers_for(ONNX),
        )
    return load_llama_runtime(info, settings, options)
