"""The ONNX Runtime engine for BERT-style encoders (CPU): exact vectors, faster than llama.cpp.

:class:`OnnxRuntime` builds the model's ONNX graph once from its GGUF tensors
(:mod:`embedd_server.engines.onnx_graph`) and opens one session on it; each worker gets an
:class:`OnnxEngine` that runs its packs on that shared session from the worker's thread (ORT
releases the GIL while it computes), by default; with ``worker_processes`` each worker is a
process with a session of its own, as llama.cpp's contexts are. A BERT graph takes packed rows
(several short sequences side by side in a row, each attending to its own tokens: see
``_layouts``); on other graphs a call sorts its sequences by length and runs them in padded
batches, each padded only to its own longest sequence.

A cross-encoder's graph ends in its classifier head: the engine's rows are then its raw
logits, one per label, and a BERT cross-encoder's graph takes ``token_type_ids`` (built from
the pack's token type starts), which llama.cpp cannot.

Which engine serves a model is chosen in :mod:`embedd_server.engines.choice`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from embedd_server.compute.engine import Engine, EngineDied, FloatMatrix
from embedd_server.compute.pack import Pack
from embedd_server.engines.onnx_graph import (
    HIDDEN_OUTPUT_NAME,
    META_MAX_POSITIONS,
    META_POOLING,
    META_VOCAB_SIZE,
    OUTPUT_NAME,
    POOLING_MASK_NAME,
    POOLING_WEIGHTS_NAME,
    POSITION_IDS_NAME,
    SEQUENCE_IDS_NAME,
    quantize_int8,
)
from embedd_server.engines.onnx_graph import (
    ModelSource as BertSource,
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


ModelSource = onnx.ModelProto | bytes | str | os.PathLike[str]


def open_session(
    model: ModelSource,
    *,
    threads: int = 1,
    spinning: bool = False,
    optimization: GraphOptimization = "all",
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An ONNX Runtime session on a graph. ``threads`` is its intra-op pool (1: each call
    runs on its calling thread only); ``spinning``: whether the pool's threads spin for work
    between a call's operators (they stop when the last running call returns), else they
    sleep. One session may serve several threads at once: ORT's ``Run`` is thread-safe and
    releases the GIL."""
    if threads < 1:
        raise ValueError("threads must be positive")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if spinning:
        # An idle server burns no core: spinning ends with the last running call.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        # Workers share the cores: a thread that spins while waiting for work takes a core
        # from the other workers; without spinning a lone request still uses every core
        # (measured: docs/design.md, "Engines").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    options.log_severity_level = 3  # errors only
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    # ORT fuses a packed graph's residual Add + LayerNormalization into SkipLayerNormalization,
    # whose CPU kernel took 449 ms where the two took ~200 (all-MiniLM, 20 packs of 64
    # sentences, ORT's profiler; docs/design.md "Packed rows").
    return ort.InferenceSession(
        model, options, providers=list(providers), disabled_optimizers=["SkipLayerNormFusion"]
    )


# ONNX Runtime maps a tensor's external data into memory (rather than reading it into a
# buffer of its own) when its offset is a multiple of the allocation granularity: 64 KiB
# covers Linux's pages and Windows' granularity.
MAPPED_ALIGNMENT = 1 << 16
MAPPED_MIN_BYTES = 1 << 12  # smaller tensors stay in the graph: a mapping per tensor costs a page


def write_mapped_graph(model: onnx.ModelProto, directory: Path) -> Path:
    """Writes ``model`` to ``directory`` as ``graph.onnx`` plus ``weights.bin``, its large
    tensors' data aligned so that every session opened on it maps them from the file: the
    sessions share one copy of the weights (the page cache's), where a graph with its
    weights inside gives each session a copy of its own (all-MiniLM: one session +81 MiB
    against +137-147, two +147 against +262-274; docs/design.md "Workers"). The tensors of
    ``model`` are moved out: it is left without their data."""
    weights_name = "weights.bin"
    offset = 0
    with open(directory / weights_name, "wb") as weights:
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) < MAPPED_MIN_BYTES:
                continue
            padding = -offset % MAPPED_ALIGNMENT
            weights.write(bytes(padding))
            offset += padding
            weights.write(tensor.raw_data)
            for key, value in (
                ("location", weights_name),
                ("offset", str(offset)),
                ("length", str(len(tensor.raw_data))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(tensor.raw_data)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
    graph_path = directory / "graph.onnx"
    graph_path.write_bytes(model.SerializeToString())
    return graph_path


class _Padded(NamedTuple):
    """One padded batch of a pack: which sequences, their ids and attention mask, and where
    each unpadded token sits in the pack (``positions``, the mask's true cells in order)."""

    rows: npt.NDArray[np.intp]
    ids: npt.NDArray[np.int64]
    mask: npt.NDArray[np.bool_]
    positions: npt.NDArray[np.int64]


class _Layout(NamedTuple):
    """One packed call: which of the pack's sequences it runs (``sequences``), and for each
    of their tokens (in that order) its index in the pack's tokens, its slot in the
    ``[rows, width]`` input, its place in its sequence and its sequence (an index into
    ``sequences``)."""

    sequences: npt.NDArray[np.intp]
    pack_tokens: npt.NDArray[np.int64]
    slots: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    sequence_of_token: npt.NDArray[np.int64]
    rows: int
    width: int

    @classmethod
    def of(
        cls,
        pack: Pack,
        sequences: npt.NDArray[np.intp],
        places: npt.NDArray[np.int64],
        rows: int,
        width: int,
    ) -> _Layout:
        """The layout of ``sequences`` whose first tokens go to slots ``places``."""
        lengths = pack.lengths[sequences].astype(np.int64)
        owner = np.repeat(np.arange(len(sequences)), lengths)
        firsts = np.cumsum(lengths) - lengths  # each sequence's first token in this layout
        positions = np.arange(int(lengths.sum())) - firsts[owner]
        pack_tokens = pack.offsets[sequences][owner] + positions
        return cls(sequences, pack_tokens, places[owner] + positions, positions, owner, rows, width)


class RunningCalls:
    """How many engines of one model are in a call now (shared by the model's engines): an
    engine whose call starts with no other running takes the session of every core."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @contextlib.contextmanager
    def enter(self) -> Iterator[int]:
        """Counts this call while it runs; yields how many run, this one included."""
        with self._lock:
            self._count += 1
            count = self._count
        try:
            yield count
        finally:
            with self._lock:
                self._count -= 1


class OnnxEngine:
    """One worker's engine: calls on an ONNX Runtime session that embed packs.

    The session is the engine's own (made from a graph) or one shared by every worker of the
    model (a session passed in: one copy of the weights). With ``alone`` (a session on every
    core, shared too) and ``running`` (the model's :class:`RunningCalls`), a call that starts
    while no other engine of the model computes runs on ``alone``; calls that overlap run on
    the single-threaded session, one core each (docs/design.md "Workers"). Each engine has its own
    ``RunOptions``, so :meth:`abort` (from the watchdog's thread: it sets ORT's terminate
    flag, which the running call checks between nodes) stops this engine's call only.
    One thread calls :meth:`embed`.
    """

    def __init__(
        self,
        model: ModelSource | ort.InferenceSession,
        *,
        threads: int = 1,
        batch_size: int = 32,
        max_batch_tokens: int = 8192,
        optimization: GraphOptimization = "all",
        providers: Sequence[str] = ("CPUExecutionProvider",),
        alone: ort.InferenceSession | None = None,
        running: RunningCalls | None = None,
    ) -> None:
        """``model``: a session to share, or a graph to open one on (with ``threads``,
        ``optimization`` and ``providers``: see :func:`open_session`). A batch holds at
        most ``batch_size`` sequences and ``max_batch_tokens`` padded tokens. ``alone`` and
        ``running``: see the class."""
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be positive")
        if not isinstance(model, ort.InferenceSession):
            model = open_session(
                model, threads=threads, optimization=optimization, providers=providers
            )
        self._session: ort.InferenceSession | None = model
        self._alone = alone
        self._running = running or RunningCalls()
        self._run_options = ort.RunOptions()
        self._aborted = threading.Event()
        meta = model.get_modelmeta().custom_metadata_map
        self._max_positions = int(meta.get(META_MAX_POSITIONS, "0")) or None
        self._vocab_size = int(meta.get(META_VOCAB_SIZE, "0")) or None
        self.pooling = meta.get(META_POOLING)
        input_names = {i.name for i in model.get_inputs()}
        self._token_types = "token_type_ids" in input_names
        self._pooling_mask = POOLING_MASK_NAME in input_names  # include_prompt: false
        # A packed graph runs a pack's sequences end to end, unpadded (build_bert_model).
        self._packed = POSITION_IDS_NAME in input_names
        outputs = {o.name: o for o in model.get_outputs()}
        self._dimensions = int(outputs[OUTPUT_NAME].shape[1])
        # An encoder's graph also gives every token's last hidden state (TEI's /embed_all).
        self.gives_token_states = HIDDEN_OUTPUT_NAME in outputs
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

    @property
    def dimensions(self) -> int:
        """Length of the vectors embed() returns."""
        return self._dimensions

    @property
    def alive(self) -> bool:
        """False once the engine was aborted or closed."""
        return self._session is not None and not self._aborted.is_set()

    def embed(self, pack: Pack) -> FloatMatrix:
        """The pack's pooled (not normalized) vectors, one row each, in order; with
        ``pack.token_states``, every token's last hidden state (the encoder's output before
        pooling), one row per token: ``[total tokens, hidden size]``.

        Sequences are token ids with the special tokens already in place. A packed graph
        runs them in rows that several share (:meth:`_layouts`); any other is run sorted by
        length in padded batches, each padded to its own longest, straight from the pack's
        flat tokens. Pooling starts other than 0 need a packed graph or one built with a
        pooling mask, a second segment a graph with a ``token_type_ids`` input.
        """
        with self._running.enter() as running:
            session = self._alone if running == 1 and self._alone is not None else self._session
            if session is None or self._aborted.is_set():
                raise EngineAborted("the engine was aborted or closed")
            return self._embed_on(session, pack)

    def _embed_on(self, session: ort.InferenceSession, pack: Pack) -> FloatMatrix:
        """:meth:`embed` on ``session``."""
        if pack.token_states and not self.gives_token_states:
            raise ValueError("this graph was built without its last_hidden_state output")
        if self._packed:
            return self._embed_packed(session, pack)
        if pack.token_states:
            return self._token_states(session, pack)
        out = np.empty((len(pack), self._dimensions), dtype=np.float32)
        if len(pack) == 0:
            return out
        self._check(pack)
        from_starts = pack.pools_from_starts
        if from_starts and not self._pooling_mask:
            raise ValueError("this graph pools every token; it was not built to skip prompts")
        two_segments = self._two_segments(pack)
        for batch in self._padded(pack):
            columns = np.arange(batch.ids.shape[1])
            type_ids = None
            if two_segments:  # type 1 from each row's start to its end, else 0
                type_ids = batch.mask & (columns >= pack.token_type_starts[batch.rows][:, None])
            pool_mask = None
            if self._pooling_mask:  # the mean's mask: attention's, less each row's prompt
                pool_mask = batch.mask
                if from_starts:
                    pool_mask = pool_mask & (columns >= pack.pooling_starts[batch.rows][:, None])
            out[batch.rows] = self._run(session, batch, pool_mask, type_ids)
        return out

    def _embed_packed(self, session: ort.InferenceSession, pack: Pack) -> FloatMatrix:
        """:meth:`embed` on a packed graph: one call per :meth:`_layouts` entry, whose rows
        each hold several sequences end to end."""
        if len(pack) == 0:
            return np.empty((0, 0 if pack.token_states else self._dimensions), np.float32)
        self._check(pack)
        two_segments = self._two_segments(pack)
        out: FloatMatrix | None = None
        for layout in self._layouts(pack):
            rows = self._run_layout(session, pack, layout, two_segments)
            if out is None:
                width = rows.shape[1]
                out = np.empty(
                    (len(pack.tokens) if pack.token_states else len(pack), width), np.float32
                )
            if pack.token_states:
                out[layout.pack_tokens] = rows[layout.slots]
            else:
                out[layout.sequences] = rows
        assert out is not None  # a pack of at least one sequence has a layout
        return out

    def _layouts(self, pack: Pack) -> Iterator[_Layout]:
        """The pack's sequences, longest first, placed in rows as wide as the longest of each
        call (first fit: a shorter one goes in the first row with room), a call holding at
        most ``max_batch_tokens`` slots (or one longer sequence)."""
        lengths = pack.lengths.tolist()
        order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        first = 0
        while first < len(order):
            width = lengths[order[first]]
            most_rows = max(1, self.max_batch_tokens // width)
            fills: list[int] = []
            places: list[int] = []  # each placed sequence's first slot, row * width + column
            end = first
            for index in order[first:]:
                length = lengths[index]
                row = next((r for r, fill in enumerate(fills) if fill + length <= width), None)
                if row is None:
                    if len(fills) == most_rows:
                        break
                    row = len(fills)
                    fills.append(0)
                places.append(row * width + fills[row])
                fills[row] += length
                end += 1
            yield _Layout.of(pack, np.array(order[first:end]), np.array(places), len(fills), width)
            first = end

    def _run_layout(
        self, session: ort.InferenceSession, pack: Pack, layout: _Layout, two_segments: bool
    ) -> FloatMatrix:
        """One call's pooled rows (or every slot's hidden state) for its layout."""
        shape = (layout.rows, layout.width)
        ids = np.zeros(shape, dtype=np.int64)
        ids.flat[layout.slots] = pack.tokens[layout.pack_tokens]
        positions = np.zeros(shape, dtype=np.int64)
        positions.flat[layout.slots] = layout.positions
        sequence_ids = np.full(shape, -1, dtype=np.int64)
        sequence_ids.flat[layout.slots] = layout.sequence_of_token
        feed: dict[str, npt.NDArray[Any]] = {
            "input_ids": ids,
            POSITION_IDS_NAME: positions,
            SEQUENCE_IDS_NAME: sequence_ids,
            POOLING_WEIGHTS_NAME: self._pooling_weights(pack, layout),
        }
        if self._token_types:
            types = np.zeros(shape, dtype=np.int64)
            if two_segments:
                starts = pack.token_type_starts[layout.sequences][layout.sequence_of_token]
                types.flat[layout.slots] = layout.positions >= starts
            feed["token_type_ids"] = types
        output = HIDDEN_OUTPUT_NAME if pack.token_states else OUTPUT_NAME
        return self._call(session, [output], feed)

    def _pooling_weights(self, pack: Pack, layout: _Layout) -> npt.NDArray[np.float32]:
        """``[sequences, slots]``: a mean's 1/n over each sequence's tokens from its pooling
        start on (none left: a zero row, as sentence-transformers' clamped count gives), or a
        1 at each sequence's first token (cls, a cross-encoder's head)."""
        weights = np.zeros((len(layout.sequences), layout.rows * layout.width), np.float32)
        owner = layout.sequence_of_token
        if self.pooling == "mean":
            starts = pack.pooling_starts[layout.sequences]
            pooled = layout.positions >= starts[owner]
            counts = (pack.lengths[layout.sequences] - starts).astype(np.float32)
            shares = np.float32(1.0) / np.maximum(counts, np.float32(1e-9))
            weights[owner[pooled], layout.slots[pooled]] = shares[owner[pooled]]
        else:
            firsts = layout.positions == 0
            weights[owner[firsts], layout.slots[firsts]] = 1.0
        return weights

    def _token_states(self, session: ort.InferenceSession, pack: Pack) -> FloatMatrix:
        """Every token's last hidden state, the pack's tokens one row each, in order."""
        if len(pack) == 0:
            return np.empty((0, 0), dtype=np.float32)
        self._check(pack)
        states: FloatMatrix | None = None
        for batch in self._padded(pack):
            hidden = self._run(session, batch, output=HIDDEN_OUTPUT_NAME)
            if states is None:
                states = np.empty((len(pack.tokens), hidden.shape[2]), dtype=np.float32)
            states[batch.positions] = hidden[batch.mask]
        assert states is not None  # a pack of at least one sequence has a batch
        return states

    def abort(self) -> None:
        """Stops this engine's running call (it raises :class:`EngineAborted`) and every
        later one; other engines on a shared session go on."""
        self._aborted.set()
        self._run_options.terminate = True

    def close(self) -> None:
        """Lets go of the session (a shared one lives on in its runtime); the engine
        computes no more."""
        self._session = None
        self._alone = None

    def _two_segments(self, pack: Pack) -> bool:
        """Whether the pack's sequences have a second segment (token type 1); ValueError
        where this model has one token type."""
        if pack.two_segments and not self._token_types:
            raise ValueError("this model has one token type; a second segment needs type 1")
        return pack.two_segments

    def _check(self, pack: Pack) -> None:
        """What the pack's validation can't know: this model's positions and vocabulary."""
        longest = int(pack.lengths.max())
        if self._max_positions is not None and longest > self._max_positions:
            raise ValueError(
                f"a sequence of {longest} tokens exceeds the model's "
                f"{self._max_positions} positions"
            )
        tokens = pack.tokens
        if self._vocab_size is not None and (
            int(tokens.min()) < 0 or int(tokens.max()) >= self._vocab_size
        ):
            raise ValueError(f"token ids must lie in [0, {self._vocab_size})")

    def _padded(self, pack: Pack) -> Iterator[_Padded]:
        """The pack's sequences sorted by length, in consecutive batches within both
        limits, each padded to its longest (vectorized: no loop over sequences)."""
        order = np.argsort(pack.lengths, kind="stable")
        sorted_lengths = pack.lengths[order].astype(np.int64)
        offsets = pack.offsets
        start = 0
        while start < len(order):
            window = sorted_lengths[start : start + self.batch_size]
            # k rows padded to the k-th length: a product that grows with k (sorted lengths).
            fits = np.arange(1, len(window) + 1) * window <= self.max_batch_tokens
            count = max(1, int(fits.sum()))
            rows = order[start : start + count]
            lengths = sorted_lengths[start : start + count]
            columns = np.arange(int(lengths[-1]))
            mask = columns < lengths[:, None]
            positions = (offsets[rows][:, None] + columns)[mask]
            ids = np.zeros(mask.shape, dtype=np.int64)
            ids[mask] = pack.tokens[positions]
            yield _Padded(rows, ids, mask, positions)
            start += count

    def _run(
        self,
        session: ort.InferenceSession,
        batch: _Padded,
        pool_mask: npt.NDArray[np.bool_] | None = None,
        type_ids: npt.NDArray[np.bool_] | None = None,
        *,
        output: str = OUTPUT_NAME,
    ) -> FloatMatrix:
        feed = {"input_ids": batch.ids, "attention_mask": batch.mask.astype(np.int64)}
        if self._token_types:
            feed["token_type_ids"] = (
                np.zeros_like(batch.ids) if type_ids is None else type_ids.astype(np.int64)
            )
        if pool_mask is not None:
            feed[POOLING_MASK_NAME] = pool_mask.astype(np.int64)
        return self._call(session, [output], feed)

    def _call(
        self, session: ort.InferenceSession, outputs: list[str], feed: dict[str, npt.NDArray[Any]]
    ) -> FloatMatrix:
        """One session call with this engine's run options; EngineAborted if it was aborted."""
        try:
            (vectors,) = session.run(outputs, feed, self._run_options)
        except Exception as exc:
            if self._aborted.is_set():
                raise EngineAborted("the engine was aborted during a call") from exc
            raise
        return np.asarray(vectors, dtype=np.float32)


def _release_freed_memory() -> None:
    """Hands the heap the load freed (the GGUF's tensors, the graph being built: ~70 MiB for
    all-MiniLM) back to the system; glibc keeps it otherwise. Nothing where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator keeps its own counsel


class OnnxRuntime:
    """A BERT GGUF on ONNX Runtime: what the registry gets from loading it.

    The graph is built once here from the GGUF's tensors. In threads (the default) the
    sessions are opened on it here and every worker's engine runs its calls on them (ORT's
    ``Run`` is thread-safe and releases the GIL; each engine keeps its own ``RunOptions``, so
    the watchdog's abort stops only its call): with several workers and cores, one session
    of a single thread that overlapping calls share, one core each, and one of ``threads``
    for a call that runs alone; else one session of ``threads``. The sessions map the large
    tensors from one file (:func:`write_mapped_graph`): one copy of the weights, whatever the
    sessions (only ORT's repacked MatMul weights are each session's own). With
    ``processes`` the graph is written to a file that each worker process opens a session on
    (a crash costs one worker, as with llama.cpp). The vocabulary (for llama.cpp's tokenizer,
    used only when the GGUF carries no ``tokenizer.json``) is loaded by llama.cpp without the
    weights.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        max_batch_tokens: int,
        int8: bool = False,
        processes: bool = False,
        spinning: bool = False,
        log_json: bool = False,
        pool_from_starts: bool = False,
        workers: int = 1,
    ) -> None:
        """``threads``: the intra-op threads of a call that runs alone (of every call in
        ``processes`` or with one worker); ``spinning``: see :func:`open_session`.
        ``pool_from_starts``: the graph takes a pooling mask, so the mean can leave out a
        prompt's tokens (a model with ``include_prompt: false``). ``workers``: how many
        engines will call the sessions at once."""
        try:
            source = load_gguf(path)
            # A cross-encoder with two token types (BERT) scores a pair whose document is
            # type 1: its graph takes the types; an encoder's texts are all type 0.
            # An encoder's graph also outputs its last hidden state, for TEI's /embed_all
            # (pooled calls do not fetch it: their speed is the same).
            self.token_states = source.pooling not in ("rank", "splade")
            token_types = source.pooling == "rank" and source.token_types > 1
            if isinstance(source, BertSource) and source.pooling != "splade":
                # Several short sequences share a row (build_bert_model's packed graph);
                # other families' graphs, and SPLADE's (logits pooled per sequence), pad.
                model = source.build(
                    token_type_input=token_types, hidden_output=self.token_states, packed=True
                )
            else:
                model = source.build(
                    pooling_mask_input=pool_from_starts,
                    token_type_input=token_types,
                    hidden_output=self.token_states,
                )
            if int8:
                model = quantize_int8(model)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"ONNX Runtime cannot serve {path.name}: {exc}") from None
        # A cross-encoder's rows are its logits, one per label.
        self.dimensions = source.dimensions
        del source
        self._max_batch_tokens = max_batch_tokens
        self.int8 = int8
        # int8 vectors differ from the reference: /v1/models says so.
        self.engine_name = f"{ENGINE_NAME}-int8" if int8 else ENGINE_NAME
        self.vocab = file_vocabulary(path)
        self._spec: EngineSpec | None = None
        self._session: ort.InferenceSession | None = None
        self._alone: ort.InferenceSession | None = None
        self._running = RunningCalls()
        self._graph_fd: int | None = None
        if processes:
            self._spec = self._graph_for_processes(
                model,
                path,
                threads=threads,
                max_batch_tokens=max_batch_tokens,
                log_json=log_json,
                spinning=spinning,
            )
        else:
            with tempfile.TemporaryDirectory(prefix=f"embedd-{path.stem}-") as directory:
                graph_path = write_mapped_graph(model, Path(directory))
                # The sessions read the weights from the file: these would be a second copy.
                del model
                if workers > 1 and threads > 1:
                    # Busy workers one core each: measured faster under load than sharing
                    # every core's threads (docs/design.md "Workers").
                    self._session = open_session(graph_path, threads=1)
                    self._alone = open_session(graph_path, threads=threads, spinning=spinning)
                else:
                    self._session = open_session(graph_path, threads=threads, spinning=spinning)
            # The directory is gone; the sessions' mappings of its weights stay until closed.
        _release_freed_memory()

    def _graph_for_processes(
        self,
        model: onnx.ModelProto,
        path: Path,
        *,
        threads: int,
        max_batch_tokens: int,
        log_json: bool,
        spinning: bool,
    ) -> EngineSpec:
        """The graph in one file that worker processes (and their replacements) open through
        this process's descriptor of it, its name removed at once: the kernel frees the file
        with the last descriptor, so a server killed with SIGKILL leaves nothing in /tmp."""
        with tempfile.NamedTemporaryFile(
            prefix=f"embedd-{path.stem}-", suffix=".onnx", delete=False
        ) as graph_file:
            graph_file.write(model.SerializeToString())
        self._graph_fd = os.open(graph_file.name, os.O_RDONLY)
        Path(graph_file.name).unlink()
        return EngineSpec(
            path=str(path),
            max_tokens=max_batch_tokens,
            max_sequences=0,
            n_threads=threads,
            n_gpu_layers=0,
            log_json=log_json,
            engine=self.engine_name,
            onnx_path=f"/proc/{os.getpid()}/fd/{self._graph_fd}",
            spinning=spinning,
        )

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def new_engine(self) -> Engine:
        """A worker process of its own, or an engine on the shared session."""
        if self._spec is not None:
            return ProcessEngine(self._spec)
        if self._session is None:
            raise ModelLoadError("the model was unloaded")
        return OnnxEngine(
            self._session,
            max_batch_tokens=self._max_batch_tokens,
            alone=self._alone,
            running=self._running,
        )

    def tokenize(self, text: bytes) -> list[int]:
        return self.vocab.tokenize(text)

    def token_text(self, token_id: int) -> str:
        return self.vocab.token_text(token_id)

    def close(self) -> None:
        """Frees the vocabulary and the shared session (once no engine runs on it), or
        closes the descriptor the worker processes open the graph through (which frees it)."""
        self.vocab.close()
        self._session = self._alone = None
        if self._graph_fd is not None:
            os.close(self._graph_fd)
            self._graph_fd = None
