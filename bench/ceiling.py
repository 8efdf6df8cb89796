"""The engines' ceiling: the server's own engines in-process on the same GGUF, no server.

Every configuration decodes the same token ids (tokenized beforehand, as the server does
before its workers see them) and is timed from the first decode to the last. The pieces are
the server's: the runtime comes from its loader (``choice.load_runtime`` with the engine
forced, so the context size, the sequences per pack and the ONNX graph are the server's),
and the token ids go in as one job on its ``FairQueue``, from which each engine's thread
takes packs with ``take_batch``, as a worker does. What a configuration varies is the
server's own settings, for each of the two engines:

- llama.cpp: packing (``batch_tokens``): one sequence per decode, or sequences (the queue
  hands a job's inputs out shortest first) packed into decodes of at most 128 / 256 tokens;
  layout: two threads each with its own single-thread context, two worker processes
  (``ProcessEngine``, llama.cpp's default on CPU) with one thread each, or one context with
  two threads; plus ``Llama.embed``, llama-cpp-python's own API (which its server uses);
- ONNX Runtime: packs of at most 256 tokens (``onnx_batch_tokens``, the default) or 2048,
  each run in length-sorted padded batches; one worker on a session of two threads that
  spin while it runs (the server's default: workers and ``onnx_spinning`` auto), two worker
  processes each with a session on two threads that do not spin, or on one thread; and the
  default layout with int8 weights (``--int8``).

The fastest configuration of an engine is its ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedd_server.compute.engine import Engine, Runtime
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.scheduler import FairQueue, Job, WorkItem
from embedd_server.model.catalog import read_model_info

WARMUP_DECODES = 8

Encode = Callable[[Sequence[str]], list[list[int]]]

LLAMA = "llama.cpp"
ONNX = "onnxruntime"
ENGINES = (LLAMA, ONNX)

# Layout -> (engines, threads per engine, engines in processes of their own).
LAYOUTS = {
    "2 threads x 1-thread ctx": (2, 1, False),
    "2 processes x 1 thread": (2, 1, True),
    "1 ctx x 2 threads": (1, 2, False),
    "2 threads x 1-thread session": (2, 1, False),
    "1 session x 2 threads, spinning": (1, 2, False),
    "2 threads x 1-thread session (+2 alone)": (2, 2, False),
    "2 processes x 2 threads": (2, 2, True),
}
LLAMA_LAYOUTS = ("2 threads x 1-thread ctx", "2 processes x 1 thread", "1 ctx x 2 threads")
# The server's default first (one worker in a thread, its session's threads spinning), then
# `--workers 2` (two workers a core each on one shared session; a call that runs alone takes a
# second session of both cores, which the ceiling's always busy workers seldom do).
ONNX_LAYOUTS = (
    "1 session x 2 threads, spinning",
    "2 threads x 1-thread session (+2 alone)",
    "2 processes x 2 threads",
    "2 processes x 1 thread",
)
ONNX_DEFAULT_PACK = EngineSettings().onnx_batch_tokens


@dataclass(frozen=True)
class Configuration:
    """One way to run an engine in-process: the server's settings it stands for."""

    engine: str  # LLAMA or ONNX
    layout: str  # a key of LAYOUTS
    label: str  # how its packs are made, for people
    pack_tokens: int  # most tokens of one pack; 0: one sequence per decode
    int8: bool = False

    @property
    def name(self) -> str:
        return f"{self.engine}{' int8' if self.int8 else ''}, {self.layout}, {self.label}"


@dataclass(frozen=True)
class CeilingResult:
    """One configuration's throughput."""

    name: str  # how its packs are made
    layout: str
    pack_tokens: int  # 0: one sequence per decode; -1: Llama.embed's own
    texts: int
    tokens: int
    seconds: float
    other_cores: float = 0.0  # other processes on the machine meanwhile: noise
    engine: str = LLAMA
    int8: bool = False

    @property
    def engine_label(self) -> str:
        return f"{self.engine} int8" if self.int8 else self.engine

    def configuration(self) -> Configuration:
        return Configuration(self.engine, self.layout, self.name, self.pack_tokens, self.int8)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SingleTextLatency:
    """In-process time for one text: tokenize + decode + L2-normalize, one text at a time."""

    p50_ms: float
    p99_ms: float
    samples: int


def engine_settings(config: Configuration) -> EngineSettings:
    """The server's settings for one configuration. ``batch_tokens`` is what the queue packs
    by here, for either engine (the server packs by ``onnx_batch_tokens`` for ONNX Runtime)."""
    workers, threads, processes = LAYOUTS[config.layout]
    return EngineSettings(
        workers=workers,
        threads_per_worker=threads,
        worker_processes=processes,
        batch_tokens=config.pack_tokens,
        onnx_batch_tokens=config.pack_tokens or ONNX_DEFAULT_PACK,
        onnx_threads=threads,
        engine=config.engine,
        int8=config.int8,
    )


def _runtime(model_path: Path, settings: EngineSettings) -> Runtime:
    """The server's loader with the engine of ``settings`` (not "auto")."""
    from embedd_server.engines.choice import load_runtime

    # llama-cpp-python prints llama.cpp's load-time log through Python's sys.stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        return load_runtime(read_model_info(model_path), settings, LoadOptions())


def auto_engine(model_path: Path) -> str:
    """The engine ``engine=auto`` (the server's default) picks for this model."""
    from embedd_server.engines.choice import engine_for

    return engine_for(read_model_info(model_path), EngineSettings(), LoadOptions())


def decode_all(
    engines: Sequence[Engine],
    sequences: Sequence[Sequence[int]],
    settings: EngineSettings,
    max_seconds: float = math.inf,
    max_packs: float = math.inf,
    *,
    token_type_starts: Sequence[int] | None = None,
) -> tuple[int, float]:
    """(texts, seconds): ``sequences`` as one job on the server's FairQueue, each engine in a
    thread of its own taking packs of ``settings.batch_tokens`` / ``batch_sequences`` and
    delivering the vectors into the job, as the server's workers do, until the queue is empty,
    ``max_seconds`` have passed or the thread decoded ``max_packs``. ``token_type_starts``
    (a cross-encoder's pairs: where each one's type-1 tokens begin) go to the engine with
    each pack, as a worker passes them: only for a pack where some sequence has type-1
    tokens."""
    loop = asyncio.new_event_loop()  # the job's future lives on it; nothing awaits it here
    try:
        queue = FairQueue(max_items=max(1, len(sequences)))
        job = Job(sequences, engines[0].dimensions, loop, token_type_starts=token_type_starts)
        if sequences:
            queue.submit(job)
        queue.close()  # the threads drain the job, then take_batch returns []
        done = [0] * len(engines)

        def work(number: int, engine: Engine) -> None:
            packs = 0
            while packs < max_packs and time.perf_counter() < deadline:
                batch = queue.take_batch(settings.batch_tokens, settings.batch_sequences)
                if not batch:
                    return
                types = pack_token_types(batch) if token_type_starts is not None else None
                ids = [item.token_ids for item in batch]
                vectors = engine.embed(Pack.of(ids, None, types))
                for item, vector in zip(batch, vectors, strict=True):
                    job.deliver(item.index, vector)
                done[number] += len(batch)
                packs += 1

        threads = [
            threading.Thread(target=work, args=(number, engine))
            for number, engine in enumerate(engines)
        ]
        started = time.perf_counter()
        deadline = started + max_seconds
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done), time.perf_counter() - started
    finally:
        loop.close()


def pack_token_types(batch: Sequence[WorkItem]) -> list[int] | None:
    """The token type starts of a pack as the server's worker hands them to its engine: None
    when no sequence of the pack has a type-1 token (an engine then computes as for texts)."""
    types = [item.token_type_start for item in batch]
    two_segments = any(
        start < len(item.token_ids) for start, item in zip(types, batch, strict=True)
    )
    return types if two_segments else None


def measure_configuration(
    model_path: Path,
    token_ids: Sequence[Sequence[int]],
    config: Configuration,
    max_seconds: float,
) -> tuple[int, float]:
    """(texts, seconds) of one configuration; the engines are built (worker processes
    started, ONNX sessions created) and warmed up on a few packs each before the clock
    starts."""
    settings = engine_settings(config)
    runtime = _runtime(model_path, settings)
    engines: list[Engine] = []
    try:
        engines = [runtime.new_engine() for _ in range(settings.workers)]
        decode_all(engines, token_ids, settings, max_packs=WARMUP_DECODES)
        return decode_all(engines, token_ids, settings, max_seconds)
    finally:
        for engine in engines:
            engine.close()
        runtime.close()


def run_llama_embed(
    model_path: Path, texts: Sequence[str], n_threads: int, max_seconds: float
) -> tuple[int, float]:
    """(texts, seconds) for llama-cpp-python's ``Llama.embed`` (its own packing and
    tokenizer), 32 texts per call as a server request would bring them."""
    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):
        llama = Llama(
            str(model_path),
            embedding=True,
            n_ctx=512,
            n_batch=512,
            n_ubatch=512,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
    try:
        llama.embed(list(texts[:WARMUP_DECODES]))
        done = 0
        started = time.perf_counter()
        while done < len(texts) and time.perf_counter() - started < max_seconds:
            chunk = list(texts[done : done + 32])
            llama.embed(chunk)
            done += len(chunk)
        return done, time.perf_counter() - started
    finally:
        llama.close()


def configurations(engine: str, long_texts: bool) -> Iterator[Configuration]:
    """The configurations of ``engine`` to try. llama.cpp: long texts do not pack below 256.
    ONNX Runtime: its default packs in both layouts, smaller packs in the default layout, and
    int8 weights in the default layout and packs."""
    if engine == LLAMA:
        packings = (
            [("1 per decode", 0)]
            if long_texts
            else [("1 per decode", 0), ("packs ≤128 tok", 128), ("packs ≤256 tok", 256)]
        )
        for layout in LLAMA_LAYOUTS:
            for label, tokens in packings:
                yield Configuration(LLAMA, layout, label, tokens)
        return
    if engine != ONNX:
        raise ValueError(f"unknown engine {engine!r}")
    default_layout, *other_layouts = ONNX_LAYOUTS
    default = f"packs ≤{ONNX_DEFAULT_PACK} tok"
    yield Configuration(ONNX, default_layout, default, ONNX_DEFAULT_PACK)
    yield Configuration(ONNX, default_layout, "packs ≤2048 tok", 2048)
    for layout in other_layouts:
        yield Configuration(ONNX, layout, default, ONNX_DEFAULT_PACK)
    yield Configuration(ONNX, default_layout, default, ONNX_DEFAULT_PACK, int8=True)


def single_text_latency(
    model_path: Path,
    texts: Sequence[str],
    encode: Encode,
    samples: int,
    *,
    pause_s: float = 0.0,
    engine: str = LLAMA,
) -> SingleTextLatency:
    """p50/p99 of tokenize + decode + normalize for one text on one worker's engine in this
    process, as the server configures it (a llama.cpp context on one thread, or an ONNX
    Runtime session on the cores),
    texts taken in turn, back to back or ``pause_s`` apart (as a lone caller's requests
    arrive: on these machines a decode after an idle pause is slower, the weights having
    left the caches)."""
    from bench.report import percentile

    runtime = _runtime(model_path, EngineSettings(worker_processes=False, engine=engine))
    worker = runtime.new_engine()
    try:
        for text in texts[:WARMUP_DECODES]:
            worker.embed(Pack.of(encode([text])))
        timings: list[float] = []
        for number in range(samples):
            text = texts[number % len(texts)]
            if pause_s:
                time.sleep(pause_s)
            started = time.perf_counter()
            vectors = worker.embed(Pack.of(encode([text])))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            timings.append(time.perf_counter() - started)
        timings.sort()
        return SingleTextLatency(
            percentile(timings, 50) * 1000, percentile(timings, 99) * 1000, len(timings)
        )
    finally:
        worker.close()
        runtime.close()
