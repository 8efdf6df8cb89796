"""Soak run: `embedd serve` under steady closed-loop load for minutes; throughput and RSS over time.

    .venv/bin/python -m bench.soak [--minutes 3] [--concurrency 16] [--interval 10]

One `embedd serve` (default settings, metrics off, a free loopback port) takes closed-loop
unary Embed calls from ``--concurrency`` asyncio callers (pre-serialized STS-B sentences: one
text per request, every eighth request 32 texts) plus, every 15 s, one EmbedStream of 320
texts. Every ``--interval`` seconds one line is printed: texts/s, p50/p99 of the one-text calls,
the server's resident memory (VmRSS of the process and its descendants) and errors. The first
slice is warm-up; the verdict compares RSS of the first slice after it with the last one:
"flat" within 5 % or 10 MiB, and there must be no request errors. The table goes to
docs/benchmarks/soak.md. Exit status 1 if memory grew or any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import EMBED_METHOD, MAX_MESSAGE_BYTES, REQUEST_TIMEOUT_S, embed_requests
from bench.report import markdown_table, percentile
from bench.texts import REPO, read_sentences

BATCH_EVERY = 8  # every eighth unary request carries BATCH_TEXTS texts
BATCH_TEXTS = 32
STREAM_TEXTS = 320
STREAM_BATCH = 64
STREAM_EVERY_S = 15.0
FLAT_PERCENT = 5.0
FLAT_MIB = 10.0
HEADERS = ["elapsed s", "texts/s", "p50 ms", "p99 ms", "RSS MiB", "errors"]


@dataclass
class Slice:
    elapsed: float
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    errors: int


@dataclass
class Counters:
    """What the callers did since the last sample; swapped out by the sampler."""

    texts: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # one-text calls, seconds
    first_error: str = ""

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text


def fmt_row(row: Slice) -> list[str]:
    return [
        f"{row.elapsed:.0f}",
        f"{row.texts_per_s:,.0f}",
        f"{row.p50_ms:.1f}",
        f"{row.p99_ms:.1f}",
        f"{row.rss_mib:.1f}",
        str(row.errors),
    ]


def verdict(rows: list[Slice], errors: int) -> tuple[bool, str]:
    """(ok, sentence): RSS from the first post-warm-up slice to the last, and the errors."""
    if len(rows) < 2:
        return errors == 0, f"too short for an RSS verdict (one slice); {errors} request errors"
    first, last = rows[1], rows[-1]
    growth = last.rss_mib - first.rss_mib
    percent = 100 * growth / first.rss_mib if first.rss_mib else 0.0
    flat = growth <= FLAT_MIB or percent <= FLAT_PERCENT
    peak = max(row.rss_mib for row in rows[1:])
    text = (
        f"RSS {first.rss_mib:.1f} MiB at {first.elapsed:.0f} s (after warm-up) -> "
        f"{last.rss_mib:.1f} MiB at {last.elapsed:.0f} s: {growth:+.1f} MiB ({percent:+.1f} %), "
        f"peak {peak:.1f} MiB: {'flat' if flat else 'GROWING'} "
        f"(limit {FLAT_PERCENT:g} % or {FLAT_MIB:g} MiB); request errors: {errors}"
    )
    return flat and errors == 0, text


class Soak:
    """The callers, the streamer and the sampler of one soak run, sharing their counters."""

    def __init__(
        self, target: str, server_pid: int, sentences: list[str], args: argparse.Namespace
    ) -> None:
        self.target = target
        self.server_pid = server_pid
        self.sentences = sentences
        self.args = args
        self.singles = embed_requests([[text] for text in sentences])
        self.batches = embed_requests(
            [sentences[i : i + BATCH_TEXTS] for i in range(0, len(sentences), BATCH_TEXTS)]
        )
        self.counters = Counters()
        self.errors = 0
        self.first_error = ""
        self.rows: list[Slice] = []
        self.turn = itertools.count()
        self.started = self.deadline = 0.0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def run(self) -> None:
        from grpc import aio

        self.started = self.now()
        self.deadline = self.started + self.args.minutes * 60
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        async with aio.insecure_channel(self.target, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            call: Any = channel.unary_unary(EMBED_METHOD)  # bytes in, bytes out
            callers = (self.caller(call) for _ in range(self.args.concurrency))
            await asyncio.gather(self.sampler(), self.streamer(), *callers)
        # Calls in flight at the deadline finished after the last sample: count their errors.
        self.errors += self.counters.errors
        self.first_error = self.first_error or self.counters.first_error

    async def caller(self, call: Any) -> None:
        import grpc

        while self.now() < self.deadline:
            n = next(self.turn)
            batch = n % BATCH_EVERY == BATCH_EVERY - 1
            pool = self.batches if batch else self.singles
            t0 = time.perf_counter()
            try:
                await call(pool[n % len(pool)], timeout=REQUEST_TIMEOUT_S)
            except grpc.RpcError as exc:
                self.counters.error(f"Embed: {exc.code()}")
                continue
            if batch:
                self.counters.texts += BATCH_TEXTS
            else:
                self.counters.texts += 1
                self.counters.latencies.append(time.perf_counter() - t0)

    async def streamer(self) -> None:
        from embedd.aio import AsyncClient

        offset = 0
        async with AsyncClient(self.target) as client:
            while self.now() < self.deadline:
                count = len(self.sentences)
                texts = [self.sentences[(offset + i) % count] for i in range(STREAM_TEXTS)]
                offset += STREAM_TEXTS
                got = 0
                try:
                    async for matrix in client.embed_stream(
                        texts, batch_size=STREAM_BATCH, timeout=REQUEST_TIMEOUT_S
                    ):
                        got += len(matrix)
                        self.counters.texts += len(matrix)
                except Exception as exc:  # the client's errors: count them and go on
                    self.counters.error(f"EmbedStream: {type(exc).__name__}: {exc}")
                else:
                    if got != STREAM_TEXTS:
                        self.counters.error(f"EmbedStream: {got} of {STREAM_TEXTS} vectors")
                await asyncio.sleep(max(0.0, min(STREAM_EVERY_S, self.deadline - self.now())))

    async def sampler(self) -> None:
        last = self.now()
        while last < self.deadline - 0.5:
            await asyncio.sleep(max(0.0, min(self.args.interval, self.deadline - self.now())))
            now = self.now()
            done, self.counters = self.counters, Counters()
            done.latencies.sort()
            row = Slice(
                elapsed=now - self.started,
                texts_per_s=done.texts / (now - last),
                p50_ms=1000 * percentile(done.latencies, 50),
                p99_ms=1000 * percentile(done.latencies, 99),
                rss_mib=procs.tree_rss_mib(self.server_pid),
                errors=done.errors,
            )
            last = now
            self.rows.append(row)
            self.errors += done.errors
            self.first_error = self.first_error or done.first_error
            note = "  (warm-up)" if len(self.rows) == 1 else ""
            print(" | ".join(f"{cell:>9}" for cell in fmt_row(row)) + note, flush=True)


def write_markdown(path: Path, command: str, rows: list[Slice], text: str, rss0: float) -> None:
    body = [
        "# Soak run",
        "",
        f"Machine: {procs.cpu_model()}, {os.cpu_count()} cores. Command: `{command}`.",
        "",
        f"Load: one-text Embed calls (every {BATCH_EVERY}th carries {BATCH_TEXTS} texts) from "
        f"closed-loop callers, plus one EmbedStream of {STREAM_TEXTS} texts every "
        f"{STREAM_EVERY_S:g} s. p50/p99 are of the one-text calls. RSS: VmRSS of the server "
        f"process tree ({rss0:.1f} MiB idle after start). The first slice is warm-up.",
        "",
        markdown_table(HEADERS, [fmt_row(row) for row in rows]),
        "",
        f"Verdict: {text}",
        "",
    ]
    path.write_text("\n".join(body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per slice")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "soak.md")
    args = parser.parse_args(argv)
    command = "python -m bench.soak " + " ".join(
        f"--{name} {getattr(args, name):g}" for name in ("minutes", "concurrency", "interval")
    )
    sentences = read_sentences()
    print(f"{procs.cpu_model()}, {os.cpu_count()} cores; {command}", flush=True)
    server = procs.start_embedd(
        args.models_dir, with_envoy=False, name="embedd-soak", extra=["--metrics-port", "0"]
    )
    child, target = server.child, server.grpc_target
    try:
        rss0 = procs.tree_rss_mib(child.pid)
        print(f"embedd serve pid {child.pid} on {target}, RSS {rss0:.1f} MiB idle", flush=True)
        print(" | ".join(f"{cell:>9}" for cell in HEADERS), flush=True)
        run = Soak(target, child.pid, sentences, args)
        asyncio.run(run.run())
        rows, errors, first_error = run.rows, run.errors, run.first_error
        if child.process.poll() is not None:
            errors += 1
            first_error = first_error or f"server exited with {child.process.returncode}"
    finally:
        child.stop()
    ok, text = verdict(rows, errors)
    if first_error:
        text += f" (first: {first_error})"
    print(("OK: " if ok else "FAILED: ") + text, flush=True)
    write_markdown(args.out, command, rows, text, rss0)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
