"""A fake engine behind the same interface as llama.cpp's, for fast unit tests.

Its vectors are a deterministic function of the token ids (so batching, ordering and
streaming can be checked exactly), and it can be told to fail or to be slow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from embedd_server.core.catalog import (
    HF_TOKENIZER_KEY,
    MAX_SEQ_LENGTH_KEY,
    NORMALIZE_KEY,
    ModelInfo,
)
from embedd_server.core.engine_settings import EngineSettings, LoadOptions
from embedd_server.engines.base import Engine, EngineDied

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "runs", "fast", "slow"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def fake_tokenizer_json() -> str:
    """A tiny BERT-like word-level tokenizer: [CLS] words [SEP]."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer.to_str()


def write_fake_gguf(
    path: Path,
    dimensions: int = 8,
    max_seq_length: int = 16,
    pooling: int = 1,
    padding_bytes: int = 0,
) -> Path:
    """A GGUF file with a model's metadata (no tensors): enough for the catalogue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_uint32("bert.embedding_length", dimensions)
    writer.add_uint32("bert.context_length", 512)
    writer.add_uint32("bert.pooling_type", pooling)
    writer.add_uint32("general.file_type", 1)
    writer.add_array("tokenizer.ggml.tokens", SPECIALS + WORDS)
    writer.add_string(HF_TOKENIZER_KEY, fake_tokenizer_json())
    writer.add_uint32(MAX_SEQ_LENGTH_KEY, max_seq_length)
    writer.add_bool(NORMALIZE_KEY, True)
    if padding_bytes:  # makes the file this much bigger (memory-budget tests)
        writer.add_string("test.padding", "x" * padding_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_vector(token_ids: Sequence[int], dimensions: int) -> npt.NDArray[np.float32]:
    """The fake engine's deterministic, un-normalized vector of a sequence."""
    seed = abs(hash(tuple(token_ids))) % (2**32)
    return (np.random.default_rng(seed).standard_normal(dimensions) * 3).astype(np.float32)


class WorkerKilled(BaseException):
    """Not an Exception: ends the worker thread, like a crash would."""


class FakeEngine:
    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime

    @property
    def dimensions(self) -> int:
        return self._runtime.dimensions

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        runtime = self._runtime
        with runtime.lock:
            runtime.calls.extend(list(ids) for ids in sequences)
            runtime.batches.append(len(sequences))
        runtime.started.set()
        if runtime.delay:
            time.sleep(runtime.delay * len(sequences))
        runtime.release.wait()
        for token_ids in sequences:
            if runtime.fail_on is not None and runtime.fail_on in token_ids:
                raise RuntimeError("fake engine failure: secret internals")
            if runtime.die_on is not None and runtime.die_on in token_ids:
                raise WorkerKilled("the worker thread dies")
            if runtime.crash_process_on is not None and runtime.crash_process_on in token_ids:
                with runtime.lock:
                    runtime.process_crashes += 1
                raise EngineDied("fake engine process ended (exit code -11)")
            if runtime.hang_on is not None and runtime.hang_on in token_ids:
                runtime.unhang.wait(30)  # a decode that never ends (until the test ends it)
        return np.stack([fake_vector(ids, runtime.dimensions) for ids in sequences])

    @property
    def alive(self) -> bool:
        return True

    def abort(self) -> None:
        """Like a thread engine: a hung decode can't be stopped from outside."""

    def close(self) -> None:
        pass


class FakeRuntime:
    """What the registry gets from loading a model; records every computed sequence."""

    instances: ClassVar[list[FakeRuntime]] = []

    def __init__(self, info: ModelInfo, settings: EngineSettings, options: LoadOptions) -> None:
        self.info = info
        self.options = options
        self.dimensions = info.dimensions
        self.vocab_size = info.vocab_size
        self.calls: list[list[int]] = []
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self.fail_on: int | None = None
        self.die_on: int | None = None
        self.crash_process_on: int | None = None  # like a segfault in an engine process
        self.process_crashes = 0
        self.hang_on: int | None = None
        self.refuse_engines = False
        self.unhang = threading.Event()
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.closed = False
        FakeRuntime.instances.append(self)

    def new_engine(self) -> Engine:
        if self.refuse_engines:
            raise RuntimeError("no more engines")
        return FakeEngine(self)

    def tokenize(self, text: bytes) -> list[int]:
        return [2, *(4 + (len(word) % len(WORDS)) for word in text.split()), 3]

    def token_text(self, token_id: int) -> str:
        return (SPECIALS + WORDS)[token_id]

    def close(self) -> None:
        self.closed = True
