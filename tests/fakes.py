"""A fake engine behind the same interface as llama.cpp's, for fast unit tests.

Its vectors are a deterministic function of the token ids (so batching, ordering and
streaming can be checked exactly). What it does with a batch is the test's own
:data:`Behaviour`, handed to a :class:`FakeLoader` the way httpx's ``MockTransport`` takes a
handler: ``ServerThread.with_fake_models(path, loader=FakeLoader(on_token(DOG, engine_error)))``.
The loader keeps the runtimes it made, so a test reaches them without any global.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import gguf
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from embedd_server.compute.engine import Engine, EngineDied
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.model.catalog import (
    HF_TOKENIZER_KEY,
    INCLUDE_PROMPT_KEY,
    MAX_SEQ_LENGTH_KEY,
    NORMALIZE_KEY,
    PAIR_TOKEN_TYPES_KEY,
    PROBLEM_TYPE_KEY,
    TASK_KEY,
    ModelInfo,
)

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "runs", "fast", "slow"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def fake_tokenizer_json(*, closing: bool = True) -> str:
    """A tiny BERT-like word-level tokenizer: [CLS] words [SEP] (without ``closing``:
    [CLS] words, as a decoder that only adds BOS)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]" if closing else "[CLS] $A",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer.to_str()


def write_fake_gguf(
    path: Path,
    dimensions: int = 8,
    max_seq_length: int = 16,
    pooling: int = 1,
    *,
    padding_bytes: int = 0,
    include_prompt: bool = True,
    tokenizer_json: str | None = None,
    pair_token_types: bool | None = None,
    task: str | None = None,
    labels: Sequence[str] = (),
    problem_type: str | None = None,
    hf_tokenizer: bool = True,
) -> Path:
    """A GGUF file with a model's metadata (no tensors): enough for the catalogue.

    ``task`` (``classify``, ``sparse``) is written as ``embedd import`` writes it; ``labels``
    are a classifier's output labels (pooling 4). Without ``hf_tokenizer`` the file has no
    tokenizer.json, as one from llama.cpp's converter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_uint32("bert.embedding_length", dimensions)
    writer.add_uint32("bert.context_length", 512)
    writer.add_uint32("bert.pooling_type", pooling)
    writer.add_uint32("general.file_type", 1)
    writer.add_array("tokenizer.ggml.tokens", SPECIALS + WORDS)
    if hf_tokenizer:  # without: as a file of llama.cpp's converter, its vocabulary only
        writer.add_string(HF_TOKENIZER_KEY, tokenizer_json or fake_tokenizer_json())
    writer.add_uint32(MAX_SEQ_LENGTH_KEY, max_seq_length)
    writer.add_bool(NORMALIZE_KEY, True)
    writer.add_bool(INCLUDE_PROMPT_KEY, include_prompt)
    if pair_token_types is not None:  # a cross-encoder's (pooling 4)
        writer.add_bool(PAIR_TOKEN_TYPES_KEY, pair_token_types)
    if task is not None:
        writer.add_string(TASK_KEY, task)
    if labels:
        writer.add_array("bert.classifier.output_labels", list(labels))
    if problem_type is not None:
        writer.add_string(PROBLEM_TYPE_KEY, problem_type)
    if padding_bytes:  # makes the file this much bigger (memory-budget tests)
        writer.add_string("test.padding", "x" * padding_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FloatMatrix = npt.NDArray[np.float32]


def fake_vector(token_ids: Sequence[int], dimensions: int) -> FloatMatrix:
    """The fake engine's deterministic, un-normalized vector of a sequence."""
    seed = abs(hash(tuple(token_ids))) % (2**32)
    return (np.random.default_rng(seed).standard_normal(dimensions) * 3).astype(np.float32)


def fake_token_states(token_ids: Sequence[int], dimensions: int) -> FloatMatrix:
    """The fake engine's hidden state of each token of a sequence: token j's is
    :func:`fake_vector` of the first j + 1 ids."""
    return np.stack([fake_vector(token_ids[: j + 1], dimensions) for j in range(len(token_ids))])


# What a fake engine does with one batch: (token sequences, dimensions) -> one vector per
# sequence. It may raise, sleep or block first; see fake_vectors, on_token, gated and slow.
Behaviour = Callable[[Sequence[Sequence[int]], int], FloatMatrix]


def fake_vectors(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
    """The default behaviour: each sequence's :func:`fake_vector`."""
    return np.stack([fake_vector(ids, dimensions) for ids in sequences])


FAKE_VOCAB = len(SPECIALS) + len(WORDS)  # a fake sparse encoder's dimensions


def sparse_vectors(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
    """A fake SPLADE engine: weight 1 + id/10 for each vocabulary entry the text holds, else
    0 (the sparse encoder's row is the whole vocabulary)."""
    rows = np.zeros((len(sequences), dimensions), dtype=np.float32)
    for row, ids in zip(rows, sequences, strict=True):
        for token in ids:
            row[token] = 1.0 + token / 10
    return rows


def task_behaviour(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
    """Sparse rows for a model as wide as the fake vocabulary, else :func:`fake_vectors`."""
    if dimensions == FAKE_VOCAB:
        return sparse_vectors(sequences, dimensions)
    return fake_vectors(sequences, dimensions)


def on_token(token: int, action: Callable[[], object], then: Behaviour = fake_vectors) -> Behaviour:
    """Calls ``action`` (which may raise or block) on a batch holding ``token``; every batch
    that gets past it is computed by ``then``."""

    def behaviour(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
        if any(token in ids for ids in sequences):
            action()
        return then(sequences, dimensions)

    return behaviour


def gated(gate: threading.Event, then: Behaviour = fake_vectors) -> Behaviour:
    """Every batch waits inside its decode until ``gate`` is set (clear it to hold the
    workers busy, set it to let them go)."""

    def behaviour(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
        gate.wait()
        return then(sequences, dimensions)

    return behaviour


def slow(seconds_per_input: float, then: Behaviour = fake_vectors) -> Behaviour:
    """Each batch takes ``seconds_per_input`` per sequence before ``then`` computes it."""

    def behaviour(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
        time.sleep(seconds_per_input * len(sequences))
        return then(sequences, dimensions)

    return behaviour


class WorkerKilled(BaseException):
    """Not an Exception: ends the worker thread, like a crash would."""


def engine_error() -> NoReturn:
    """An engine that fails (the worker survives, its callers get INTERNAL)."""
    raise RuntimeError("fake engine failure: secret internals")


def worker_killed() -> NoReturn:
    """The worker thread dies (it is replaced, its callers get UNAVAILABLE)."""
    raise WorkerKilled("the worker thread dies")


def process_crash() -> NoReturn:
    """The engine's process ends, like a segfault in llama.cpp."""
    raise EngineDied("fake engine process ended (exit code -11)")


class FakeEngine:
    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime

    @property
    def dimensions(self) -> int:
        return self._runtime.dimensions

    def embed(self, pack: Pack) -> FloatMatrix:
        """Every token's :func:`fake_token_states` for a token states pack, sequences one
        after another; else the runtime's behaviour, each sequence and its starts recorded."""
        sequences = pack.sequences()
        if pack.token_states:
            return np.concatenate(
                [fake_token_states(ids, self._runtime.dimensions) for ids in sequences]
            )
        runtime = self._runtime
        with runtime.lock:
            runtime.calls.extend(sequences)
            runtime.pooling_starts.extend(pack.pooling_starts.tolist())
            runtime.token_type_starts.extend(pack.token_type_starts.tolist())
        return runtime.behaviour(sequences, runtime.dimensions)

    @property
    def alive(self) -> bool:
        return True

    def abort(self) -> None:
        """Like a thread engine: a hung decode can't be stopped from outside."""

    def close(self) -> None:
        pass


class FakeRuntime:
    """What the registry gets from loading a model; records every sequence it is given."""

    engine_name = "fake"
    token_states = True  # its engines give token states (TEI's /embed_all)

    def __init__(
        self,
        info: ModelInfo,
        options: LoadOptions,
        behaviour: Behaviour = fake_vectors,
        max_engines: int | None = None,
    ) -> None:
        self.info = info
        self.options = options
        # A cross-encoder's engine gives one logit per label, a sparse encoder's one weight
        # per vocabulary entry, as the real engines do (the catalogue's dimensions).
        self.dimensions = info.dimensions
        self.vocab_size = info.vocab_size
        self.behaviour = behaviour
        self.calls: list[list[int]] = []
        self.pooling_starts: list[int] = []  # one per call, in the order of ``calls``
        self.token_type_starts: list[int] = []  # likewise
        self.lock = threading.Lock()
        self.closed = False
        self._engines_left = max_engines

    def new_engine(self) -> Engine:
        with self.lock:
            if self._engines_left is not None:
                if self._engines_left <= 0:
                    raise RuntimeError("no more engines")
                self._engines_left -= 1
        return FakeEngine(self)

    def tokenize(self, text: bytes) -> list[int]:
        return [2, *(4 + (len(word) % len(WORDS)) for word in text.split()), 3]

    def token_text(self, token_id: int) -> str:
        return (SPECIALS + WORDS)[token_id]

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    """A RuntimeLoader whose models all run ``behaviour``; it keeps the runtimes it made, in
    order (``runtimes[0]`` of a server is its default model, loaded at start).

    ``max_engines``: engines each runtime can make (its workers, then replacements) before
    new_engine() fails; None is no limit.
    """

    def __init__(
        self, behaviour: Behaviour = fake_vectors, *, max_engines: int | None = None
    ) -> None:
        self.behaviour = behaviour
        self.max_engines = max_engines
        self.runtimes: list[FakeRuntime] = []

    def __call__(
        self, info: ModelInfo, settings: EngineSettings, options: LoadOptions
    ) -> FakeRuntime:
        runtime = FakeRuntime(info, options, self.behaviour, self.max_engines)
        self.runtimes.append(runtime)
        return runtime
