"""The ONNX Runtime engine for BERT-style encoders (CPU): exact vectors, faster than llama.cpp.

:class:`OnnxRuntime` builds the model's ONNX graph once from its GGUF tensors
(:mod:`embedd_server.engines.onnx_graph`); each worker gets an :class:`OnnxEngine`, an ONNX
Runtime session of its own on one intra-op thread: in a worker process of its own by default
(``worker_processes``, as llama.cpp's contexts), or in the worker's thread (ORT releases the
GIL while it computes). A call sorts its sequences by length and runs
them in padded batches, each padded only to its own longest sequence.

A cross-encoder's graph ends in its classifier head: the engine's rows are then its raw
logits, one per label, and a BERT cross-encoder's graph takes ``token_type_ids`` (built from
the pack's token type starts), which llama.cpp cannot.

Which engine serves a model is chosen in :mod:`embedd_server.engines.choice`.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from embedd_server.compute.engine import Engine, EngineDied, FloatMatrix
from embedd_server.engines.onnx_graph import (
    HIDDEN_OUTPUT_NAME,
    META_MAX_POSITIONS,
    META_POOLING,
    META_VOCAB_SIZE,
    OUTPUT_NAME,
    POOLING_MASK_NAME,
    quantize_int8,
)
from embedd_server.engines.onnx_models import load_gguf
from embedd_server.engines.process import EngineSpec, ProcessEngine
from embedd_server.errors import ModelLoadError
from embedd_server.model.vocabulary import file_vocabulary

ENGINE_NAME = "onnxruntime"
GraphOptimization = Literal["disable", "basic", "extended", "all"]
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class EngineAborted(EngineDied):
    """The engine was aborted (a hung call, stopped by the watchdog) or closed."""


class OnnxEngine:
    """One worker's engine: an ONNX Runtime session that embeds token sequences.

    Not thread-safe: one thread calls :meth:`embed_batch`; :meth:`abort` may come from
    another (it sets ORT's terminate flag, which the running call checks between nodes).
    """

    def __init__(
        self,
        model: onnx.ModelProto | bytes | str | os.PathLike[str],
        *,
        threads: int = 1,
        batch_size: int = 32,
        max_batch_tokens: int = 8192,
        optimization: GraphOptimization = "all",
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        """``threads`` is ORT's intra-op pool size (1: run on the calling thread only).
        A batch holds at most ``batch_size`` sequences and ``max_batch_tokens`` padded tokens.
        """
        if batch_size < 1 or max_batch_tokens < 1 or threads < 1:
            raise ValueError("batch_size, max_batch_tokens and threads must be positive")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if threads > 1:
            # Workers share the cores: a thread that spins while waiting for work takes a core
            # from the other worker, and throughput collapses; without spinning a lone request
            # still uses every core (measured: docs/design.md, "Engines").
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _OPT_LEVELS[optimization]
        options.log_severity_level = 3  # errors only
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif not isinstance(model, bytes):
            model = os.fspath(model)
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            model, options, providers=list(providers)
        )
        self._run_options = ort.RunOptions()
        self._aborted = threading.Event()
        meta = self._session.get_modelmeta().custom_metadata_map
        self._max_positions = int(meta.get(META_MAX_POSITIONS, "0")) or None
        self._vocab_size = int(meta.get(META_VOCAB_SIZE, "0")) or None
        self.pooling = meta.get(META_POOLING)
        input_names = {i.name for i in self._session.get_inputs()}
        self._token_types = "token_type_ids" in input_names
        self._pooling_mask = POOLING_MASK_NAME in input_names  # include_prompt: false
        outputs = {o.name: o for o in self._session.get_outputs()}
        self._dimensions = int(outputs[OUTPUT_NAME].shape[1])
        # An encoder's graph also gives every token's last hidden state (TEI's /embed_all).
        self.gives_token_states = HIDDEN_OUTPUT_NAME in outputs
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

    @property
    def dimensions(self) -> int:
        """Length of the vectors embed_batch() returns."""
        return self._dimensions

    @property
    def alive(self) -> bool:
        """False once the engine was aborted or closed."""
        return self._session is not None and not self._aborted.is_set()

    def embed_batch(
        self,
        sequences: Sequence[Sequence[int]],
        pooling_starts: Sequence[int] | None = None,
        token_type_starts: Sequence[int] | None = None,
    ) -> FloatMatrix:
        """The pooled (not normalized) vectors of token sequences, one row each, in order.

        Sequences are token ids with the special tokens already in place. They are run
        sorted by length in padded batches; each batch is padded to its own longest.
        ``pooling_starts`` (a graph built with a pooling mask only): per sequence, the first
        token the mean counts. ``token_type_starts``: per sequence, the first token of type 1
        (a graph with a ``token_type_ids`` input only).
        """
        session = self._session
        if session is None or self._aborted.is_set():
            raise EngineAborted("the engine was aborted or closed")
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        out = np.empty((len(sequences), self._dimensions), dtype=np.float32)
        if len(sequences) == 0:
            return out
        self._check_lengths(lengths)
        starts = self._check_starts(pooling_starts, lengths)
        types = self._check_type_starts(token_type_starts, lengths)
        order = np.argsort(lengths, kind="stable")
        # All batches are padded (and their ids checked) before any is run.
        batches = [(rows, self._pad(sequences, rows)) for rows in self._batches(order, lengths)]
        for rows, (ids, mask) in batches:
            type_ids = None if types is None else self._type_ids(mask, types, rows)
            out[rows] = self._run(session, ids, mask, self._pool_mask(mask, starts, rows), type_ids)
        return out

    def token_states(self, sequences: Sequence[Sequence[int]]) -> FloatMatrix:
        """Every token's last hidden state (the encoder's output before pooling), the
        sequences' tokens one row each, in order: ``[total tokens, hidden size]``."""
        session = self._session
        if session is None or self._aborted.is_set():
            raise EngineAborted("the engine was aborted or closed")
        if not self.gives_token_states:
            raise ValueError("this graph was built without its last_hidden_state output")
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        if len(sequences) == 0:
            return np.empty((0, 0), dtype=np.float32)
        self._check_lengths(lengths)
        order = np.argsort(lengths, kind="stable")
        batches = [(rows, self._pad(sequences, rows)) for rows in self._batches(order, lengths)]
        states: list[FloatMatrix] = [np.empty(0, dtype=np.float32)] * len(sequences)
        for rows, (ids, mask) in batches:
            hidden = self._run(session, ids, mask, output=HIDDEN_OUTPUT_NAME)
            for row, index in enumerate(rows):
                states[index] = hidden[row, : lengths[index]]
        return np.concatenate(states)

    def _check_type_starts(
        self, token_type_starts: Sequence[int] | None, lengths: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64] | None:
        if token_type_starts is None:
            return None
        starts = np.asarray(token_type_starts, dtype=np.int64)
        if starts.shape != lengths.shape or (starts < 0).any() or (starts > lengths).any():
            raise ValueError("token type starts must lie in [0, length] of each sequence")
        if not (starts < lengths).any():
            return None  # one segment each: every token has type 0
        if not self._token_types:
            raise ValueError("this model has one token type; a second segment needs type 1")
        return starts

    @staticmethod
    def _type_ids(
        mask: npt.NDArray[np.int64], starts: npt.NDArray[np.int64], rows: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.int64]:
        """Token types of a padded batch: 1 from each row's start to its end, else 0."""
        after = np.arange(mask.shape[1]) >= starts[rows][:, None]
        type_ids: npt.NDArray[np.int64] = (after & (mask == 1)).astype(np.int64)
        return type_ids

    def _check_starts(
        self, pooling_starts: Sequence[int] | None, lengths: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64] | None:
        if pooling_starts is None:
            return None
        starts = np.asarray(pooling_starts, dtype=np.int64)
        if starts.shape != lengths.shape or (starts < 0).any() or (starts > lengths).any():
            raise ValueError("pooling starts must lie in [0, length] of each sequence")
        if starts.any() and not self._pooling_mask:
            raise ValueError("this graph pools every token; it was not built to skip prompts")
        return starts

    def _pool_mask(
        self,
        mask: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64] | None,
        rows: npt.NDArray[np.intp],
    ) -> npt.NDArray[np.int64] | None:
        """The mean's mask of a padded batch: attention's, less each row's first tokens."""
        if not self._pooling_mask:
            return None
        if starts is None:
            return mask
        pool = mask.copy()
        pool[np.arange(pool.shape[1]) < starts[rows][:, None]] = 0
        return pool

    def abort(self) -> None:
        """Stops a running call (it raises :class:`EngineAborted`) and every later one."""
        self._aborted.set()
        self._run_options.terminate = True

    def close(self) -> None:
        """Frees the session; the engine computes no more."""
        self._session = None

    def _check_lengths(self, lengths: npt.NDArray[np.int64]) -> None:
        if int(lengths.min()) < 1:
            raise ValueError("an empty token sequence cannot be embedded")
        if self._max_positions is not None and int(lengths.max()) > self._max_positions:
            raise ValueError(
                f"a sequence of {int(lengths.max())} tokens exceeds the model's "
                f"{self._max_positions} positions"
            )

    def _batches(
        self, order: npt.NDArray[np.intp], lengths: npt.NDArray[np.int64]
    ) -> Iterator[npt.NDArray[np.intp]]:
        """Consecutive runs of the length-sorted rows, within both batch limits."""
        start, n = 0, len(order)
        while start < n:
            end = start + 1
            while (
                end < n
                and end - start < self.batch_size
                and (end - start + 1) * int(lengths[order[end]]) <= self.max_batch_tokens
            ):
                end += 1
            yield order[start:end]
            start = end

    def _pad(
        self, sequences: Sequence[Sequence[int]], rows: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Token ids and attention mask of ``rows``, padded to the longest of them."""
        width = max(len(sequences[i]) for i in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, index in enumerate(rows):
            sequence = sequences[index]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        if self._vocab_size is not None and (ids.min() < 0 or ids.max() >= self._vocab_size):
            raise ValueError(f"token ids must lie in [0, {self._vocab_size})")
        return ids, mask

    def _run(
        self,
        session: ort.InferenceSession,
        ids: npt.NDArray[np.int64],
        mask: npt.NDArray[np.int64],
        pool_mask: npt.NDArray[np.int64] | None = None,
        type_ids: npt.NDArray[np.int64] | None = None,
        *,
        output: str = OUTPUT_NAME,
    ) -> FloatMatrix:
        feed = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feed["token_type_ids"] = np.zeros_like(ids) if type_ids is None else type_ids
        if pool_mask is not None:
            feed[POOLING_MASK_NAME] = pool_mask
        try:
            (vectors,) = session.run([output], feed, self._run_options)
        except Exception as exc:
            if self._aborted.is_set():
                raise EngineAborted("the engine was aborted during a call") from exc
            raise
        return np.asarray(vectors, dtype=np.float32)


class OnnxRuntime:
    """A BERT GGUF on ONNX Runtime: what the registry gets from loading it.

    The graph is built once here from the GGUF's tensors. With ``processes`` it is written to
    a file that each worker process opens a session on (a crash costs one worker, as with
    llama.cpp); otherwise each worker's session runs in its thread. The vocabulary is the
    file's (model/vocabulary.py: its tokenizer.json, else llama.cpp's without the weights).
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        max_batch_tokens: int,
        int8: bool = False,
        processes: bool = False,
        log_json: bool = False,
        pool_from_starts: bool = False,
    ) -> None:
        """``pool_from_starts``: the graph takes a pooling mask, so the mean can leave out a
        prompt's tokens (a model with ``include_prompt: false``)."""
        try:
            source = load_gguf(path)
            # A cross-encoder with two token types (BERT) scores a pair whose document is
            # type 1: its graph takes the types; an encoder's texts are all type 0.
            # An encoder's graph also outputs its last hidden state, for TEI's /embed_all
            # (pooled calls do not fetch it: their speed is the same).
            self.token_states = source.pooling not in ("rank", "splade")
            model = source.build(
                pooling_mask_input=pool_from_starts,
                token_type_input=source.pooling == "rank" and source.token_types > 1,
                hidden_output=self.token_states,
            )
            if int8:
                model = quantize_int8(model)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"ONNX Runtime cannot serve {path.name}: {exc}") from None
        self._model = model.SerializeToString()
        self._threads = threads
        self._max_batch_tokens = max_batch_tokens
        self.int8 = int8
        # int8 vectors differ from the reference: /v1/models says so.
        self.engine_name = f"{ENGINE_NAME}-int8" if int8 else ENGINE_NAME
        self.vocab = file_vocabulary(path)
        # A cross-encoder's rows are its logits, one per label.
        self.dimensions = source.dimensions
        self._spec: EngineSpec | None = None
        if processes:
            with tempfile.NamedTemporaryFile(
                prefix=f"embedd-{path.stem}-", suffix=".onnx", delete=False
            ) as graph_file:
                graph_file.write(self._model)
            self._model = b""  # the worker processes read the file; this process needs none
            self._spec = EngineSpec(
                path=str(path),
                max_tokens=max_batch_tokens,
                max_sequences=0,
                n_threads=threads,
                n_gpu_layers=0,
                log_json=log_json,
                engine=self.engine_name,
                onnx_path=graph_file.name,
            )

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def new_engine(self) -> Engine:
        if self._spec is not None:
            return ProcessEngine(self._spec)
        return OnnxEngine(
            self._model, threads=self._threads, max_batch_tokens=self._max_batch_tokens
        )

    def tokenize(self, text: bytes) -> list[int]:
        return self.vocab.tokenize(text)

    def token_text(self, token_id: int) -> str:
        return self.vocab.token_text(token_id)

    def close(self) -> None:
        self.vocab.close()
        if self._spec is not None:
            Path(self._spec.onnx_path).unlink(missing_ok=True)
