"""What every engine is: the protocol a worker calls, and the failure that retires a worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.model.catalog import ModelInfo

# Vectors, one row each: what engines return and every layer above passes on.
FloatMatrix = npt.NDArray[np.float32]


class Engine(Protocol):
    """One worker's private engine. Not thread-safe: one thread calls it."""

    @property
    def dimensions(self) -> int:
        """Length of the vectors embed() returns."""

    def embed_batch(
        self,
        sequences: Sequence[Sequence[int]],
        pooling_starts: Sequence[int] | None = None,
        token_type_starts: Sequence[int] | None = None,
    ) -> FloatMatrix:
        """The pooled (not normalized) vectors of token sequences, one row each; for a
        cross-encoder (pooling ``rank``), each sequence's raw logits, one per label.

        ``pooling_starts[i]``: the first token of sequence i that pooling counts (None: all
        from the first). Only an engine made for a model that pools without its prompt
        (``include_prompt: false``) accepts starts other than 0; others raise ValueError.
        ``token_type_starts[i]``: the first token of sequence i with token type 1 (a pair's
        second segment; None: every token has type 0); an engine that cannot give a token
        type 1 raises ValueError rather than compute with the wrong one."""

    @property
    def alive(self) -> bool:
        """False once the engine can no longer compute (its process has ended)."""

    def abort(self) -> None:
        """Stops a decode that hangs, from another thread, where the engine can (a process
        engine kills its process; a thread's decode can't be stopped)."""

    def close(self) -> None:
        """Frees the engine's memory."""


@runtime_checkable
class TokenStatesEngine(Engine, Protocol):
    """An engine that also gives every token's last hidden state (TEI's /embed_all): the
    ONNX Runtime engine of an encoder. Its runtime says so with ``token_states = True``
    (:func:`gives_token_states`)."""

    def token_states(self, sequences: Sequence[Sequence[int]]) -> FloatMatrix:
        """Every token's last hidden state, the sequences' tokens one row each, in order:
        ``[total tokens, hidden size]``, not normalized."""


def gives_token_states(runtime: Runtime) -> bool:
    """Whether the runtime's engines are :class:`TokenStatesEngine` for its model (an
    attribute ``token_states`` of runtimes that can; llama.cpp's cannot)."""
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
