"""What every engine is: the protocol a worker calls, and the failure that retires a worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.model.catalog import ModelInfo

# Vectors, one row each: what engines return and every layer above passes on.
FloatMatrix = npt.NDArray[np.float32]


class Engine(Protocol):
    """One worker's engine. One thread calls it; :meth:`abort` may come from another."""

    @property
    def dimensions(self) -> int:
        """Length of the vectors embed() returns."""

    def embed(self, pack: Pack) -> FloatMatrix:
        """The pack's pooled (not normalized) vectors, one row per sequence; for a
        cross-encoder (pooling ``rank``), each sequence's raw logits, one per label. With
        ``pack.token_states``, every token's last hidden state instead, the sequences' tokens
        one row each, in order (``[total tokens, hidden size]``, not normalized): only an
        engine whose runtime says so (:func:`gives_token_states`) gives them; others raise
        ValueError.

        The pack was validated when it was made; an engine checks only what its model can
        compute: pooling starts other than 0 only for a model that pools without its prompt
        (``include_prompt: false``), a second segment (token type 1) only where the model
        has that token type; others raise ValueError rather than compute the wrong vector."""

    @property
    def alive(self) -> bool:
        """False once the engine can no longer compute (its process has ended)."""

    def abort(self) -> None:
        """Stops a decode that hangs, from another thread, where the engine can (a process
        engine kills its process, an ONNX Runtime call is terminated; a llama.cpp decode in
        a thread can't be stopped)."""

    def close(self) -> None:
        """Frees the engine's memory."""


def gives_token_states(runtime: Runtime) -> bool:
    """Whether the runtime's engines give token states for its model (an attribute
    ``token_states`` of runtimes that can; llama.cpp's cannot)."""
    return bool(getattr(runtime, "token_states", False))


class EngineDied(RuntimeError):
    """The engine's process ended (crashed or was killed): the worker must be replaced."""


class Runtime(Protocol):
    """A model loaded by an engine backend (llama.cpp, or a fake in unit tests): its
    tokenizer and metadata, and a new :class:`Engine` for each worker."""

    engine_name: str  # "llama.cpp", "onnxruntime": what /v1/models reports

    @property
    def dimensions(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def new_engine(self) -> Engine: ...

    def tokenize(self, text: bytes) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def close(self) -> None: ...


# How a model's Runtime is made: the server passes llama.cpp's, tests a fake.
RuntimeLoader = Callable[[ModelInfo, EngineSettings, LoadOptions], Runtime]
