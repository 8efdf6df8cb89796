"""The priority lanes and the vector cache, measured (``make bench``'s ``lanes`` part, or
``python -m bench.lanes``).

Lanes (issue 24's target): a lone interactive caller (one sentence per call, closed loop) on an
idle server; a bulk ``EmbedStream`` (batches of passages) alone; then both at once. The target:
the caller's p99 behind the stream within 3x of its idle p99, the stream's texts/s within 10%
of its own alone. Each ``bulk_batch_tokens`` given gets a server of its own, and the first
once more with ``--bulk-free-workers 1``. Every server here
runs with the vector cache off (``--cache-mb 0``): the caller repeats its sentences.

Cache: one caller sending queries from a small set over and over (as a RAG front end re-embeds
the same questions), on a server with the cache on (its default) and one with ``--cache-mb 0``.

The callers are Python gRPC clients in this process (ghz has no EmbedStream load); they take
some of the machine's cores too, alike in every phase.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import procs
from bench.texts import REPO, load_text_sets
from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc

DEFAULT_MODEL = REPO / "models" / "all-minilm-l6-v2.gguf"
STREAM_BATCH = 8  # small messages: the texts/s of a few seconds counts many answers
PAUSE_S = 0.004  # a lone caller's think time between calls
CACHE_QUERIES = 50  # distinct queries the cache leg cycles through


@dataclass(frozen=True)
class Latencies:
    calls: int
    p50_ms: float
    p99_ms: float


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def interactive_caller(
    target: str, texts: Sequence[str], seconds: float, stop: threading.Event | None = None
) -> Latencies:
    """One caller, one text per Embed, closed loop for ``seconds``."""
    took: list[float] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        stub.Embed(pb.EmbedRequest(texts=[texts[0]]), timeout=60)  # warm the channel
        ends = time.perf_counter() + seconds
        for text in itertools.cycle(texts):
            if time.perf_counter() >= ends or (stop is not None and stop.is_set()):
                break
            started = time.perf_counter()
            stub.Embed(pb.EmbedRequest(texts=[text]), timeout=60)
            took.append(time.perf_counter() - started)
            time.sleep(PAUSE_S)
    return Latencies(len(took), _percentile(took, 0.5), _percentile(took, 0.99))


class BulkStream:
    """An EmbedStream of passage batches that runs until stopped, counting answered texts
    (those answered between :meth:`mark` and :meth:`rate`)."""

    def __init__(self, target: str, passages: Sequence[str]) -> None:
        self._target = target
        self._passages = passages
        self._stop = threading.Event()
        self._done = 0
        self._marked = (0, time.perf_counter())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._channel = grpc.insecure_channel(target)

    def __enter__(self) -> BulkStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Closing the channel cancels the stream: its window of batches is not drained.
        self._stop.set()
        self._channel.close()
        self._thread.join(timeout=60)

    def _batches(self) -> Iterator[pb.EmbedRequest]:
        texts = itertools.cycle(self._passages)
        while not self._stop.is_set():
            yield pb.EmbedRequest(texts=list(itertools.islice(texts, STREAM_BATCH)))

    def _run(self) -> None:
        stub = pb_grpc.EmbedderStub(self._channel)  # type: ignore[no-untyped-call, unused-ignore]
        try:
            for reply in stub.EmbedStream(self._batches(), timeout=3600):
                self._done += len(reply.embeddings)
        except (grpc.RpcError, ValueError):  # cancelled by __exit__ (ValueError: closed)
            if not self._stop.is_set():
                raise

    def mark(self) -> None:
        self._marked = (self._done, time.perf_counter())

    def rate(self) -> float:
        """Texts per second since the last mark."""
        done, since = self._marked
        return (self._done - done) / (time.perf_counter() - since)


@dataclass(frozen=True)
class LanesResult:
    bulk_batch_tokens: int
    free_workers: int
    idle: Latencies
    bulk_alone: float  # texts/s
    behind: Latencies
    bulk_mixed: float

    def line(self) -> str:
        ratio = self.behind.p99_ms / self.idle.p99_ms
        share = self.bulk_mixed / self.bulk_alone
        return (
            f"bulk_batch_tokens={self.bulk_batch_tokens} bulk_free_workers="
            f"{self.free_workers}: interactive p50/p99 idle "
            f"{self.idle.p50_ms:.1f}/{self.idle.p99_ms:.1f} ms, behind the stream "
            f"{self.behind.p50_ms:.1f}/{self.behind.p99_ms:.1f} ms (p99 x{ratio:.2f}, target "
            f"<= 3); bulk {self.bulk_alone:.0f} texts/s alone, {self.bulk_mixed:.0f} with the "
            f"caller ({share:.0%}, target >= 90%)"
        )


def measure_lanes(
    models_dir: Path,
    sentences: Sequence[str],
    passages: Sequence[str],
    bulk_batch_tokens: int,
    seconds: float,
    *,
    free_workers: int = 0,
) -> LanesResult:
    extra = ["--cache-mb", "0", "--bulk-batch-tokens", str(bulk_batch_tokens)]
    extra += ["--bulk-free-workers", str(free_workers)]
    with procs.Children() as children:
        server = children.add_embedd(procs.start_embedd(models_dir, False, extra=extra))
        target = server.grpc_target
        interactive_caller(target, sentences, 2.0)  # warm-up
        idle = interactive_caller(target, sentences, seconds)
        with BulkStream(target, passages) as bulk:
            time.sleep(2.0)  # the stream's window fills: every worker busy
            bulk.mark()
            time.sleep(seconds)
            alone = bulk.rate()
            bulk.mark()
            behind = interactive_caller(target, sentences, seconds)
            mixed = bulk.rate()
    return LanesResult(bulk_batch_tokens, free_workers, idle, alone, behind, mixed)


def measure_cache(models_dir: Path, sentences: Sequence[str], seconds: float) -> list[str]:
    """The same query set over and over, cache on (default) and off."""
    queries = list(sentences[:CACHE_QUERIES])
    lines = []
    for label, extra in (("cache on (64 MiB)", []), ("--cache-mb 0", ["--cache-mb", "0"])):
        with procs.Children() as children:
            server = children.add_embedd(procs.start_embedd(models_dir, False, extra=extra))
            interactive_caller(server.grpc_target, queries, 2.0)  # warm-up (fills the cache)
            found = interactive_caller(server.grpc_target, queries, seconds)
        rate = found.calls / seconds
        lines.append(
            f"{label}: {found.calls} calls of {CACHE_QUERIES} repeated queries, "
            f"{rate:.0f} calls/s (with {PAUSE_S * 1000:.0f} ms pauses), p50 "
            f"{found.p50_ms:.2f} ms, p99 {found.p99_ms:.2f} ms"
        )
    return lines


def run(model: Path, bulk_batch_tokens: Sequence[int], seconds: float) -> list[str]:
    """Every lanes measurement, then the cache leg; one line each (also printed)."""
    sentence_set, passage_set, _ = load_text_sets(model)
    sentences, passages = sentence_set.texts[:1200], passage_set.texts
    lines = []
    for tokens, free in [*((t, 0) for t in bulk_batch_tokens), (bulk_batch_tokens[0], 1)]:
        result = measure_lanes(
            model.parent, sentences, passages, tokens, seconds, free_workers=free
        )
        lines.append(result.line())
        print("  " + lines[-1], flush=True)
    for line in measure_cache(model.parent, sentences, seconds):
        lines.append(line)
        print("  " + line, flush=True)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--bulk-batch-tokens", default="64", help="comma-separated values, a server each"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    args = parser.parse_args(argv)
    values = [int(value) for value in args.bulk_batch_tokens.split(",")]
    print(f"lanes and cache ({args.seconds:.0f} s per phase):", flush=True)
    run(args.model.resolve(), values, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
