"""The engine's ceiling: llama-cpp-python in-process on the same GGUF, no server.

Every configuration decodes the same token ids (tokenized beforehand, as the server does
before its workers see them) and is timed from the first decode to the last:

- packing: one sequence per decode, or consecutive sequences packed greedily into decodes of
  at most 128 / 256 tokens (what the server's ``batch_tokens`` does);
- layout: two threads of one process each with its own single-thread context (the server's
  default), two processes with one single-thread context each, or one context with two
  threads; plus ``Llama.embed``, llama-cpp-python's own API (which its server uses).

The fastest configuration is "the ceiling". Contexts are built with the project's
``LlamaRuntime`` (numpy-filled llama_batch, vectors copied out with one numpy copy) and the
server's context size (256 tokens: the model's maximum input).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT_TOKENS = 256
MAX_SEQUENCES = 64
WARMUP_DECODES = 8
PROCESS_TIMEOUT_S = 300.0

Encode = Callable[[Sequence[str]], list[list[int]]]


@dataclass(frozen=True)
class CeilingResult:
    """One configuration's throughput."""

    name: str
    layout: str
    pack_tokens: int  # 0: one sequence per decode
    texts: int
    tokens: int
    seconds: float
    other_cores: float = 0.0  # other processes on the machine meanwhile: noise

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


def pack(
    sequences: Sequence[Sequence[int]], max_tokens: int, max_sequences: int
) -> list[list[int]]:
    """Groups consecutive sequences into decodes of at most ``max_tokens`` tokens and
    ``max_sequences`` sequences; returns the index lists. ``max_tokens`` 0 (or a sequence
    longer than it) means that sequence is decoded alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, ids in enumerate(sequences):
        size = len(ids)
        if current and (tokens + size > max_tokens or len(current) >= max_sequences):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += size
    if current:
        batches.append(current)
    return batches


def _runtime(model_path: Path, n_threads: int) -> Any:
    from embedd_server.engines.llama import LlamaRuntime

    # llama-cpp-python prints llama.cpp's load-time log through Python's sys.stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        return LlamaRuntime(
            model_path,
            max_tokens=CONTEXT_TOKENS,
            max_sequences=MAX_SEQUENCES,
            n_threads=n_threads,
            n_gpu_layers=0,
        )


def _batches(sequences: Sequence[Sequence[int]], pack_tokens: int) -> list[list[list[int]]]:
    groups = pack(sequences, pack_tokens, MAX_SEQUENCES)
    return [[list(sequences[i]) for i in group] for group in groups]


def _warm_up(engine: Any, batches: Sequence[Sequence[Sequence[int]]]) -> None:
    for batch in batches[:WARMUP_DECODES]:
        engine.embed_batch(batch)


class _Cursor:
    """Hands out batch indices to several threads."""

    def __init__(self, total: int) -> None:
        self._next = 0
        self._total = total
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._total:
                return None
            self._next += 1
            return self._next - 1


def run_threads(
    model_path: Path,
    sequences: Sequence[Sequence[int]],
    pack_tokens: int,
    workers: int,
    max_seconds: float,
) -> tuple[int, float]:
    """(texts, seconds) for ``workers`` threads, each with its own 1-thread context, taking
    batches until all are done or ``max_seconds`` have passed."""
    runtime = _runtime(model_path, 1)
    engines = [runtime.new_engine() for _ in range(workers)]
    batches = _batches(sequences, pack_tokens)
    try:
        for engine in engines:
            _warm_up(engine, batches)
        cursor = _Cursor(len(batches))
        done = [0] * len(engines)

        def work(number: int, engine: Any) -> None:
            while time.perf_counter() < deadline and (index := cursor.take()) is not None:
                engine.embed_batch(batches[index])
                done[number] += len(batches[index])

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
        for engine in engines:
            engine.close()
        runtime.close()


def run_single_context(
    model_path: Path,
    sequences: Sequence[Sequence[int]],
    pack_tokens: int,
    n_threads: int,
    max_seconds: float,
) -> tuple[int, float]:
    """(texts, seconds) for one context with ``n_threads`` threads."""
    runtime = _runtime(model_path, n_threads)
    engine = runtime.new_engine()
    batches = _batches(sequences, pack_tokens)
    try:
        _warm_up(engine, batches)
        done = 0
        started = time.perf_counter()
        for batch in batches:
            if time.perf_counter() - started > max_seconds:
                break
            engine.embed_batch(batch)
            done += len(batch)
        return done, time.perf_counter() - started
    finally:
        engine.close()
        runtime.close()


def _process_worker(
    *,
    model_path: Path,
    batches: list[list[list[int]]],
    counter: Any,
    ready: Any,
    go: Any,
    results: Any,
    max_seconds: float,
) -> None:
    """A spawned process: one 1-thread context, takes batches from a shared counter."""
    runtime = _runtime(model_path, 1)
    engine = runtime.new_engine()
    _warm_up(engine, batches)
    ready.release()
    go.wait()
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable between processes
    done = 0
    while time.perf_counter() - started < max_seconds:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        if index >= len(batches):
            break
        engine.embed_batch(batches[index])
        done += len(batches[index])
    results.put((started, time.perf_counter(), done))
    engine.close()
    runtime.close()


def run_processes(
    model_path: Path,
    sequences: Sequence[Sequence[int]],
    pack_tokens: int,
    workers: int,
    max_seconds: float,
) -> tuple[int, float]:
    """(texts, seconds from the first process starting to the last finishing); the
    processes are spawned and load the model before the clock starts."""
    context = multiprocessing.get_context("spawn")
    batches = _batches(sequences, pack_tokens)
    counter = context.Value("i", 0)
    ready = context.Semaphore(0)
    go = context.Event()
    results = context.Queue()
    processes = [
        context.Process(
            target=_process_worker,
            kwargs={
                "model_path": model_path,
                "batches": batches,
                "counter": counter,
                "ready": ready,
                "go": go,
                "results": results,
                "max_seconds": max_seconds,
            },
            daemon=True,
        )
        for _ in range(workers)
    ]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            if not ready.acquire(timeout=PROCESS_TIMEOUT_S):
                raise RuntimeError("a ceiling process did not load the model in time")
        go.set()
        spans = [results.get(timeout=PROCESS_TIMEOUT_S) for _ in processes]
        for process in processes:
            process.join(PROCESS_TIMEOUT_S)
        seconds = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
        return sum(done for _, _, done in spans), seconds
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_llama_embed(
    model_path: Path, texts: Sequence[str], n_threads: int, max_seconds: float
) -> tuple[int, float]:
    """(texts, seconds) for llama-cpp-python's ``Llama.embed`` (its own packing and
    tokenizer), 32 texts per call as a server request would bring them."""
    import os

    from llama_cpp import Llama

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
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


def configurations(long_texts: bool) -> Iterator[tuple[str, str, int]]:
    """(layout, packing label, pack_tokens) to try. Long texts do not pack below 256."""
    packings = (
        [("1 per decode", 0)]
        if long_texts
        else [
            ("1 per decode", 0),
            ("packs ≤128 tok", 128),
            ("packs ≤256 tok", 256),
        ]
    )
    for layout in ("2 threads x 1-thread ctx", "2 processes x 1 thread", "1 ctx x 2 threads"):
        for label, tokens in packings:
            yield layout, label, tokens


def measure_configuration(
    model_path: Path,
    token_ids: Sequence[Sequence[int]],
    layout: str,
    pack_tokens: int,
    max_seconds: float,
) -> tuple[int, float]:
    """(texts, seconds) of one configuration."""
    if layout.startswith("2 threads"):
        return run_threads(model_path, token_ids, pack_tokens, 2, max_seconds)
    if layout.startswith("2 processes"):
        return run_processes(model_path, token_ids, pack_tokens, 2, max_seconds)
    return run_single_context(model_path, token_ids, pack_tokens, 2, max_seconds)


def single_text_latency(
    model_path: Path, texts: Sequence[str], encode: Encode, samples: int, pause_s: float = 0.0
) -> SingleTextLatency:
    """p50/p99 of tokenize + decode + normalize for one text on a 1-thread context (the
    server's default worker), texts taken in turn, back to back or ``pause_s`` apart (as a
    lone caller's requests arrive: on these machines a decode after an idle pause is slower,
    the weights having left the caches)."""
    from bench.report import percentile

    runtime = _runtime(model_path, 1)
    engine = runtime.new_engine()
    try:
        for text in texts[:WARMUP_DECODES]:
            engine.embed_batch(encode([text]))
        timings: list[float] = []
        for number in range(samples):
            text = texts[number % len(texts)]
            if pause_s:
                time.sleep(pause_s)
            started = time.perf_counter()
            vectors = engine.embed_batch(encode([text]))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            timings.append(time.perf_counter() - started)
        timings.sort()
        return SingleTextLatency(
            percentile(timings, 50) * 1000, percentile(timings, 99) * 1000, len(timings)
        )
    finally:
        engine.close()
        runtime.close()
