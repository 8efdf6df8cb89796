"""The embedding engine: llama.cpp through llama-cpp-python.

The weights of a model are loaded once (:class:`LlamaModelWeights`); each worker owns one
:class:`LlamaEngine`, a llama.cpp context on those weights, and nothing else touches it.
Each call decodes ONE sequence: packing several BERT sequences into one ubatch makes llama.cpp
attend over the whole ubatch under a mask, about 2x slower at 512 tokens (shared notes).

The engine returns the model's pooled vector, not normalized: dimensions and normalization
are the service's business.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from embedd_server.errors import ModelLoadError

log = logging.getLogger(__name__)


class Engine(Protocol):
    """One worker's private engine. Not thread-safe: one thread calls it."""

    @property
    def dimensions(self) -> int:
        """Length of the vectors embed() returns."""

    def embed(self, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """The pooled (not normalized) vector of one token sequence."""

    def close(self) -> None:
        """Frees the engine's memory."""


def _llama() -> object:
    """Imports llama_cpp once, quietly: its log callback goes to Python logging."""
    import llama_cpp

    # llama-cpp-python prints llama.cpp's log to stderr unless its logger says otherwise.
    # (verbose=False would instead redirect fds 1/2 while loading, unsafe in a threaded server.)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


class LlamaModelWeights:
    """A GGUF model's weights, loaded once and shared by the contexts of all workers."""

    def __init__(self, path: Path, n_gpu_layers: int = 0) -> None:
        llama_cpp = _llama()
        from llama_cpp import _internals

        params = llama_cpp.llama_model_default_params()  # type: ignore[attr-defined]
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
        self.dimensions = int(self.model.n_embd())
        self.vocab_size = int(self.model.n_vocab())
        self._lock = threading.Lock()  # guards tokenize calls from several threads

    def tokenize(self, text: bytes) -> list[int]:
        """llama.cpp's own tokenizer (special tokens added, like BERT's [CLS] ... [SEP])."""
        with self._lock:
            return list(self.model.tokenize(text, add_bos=True, special=False))

    def token_text(self, token_id: int) -> str:
        with self._lock:
            piece: bytes = self.model.token_to_piece(token_id, special=True)
        return piece.decode("utf-8", "replace")

    def close(self) -> None:
        self.model.close()


class LlamaEngine:
    """One llama.cpp context: decodes one sequence per call, returns its pooled vector."""

    def __init__(self, weights: LlamaModelWeights, max_tokens: int, n_threads: int) -> None:
        llama_cpp = _llama()
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()  # type: ignore[attr-defined]
        params.n_ctx = max_tokens
        params.n_batch = max_tokens
        params.n_ubatch = max_tokens
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        try:
            self._ctx = _internals.LlamaContext(model=weights.model, params=params, verbose=True)
        except ValueError as exc:
            raise ModelLoadError(f"llama.cpp could not create a context: {exc}") from None
        self._batch = _internals.LlamaBatch(n_tokens=max_tokens, embd=0, n_seq_max=1, verbose=True)
        self._get_embeddings = llama_cpp.llama_get_embeddings_seq  # type: ignore[attr-defined]
        self._dimensions = weights.dimensions
        self._max_tokens = max_tokens

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
        if not 0 < len(token_ids) <= self._max_tokens:
            raise ValueError(f"sequence of {len(token_ids)} tokens; 1..{self._max_tokens} fit")
        self._ctx.kv_cache_clear()
        self._batch.reset()
        self._batch.add_sequence(token_ids, 0, True)
        self._ctx.decode(self._batch)  # releases the GIL while llama.cpp computes
        pointer = self._get_embeddings(self._ctx.ctx, 0)
        if not pointer:
            raise RuntimeError("llama.cpp returned no pooled embedding (pooling type none?)")
        # One copy straight out of llama.cpp's buffer: no per-float Python objects.
        view = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._dimensions,)
        )
        return view.copy()

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()


class LlamaRuntime:
    """What loading a GGUF file with llama.cpp gives the registry: weights and engines."""

    def __init__(self, path: Path, max_tokens: int, n_threads: int, n_gpu_layers: int) -> None:
        self.weights = LlamaModelWeights(path, n_gpu_layers)
        self._max_tokens = max_tokens
        self._n_threads = n_threads

    @property
    def dimensions(self) -> int:
        return self.weights.dimensions

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    def new_engine(self) -> Engine:
        return LlamaEngine(self.weights, self._max_tokens, self._n_threads)

    def tokenize(self, text: bytes) -> list[int]:
        return self.weights.tokenize(text)

    def token_text(self, token_id: int) -> str:
        return self.weights.token_text(token_id)

    def close(self) -> None:
        self.weights.close()
