"""The embedding engine: llama.cpp through llama-cpp-python.

The weights of a model are loaded once (:class:`LlamaModelWeights`); each worker owns one
:class:`LlamaEngine`, a llama.cpp context on those weights, and nothing else touches it.
A call decodes the sequences it is given in ONE llama.cpp batch. llama.cpp attends over the
whole ubatch under a mask, so the cost grows with the square of the batch: the scheduler keeps
batches small (``batch_tokens``; the measurements are in docs/design.md, "Packing inputs into
one decode").

The engine returns the model's pooled vector, not normalized: dimensions and normalization
are the service's business. For a cross-encoder (pooling ``rank``) llama.cpp runs the
classifier head on each sequence's first token and the engine returns its raw logits, one per
label (``llama_model_n_cls_out``). llama.cpp's BERT graph adds token type 0's embedding to
every token, so a cross-encoder whose pairs give the document token type 1 (BERT with BERT's
tokenizer) is refused at load rather than scored wrong; one whose pairs are all type 0
(XLM-RoBERTa, or a generic tokenizer) runs. Its rank pooling applies tanh between the head's
two layers, so a head with another activation (DistilBERT's ReLU) is refused too.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedd_server.compute.engine import Engine
from embedd_server.compute.pack import Pack, masked_means
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.engines.process import EngineSpec, ProcessEngine
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import (
    POOLING_TYPES,
    RANK_POOLING,
    TANH,
    ModelInfo,
    read_model_info,
)
from embedd_server.model.dense import (
    DENSE_COUNT_KEY,
    DenseLayer,
    apply_dense,
    check_stack,
    read_dense_gguf,
)
from embedd_server.model.vocabulary import llama_token_text, llama_tokenize

log = logging.getLogger(__name__)

ENGINE_NAME = "llama.cpp"
_POOLING_NONE = 0  # llama.cpp's LLAMA_POOLING_TYPE_NONE: one output vector per token


def _llama() -> object:
    """Imports llama_cpp once, quietly: its log callback goes to Python logging."""
    import llama_cpp

    # llama-cpp-python prints llama.cpp's log to stderr unless its logger says otherwise.
    # (verbose=False would instead redirect fds 1/2 while loading, unsafe in a threaded server.)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


class LlamaModelWeights:
    """A GGUF model's weights, loaded once and shared by the contexts of all workers."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, *, vocab_only: bool = False) -> None:
        llama_cpp = _llama()
        from llama_cpp import _internals

        params = llama_cpp.llama_model_default_params()  # type: ignore[attr-defined]
        params.vocab_only = vocab_only  # the tokenizer and metadata only: no weights
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        # llama.cpp's "extra" CPU buffer types (AMX, repacked weights) are chosen from what
        # the CPU advertises; on these machines it advertises AMX, and a q8_0 model then
        # crashes the process (SIGSEGV inside ggml_backend_amx_mul_mat, seen in gdb).
        params.use_extra_bufts = False
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=True)
        except ValueError as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {path.name}: {exc}. Is it a GGUF file of a "
                "supported architecture? Re-create it with `embedd import`."
            ) from None
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        metadata = self.model.metadata()
        architecture = metadata.get("general.architecture", "")
        # A cross-encoder: llama.cpp pools with its classifier head (pooling type rank).
        self.rank = metadata.get(f"{architecture}.pooling_type") == str(RANK_POOLING)
        if self.rank:
            # A vocab-only load has no hparams (n_cls_out would be llama.cpp's default of 1):
            # the label count then comes from the file's metadata, which is what the
            # worker-process handshake checks the loaded model's n_cls_out against.
            n_cls_out = llama_cpp.llama_model_n_cls_out  # type: ignore[attr-defined]
            self.dimensions = (
                read_model_info(path).labels if vocab_only else int(n_cls_out(self.model.model))
            )
        else:
            self.dimensions = int(self.model.n_embd()) or _embedding_length(metadata)
        # The width of llama.cpp's pooled rows; sentence-transformers Dense modules that
        # llama.cpp doesn't apply (all but gemma-embedding's own) are applied after it.
        self.pooled_width = self.dimensions
        self.dense = _dense_layers(path, metadata)
        if self.dense:
            self.dimensions = self.dense[-1].out_features
        self.vocab_size = int(self.model.n_vocab())
        self._lock = threading.Lock()  # guards tokenize calls from several threads

    def tokenize(self, text: bytes) -> list[int]:
        return llama_tokenize(self.model, self._lock, text)

    def token_text(self, token_id: int) -> str:
        return llama_token_text(self.model, self._lock, token_id)

    def close(self) -> None:
        self.model.close()


def _dense_layers(path: Path, metadata: dict[str, str]) -> tuple[DenseLayer, ...]:
    """The Dense modules the file carries under embedd's keys (model/dense.py), which this
    engine applies to llama.cpp's pooled vectors; none for most files."""
    if int(metadata.get(DENSE_COUNT_KEY, "0")) == 0:
        return ()
    from gguf import GGUFReader

    try:
        layers = read_dense_gguf(GGUFReader(path, "r"))
        check_stack(layers, int(_embedding_length(metadata)))
    except ValueError as exc:
        raise ModelLoadError(
            f"{path.name}: its Dense modules cannot be read ({exc}); re-create the file with "
            "`embedd import`."
        ) from None
    return layers


def check_rank_model(weights: LlamaModelWeights, pooling_type: int | None = None) -> None:
    """Refuses a cross-encoder llama.cpp would score wrong (see :func:`rank_refusal`), or one
    asked to pool like an embedding model."""
    if not weights.rank:
        return
    if (why := rank_refusal(read_model_info(weights.path))) is not None:
        raise ModelLoadError(
            f"llama.cpp cannot serve {weights.path.name}: {why}. Use engine=auto or "
            "engine=onnxruntime, which compute it exactly."
        )
    if pooling_type is not None and pooling_type != RANK_POOLING:
        raise ModelLoadError(
            f"{weights.path.name} is a cross-encoder: it scores pairs with its classifier "
            "head and cannot be loaded with another pooling."
        )


def rank_refusal(info: ModelInfo) -> str | None:
    """Why llama.cpp can't score a cross-encoder or classifier: its pairs give the document
    token type 1, or its BERT-layout head has an activation other than tanh (llama.cpp's
    ``bert`` rank pooling applies tanh; ``modern-bert`` applies its own); None when it can."""
    if info.architecture == "bert" and info.head_activation != TANH:
        return (
            f"its classifier head applies {info.head_activation} between its two layers, and "
            "llama.cpp's rank pooling applies tanh, so its scores would be wrong"
        )
    if not info.pair_token_types:
        return None
    return (
        "it is a cross-encoder whose pairs give the document token type 1, and llama.cpp "
        "gives every token type 0, so its scores would be wrong"
    )


class _NumpyBatch:
    """A llama_batch whose arrays are numpy buffers, filled without per-token Python work."""

    def __init__(self, capacity: int, max_sequences: int) -> None:
        llama_cpp = _llama()
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_ids = np.zeros(capacity, dtype=np.int32)
        self.logits = np.ones(capacity, dtype=np.int8)  # embeddings need every token's output
        int_pointer = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_ids.ctypes.data
        # seq_id[i] points at seq_ids[i]: one sequence per token.
        self._seq_id_pointers = (int_pointer * capacity)(
            *(ctypes.cast(base + 4 * i, int_pointer) for i in range(capacity))
        )
        self.struct = llama_cpp.llama_batch()  # type: ignore[attr-defined]
        self.struct.token = self.token.ctypes.data_as(int_pointer)
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(int_pointer)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(int_pointer)
        self.struct.seq_id = ctypes.cast(self._seq_id_pointers, ctypes.POINTER(int_pointer))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.capacity = capacity
        self.max_sequences = max_sequences

    def fill(self, pack: Pack) -> None:
        """Puts the pack's sequences into the batch."""
        tokens, lengths = pack.tokens, pack.lengths
        total = len(tokens)
        if total > self.capacity or len(lengths) > self.max_sequences:
            raise ValueError(
                f"{len(lengths)} sequences of {total} tokens; the context fits "
                f"{self.max_sequences} sequences of {self.capacity} tokens"
            )
        starts = np.repeat(pack.offsets, lengths)
        self.token[:total] = tokens
        self.pos[:total] = np.arange(total, dtype=np.int32) - starts
        self.seq_ids[:total] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        self.struct.n_tokens = total


class LlamaEngine:
    """One llama.cpp context: decodes a pack of sequences per call, returns pooled vectors."""

    def __init__(
        self,
        weights: LlamaModelWeights,
        max_tokens: int,
        max_sequences: int,
        n_threads: int,
        *,
        pooling_type: int | None = None,
        exact_attention: bool = False,
        pool_from_starts: bool = False,
    ) -> None:
        """``pool_from_starts``: mean pooling done here, from each sequence's pooling start
        (a model with ``include_prompt: false``); llama.cpp returns every token's vector."""
        check_rank_model(weights, pooling_type)
        llama_cpp = _llama()
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()  # type: ignore[attr-defined]
        params.n_ctx = max_tokens
        params.n_batch = max_tokens
        params.n_ubatch = max_tokens  # one ubatch per call: the pack is attended as one
        params.n_seq_max = max_sequences
        params.kv_unified = True
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        if exact_attention:
            # f32 weights promise f32 vectors: flash attention (AUTO turns it on) casts K and V
            # to f16, and a causal model's KV cache is f16 by default. Turning both off costs
            # packed decodes much speed, so f16 and quantized files keep llama.cpp's defaults
            # (measured: docs/design.md, "llama.cpp quirks handled").
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # type: ignore[attr-defined]
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32  # type: ignore[attr-defined]
        if pooling_type is not None:  # e.g. mean pooling for a causal LM
            params.pooling_type = pooling_type
        if pool_from_starts:
            # llama.cpp's own mean covers every token of a sequence; the prompt's tokens must
            # be left out of it, so it hands out token vectors and the mean is taken here.
            params.pooling_type = _POOLING_NONE
        self._pool_from_starts = pool_from_starts
        try:
            self._ctx = _internals.LlamaContext(model=weights.model, params=params, verbose=True)
        except ValueError as exc:
            raise ModelLoadError(f"llama.cpp could not create a context: {exc}") from None
        self._batch = _NumpyBatch(max_tokens, max_sequences)
        self._decode = llama_cpp.llama_decode  # type: ignore[attr-defined]
        self._get_embeddings = llama_cpp.llama_get_embeddings_seq  # type: ignore[attr-defined]
        self._get_token_embeddings = llama_cpp.llama_get_embeddings  # type: ignore[attr-defined]
        self._dimensions = weights.dimensions
        self._pooled_width = weights.pooled_width  # llama.cpp's rows, before self._dense
        self._dense = weights.dense

    @classmethod
    def from_spec(cls, weights: LlamaModelWeights, spec: EngineSpec) -> LlamaEngine:
        """The context a worker's :class:`EngineSpec` describes, on ``weights``."""
        return cls(
            weights,
            spec.max_tokens,
            spec.max_sequences,
            spec.n_threads,
            pooling_type=spec.pooling_type,
            exact_attention=spec.exact_attention,
            pool_from_starts=spec.pool_from_starts,
        )

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, pack: Pack) -> npt.NDArray[np.float32]:
        """The pack's pooled vectors in one decode (llama.cpp gives no token states)."""
        if pack.token_states:
            raise ValueError("llama.cpp's engine gives pooled vectors only, not token states")
        if not self._pool_from_starts and pack.pools_from_starts:
            raise ValueError("this engine pools every token; it was not made to skip prompts")
        if pack.two_segments:
            # llama.cpp's BERT graph adds token type 0's embedding to every token.
            raise ValueError("llama.cpp gives every token type 0; a second segment needs type 1")
        self._batch.fill(pack)
        self._ctx.kv_cache_clear()
        code = self._decode(self._ctx.ctx, self._batch.struct)  # releases the GIL
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        if self._pool_from_starts:
            return self._with_dense(self._mean_from_starts(pack))
        vectors = np.empty((len(pack), self._pooled_width), dtype=np.float32)
        for index in range(len(pack)):
            pointer = self._get_embeddings(self._ctx.ctx, index)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding (pooling type none?)")
            # One copy straight out of llama.cpp's buffer: no per-float Python objects. With
            # pooling rank the buffer holds the sequence's n_cls_out logits.
            vectors[index] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._pooled_width,)
            )
        return self._with_dense(vectors)

    def _with_dense(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The pooled vectors through the file's Dense modules (float64), if it has any."""
        return apply_dense(vectors, self._dense) if self._dense else vectors

    def _mean_from_starts(self, pack: Pack) -> npt.NDArray[np.float32]:
        """The mean of each sequence's token vectors from its pooling start on."""
        pointer = self._get_token_embeddings(self._ctx.ctx)
        if not pointer:
            raise RuntimeError("llama.cpp returned no token embeddings")
        token_vectors = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
            shape=(len(pack.tokens), self._pooled_width),
        )
        return masked_means(token_vectors, pack)

    @property
    def alive(self) -> bool:
        return True

    def abort(self) -> None:
        """A decode in a thread can't be stopped from outside; the watchdog retires it."""

    def close(self) -> None:
        self._ctx.close()


def _embedding_length(metadata: dict[str, str]) -> int:
    """The model's width from GGUF metadata (a vocab-only load has no hparams)."""
    architecture = metadata.get("general.architecture", "")
    return int(metadata.get(f"{architecture}.embedding_length", "0"))


class LlamaRuntime:
    """What loading a GGUF file with llama.cpp gives the registry: weights and engines.

    With ``processes`` each engine is a worker process of its own (:class:`ProcessEngine`)
    and this process loads only the vocabulary (tokenizer fallback, metadata); otherwise the
    weights are loaded here once and every engine is a context on them, used by a thread.
    """

    engine_name = ENGINE_NAME

    def __init__(
        self,
        path: Path,
        *,
        max_tokens: int,
        max_sequences: int,
        n_threads: int,
        n_gpu_layers: int,
        pooling_type: int | None = None,
        processes: bool = False,
        log_json: bool = False,
        exact_attention: bool = False,
        pool_from_starts: bool = False,
    ) -> None:
        self.weights = LlamaModelWeights(path, n_gpu_layers, vocab_only=processes)
        try:
            check_rank_model(self.weights, pooling_type)
        except ModelLoadError:
            self.weights.close()
            raise
        self._spec = EngineSpec(
            path=str(path),
            max_tokens=max_tokens,
            max_sequences=max_sequences,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            pooling_type=pooling_type,
            log_json=log_json,
            exact_attention=exact_attention,
            pool_from_starts=pool_from_starts,
        )
        self._processes = processes

    @property
    def dimensions(self) -> int:
        return self.weights.dimensions

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    def new_engine(self) -> Engine:
        spec = self._spec
        if not self._processes:
            return LlamaEngine.from_spec(self.weights, spec)
        engine = ProcessEngine(spec)
        if engine.dimensions != self.dimensions:
            engine.close()
            raise ModelLoadError(
                f"{self.weights.path.name}: the engine gives {engine.dimensions}-dimensional "
                f"vectors, its metadata says {self.dimensions}."
            )
        return engine

    def tokenize(self, text: bytes) -> list[int]:
        return self.weights.tokenize(text)

    def token_text(self, token_id: int) -> str:
        return self.weights.token_text(token_id)

    def close(self) -> None:
        self.weights.close()


def load_llama_runtime(
    info: ModelInfo, settings: EngineSettings, options: LoadOptions
) -> LlamaRuntime:
    """The production loader: llama.cpp on the GGUF file."""
    n_gpu_layers = settings.n_gpu_layers if options.n_gpu_layers is None else options.n_gpu_layers
    return LlamaRuntime(
        info.path,
        max_tokens=max(settings.batch_tokens, info.max_input_tokens),
        max_sequences=settings.batch_sequences,
        n_threads=settings.threads_per_worker,
        n_gpu_layers=n_gpu_layers,
        pooling_type=POOLING_TYPES[options.pooling] if options.pooling else None,
        processes=settings.processes_for(ENGINE_NAME) and n_gpu_layers == 0,
        log_json=settings.log_json,
        exact_attention=info.quantization == "f32",
        pool_from_starts=pools_without_prompt(info, options),
    )


def pools_without_prompt(info: ModelInfo, options: LoadOptions) -> bool:
    """Whether the model's mean pooling leaves out its prompt's tokens (sentence-transformers'
    ``include_prompt: false``): its engines then pool from per-input starts."""
    return not info.include_prompt and (options.pooling or info.pooling) == "mean"
