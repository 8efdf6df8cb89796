"""The rerank part of ``make bench``: a cross-encoder's pairs/s served against the same engine
in-process, on the same pairs, in one run (issue 13).

The pairs: STS-B test sentences taken in turn, each query followed by the next
``DOCUMENTS`` sentences as its candidate documents. The reranker (by default the shared
``tiny-bert-reranker``, a Hugging Face directory) is imported f32 with the server's importer
into ``.bench/rerank/``, and then measured twice:

1. In-process, no server: the runtime the server's loader picks for it (``engine=auto``) and
   one engine per worker, with the server's default settings (workers, worker processes,
   threads, pack size), the pairs tokenized beforehand with the model's pair template and
   taken from the server's FairQueue as its workers take them (``ceiling.decode_all``).
2. Served: ``embedd serve`` on a models directory holding only the reranker (its default
   model), under closed-loop ``Rerank`` RPCs of one query and its documents, from 1 and 4
   callers (pre-serialized requests, answers not parsed; one answer is checked first).

The ratio of the two is what the server costs a rerank: gRPC, tokenizing the pairs on its
event loop, the queue. With a tiny random-weight model the absolute pairs/s say nothing about
a real reranker; the ratio is the point (and is a pessimistic one: the smaller the model, the
larger the share of the fixed costs per request).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, procs
from bench.ceiling import WARMUP_DECODES, decode_all
from bench.report import NOISY_CORES, fmt_ms, fmt_rate, fmt_ratio, markdown_table, percentile
from bench.texts import REPO, model_tokenizer, read_sentences
from embedd_server.compute.engine import Engine, Runtime
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.tokenization import TokenizedPairs
from embedd_server.model.catalog import read_model_info

DEFAULT_RERANKER = REPO.parent / "shared" / "models" / "tiny-bert-reranker"
RERANK_METHOD = "/embedd.v1.Embedder/Rerank"
QUERIES = 128  # queries x (1 + DOCUMENTS) = 2,176 of STS-B test's 2,758 sentences
DOCUMENTS = 16  # candidate documents per query: one request's pairs
CONCURRENCIES = (1, 4)
IN_PROCESS_PAIRS = 250_000  # the pairs cycled to this many: the engines never run dry
REPORT_NAME = "rerank.md"
OUT_TYPE = "f32"

Say = Callable[[str], None]


@dataclass(frozen=True)
class RerankQuery:
    """One rerank request's query and its candidate documents."""

    query: str
    documents: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(self.query, document) for document in self.documents]


def build_queries(sentences: Sequence[str], queries: int, documents: int) -> list[RerankQuery]:
    """``queries`` requests from consecutive sentences: a query, then its ``documents``
    candidates (the sentences after it)."""
    if queries < 1 or documents < 1:
        raise ValueError("at least one query and one document per query")
    step = documents + 1
    if len(sentences) < queries * step:
        raise ValueError(
            f"{queries} queries of {documents} documents need {queries * step} sentences; "
            f"there are {len(sentences)}"
        )
    return [
        RerankQuery(sentences[start], list(sentences[start + 1 : start + step]))
        for start in range(0, queries * step, step)
    ]


def all_pairs(queries: Sequence[RerankQuery]) -> list[tuple[str, str]]:
    """Every query/document pair of the requests, in request order."""
    return [pair for query in queries for pair in query.pairs]


def rerank_requests(queries: Sequence[RerankQuery], model: str) -> list[bytes]:
    """Serialized ``RerankRequest`` messages (every document scored, none echoed), built
    once before the legs."""
    from embedd.v1 import embedder_pb2

    return [
        embedder_pb2.RerankRequest(
            model=model, query=query.query, documents=query.documents
        ).SerializeToString()
        for query in queries
    ]


def cycled(tokenized: TokenizedPairs, count: int) -> TokenizedPairs:
    """The tokenized pairs in turn until there are ``count`` of them (the same lists, not
    copies)."""
    size = len(tokenized.sequences)
    rows = list(itertools.islice(itertools.cycle(range(size)), count)) if size else []
    return TokenizedPairs(
        [tokenized.sequences[row] for row in rows],
        [tokenized.token_type_starts[row] for row in rows],
    )


def pack_tokens(engine_name: str, settings: EngineSettings) -> int:
    """Most tokens of one worker's pack, as the server's registry chooses for the engine: ONNX
    Runtime packs by ``onnx_batch_tokens``, llama.cpp by ``batch_tokens``."""
    if engine_name.startswith("onnxruntime"):
        return settings.onnx_batch_tokens
    return settings.batch_tokens


def layout_label(engine_name: str, settings: EngineSettings) -> str:
    """How the workers are laid out under ``settings``, for people."""
    kind = "worker processes" if settings.processes_for(engine_name) else "worker threads"
    if engine_name.startswith("onnxruntime"):
        threads = settings.onnx_threads or "all cores'"
    else:
        threads = settings.threads_per_worker
    return (
        f"{settings.workers} {kind} x {threads} threads, packs ≤"
        f"{pack_tokens(engine_name, settings)} tok"
    )


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InProcess:
    """The engines in-process on the pairs, no server."""

    layout: str
    pairs: int
    seconds: float
    other_cores: float = 0.0  # other processes on the machine meanwhile: noise
    engine_cores: float = 0.0  # this process and its worker processes: the engines' CPU

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ServedLeg:
    """Closed-loop Rerank RPCs from ``concurrency`` callers, each a query and its
    ``documents`` candidates."""

    concurrency: int
    documents: int  # per request
    requests: int  # answered OK
    errors: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cores: float = 0.0  # its processes (worker processes too)
    loop_cores: float = 0.0  # its main thread (event loop: gRPC, tokenizing), of server_cores
    generator_cores: float = 0.0
    other_cores: float = 0.0
    first_error: str = ""

    @property
    def pairs(self) -> int:
        return self.requests * self.documents

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def served_leg(
    load: loadgen.LoadResult,
    concurrency: int,
    documents: int,
    *,
    server_cores: float = 0.0,
    loop_cores: float = 0.0,
    generator_cores: float = 0.0,
    other_cores: float = 0.0,
) -> ServedLeg:
    """A leg's figures from what the load generator gave."""
    latencies = load.latencies
    return ServedLeg(
        concurrency=concurrency,
        documents=documents,
        requests=load.requests,
        errors=load.errors,
        seconds=load.seconds,
        p50_ms=percentile(latencies, 50) * 1000 if latencies else None,
        p99_ms=percentile(latencies, 99) * 1000 if latencies else None,
        server_cores=server_cores,
        loop_cores=loop_cores,
        generator_cores=generator_cores,
        other_cores=other_cores,
        first_error=load.first_error,
    )


@dataclass
class RerankBench:
    """The rerank part of one run."""

    model: str  # the imported model's name (what the requests name)
    source: str  # the Hugging Face directory it was imported from
    description: str  # its family, weights and size, for people
    engine: str  # the engine the server's loader picked (engine=auto)
    queries: int
    documents: int  # per query
    mean_pair_tokens: float
    max_tokens: int  # the model's limit: pairs are cut longest-first to it
    in_process: InProcess | None = None
    served: list[ServedLeg] = field(default_factory=list)
    tiny: bool = False  # a tiny random-weight test model: only the ratio means anything
    seconds: float = 0.0  # the whole part's wall time

    def ratio(self, leg: ServedLeg) -> float | None:
        """The leg's pairs/s over the in-process pairs/s."""
        if self.in_process is None or not self.in_process.pairs_per_s or not leg.requests:
            return None
        return leg.pairs_per_s / self.in_process.pairs_per_s

    def busiest(self) -> ServedLeg | None:
        """The served leg with the most callers."""
        return max(self.served, key=lambda leg: leg.concurrency, default=None)


def _callers(count: int) -> str:
    return f"{count} caller{'' if count == 1 else 's'}"


def summary_line(bench: RerankBench) -> str:
    """The headline: served pairs/s over in-process at the most callers measured."""
    leg = bench.busiest()
    value = None if leg is None else bench.ratio(leg)
    if leg is None or value is None or bench.in_process is None:
        return "Served / in-process: not measured."
    return (
        f"Served / in-process at {_callers(leg.concurrency)}: **{fmt_ratio(value)}** "
        f"({fmt_rate(leg.pairs_per_s)} vs {fmt_rate(bench.in_process.pairs_per_s)} pairs/s)."
    )


def render_section(bench: RerankBench, heading: str = "##") -> str:
    """The rerank section of the report: what was measured, the table, the headline ratio."""
    out = [f"{heading} Reranking: pairs/s served vs the engine in-process (issue 13)\n"]
    out.append(
        f"Reranker `{bench.model}` ({bench.description}; imported {OUT_TYPE} from "
        f"`{bench.source}`), served by **{bench.engine}** (engine=auto). Pairs: "
        f"{bench.queries} STS-B test sentences as queries, each with the next "
        f"{bench.documents} sentences as its documents ({bench.queries * bench.documents:,} "
        f"pairs, {bench.mean_pair_tokens:.1f} tokens a pair on average with the pair "
        f"template, cut at {bench.max_tokens}). In-process: the server's loader and default "
        "settings, one engine per worker taking packs from the server's queue, the pairs "
        "tokenized beforehand, no server. Served: `embedd serve` on its defaults, closed-loop "
        f"`Rerank` RPCs of one query and its {bench.documents} documents from the Python "
        "asyncio generator (its CPU shares the cores with the server: a column); a pair is "
        "one document scored. The ratio is what the server costs: gRPC, tokenizing on its "
        "event loop, the queue.\n"
    )
    if bench.tiny:
        out.append(
            "**The model is a tiny random-weight test model: absolute pairs/s say nothing "
            "about a real reranker; the served/in-process ratio is the point** (a pessimistic "
            "one: the smaller the model, the larger the share of the costs per request).\n"
        )
    rows: list[list[str]] = []
    if bench.in_process is not None:
        result = bench.in_process
        rows.append(
            [
                f"in-process ({result.layout})",
                fmt_rate(result.pairs_per_s),
                "1.00x",
                "—",
                "—",
                f"{result.pairs:,} pairs",
                "—",
                "—",
                f"{result.other_cores:.2f}",
            ]
        )
    for leg in bench.served:
        done = f"{leg.requests:,} ({leg.pairs:,} pairs)"
        if leg.errors:
            done += f", {leg.errors} errors: {leg.first_error or 'no detail'}"
        rows.append(
            [
                f"served, gRPC Rerank, {_callers(leg.concurrency)} x {leg.documents} documents",
                fmt_rate(leg.pairs_per_s) if leg.requests else "—",
                fmt_ratio(bench.ratio(leg)),
                fmt_ms(leg.p50_ms),
                fmt_ms(leg.p99_ms),
                done,
                f"{leg.server_cores:.2f} ({leg.loop_cores:.2f})",
                f"{leg.generator_cores:.2f}",
                f"{leg.other_cores:.2f}",
            ]
        )
    out.append(
        markdown_table(
            [
                "load",
                "pairs/s",
                "vs in-process",
                "p50 ms",
                "p99 ms",
                "requests done",
                "server cores (main thread)",
                "load generator cores",
                "others' cores",
            ],
            rows,
        )
    )
    out.append("")
    out.append(summary_line(bench))
    noise = noise_line(bench)
    if noise:
        out.append("")
        out.append(noise)
    return "\n".join(out)


def noise_line(bench: RerankBench) -> str:
    """A warning when other processes used the cores during a measurement; else ""."""
    values = [leg.other_cores for leg in bench.served]
    if bench.in_process is not None:
        values.append(bench.in_process.other_cores)
    worst = max(values, default=0.0)
    if worst <= NOISY_CORES:
        return ""
    return (
        f"**Shared machine: other processes used up to {worst:.2f} cores during these "
        "measurements (the last column); treat the pairs/s and the ratio as rough and re-run "
        "on a quiet machine.**"
    )


def render_document(
    bench: RerankBench, *, cpu_model: str, cores: int, date: str, command: str, quick: bool
) -> str:
    """docs/benchmarks/rerank.md: the rerank section on its own, with the run's facts."""
    mode = "quick (`--quick`: short legs, numbers are rough)" if quick else "full"
    alone = "" if "--only rerank" in command else "; `--only rerank` runs this part alone"
    return "\n".join(
        [
            "# embedd benchmark: reranking\n",
            f"- Machine: {cpu_model}, {cores} cores. Date: {date}. Run: {mode}; this part "
            f"took {bench.seconds:.0f} s.",
            f"- Command: `{command}`{alone}.",
            "",
            render_section(bench),
            "",
        ]
    )


# --- measuring ----------------------------------------------------------------------------


def describe(source: Path, family: str, quantization: str) -> str:
    """The model's family, weights and size (from its config.json, when it has one)."""
    parts = [family, quantization]
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if "hidden_size" in config and "num_hidden_layers" in config:
        parts.append(f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers")
    return ", ".join(str(part) for part in parts)


def import_reranker(source: Path, models_dir: Path, say: Say) -> Path:
    """The Hugging Face directory ``source`` imported f32 into ``models_dir`` (replacing an
    earlier import: the importer may have changed) under the directory's name."""
    from embedd_server.convert.hf_to_gguf import import_model

    models_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []  # the importer's defaults applied: its own business here
    path = import_model(
        source,
        models_dir,
        out_type=OUT_TYPE,
        name=source.name,
        overwrite=True,
        report=notes.append,
    )
    say(f"  imported {source} ({OUT_TYPE}) as {path}")
    return path


def load_runtime(model_path: Path, settings: EngineSettings) -> Runtime:
    """The server's loader on the model with ``settings``."""
    from embedd_server.engines.choice import load_runtime as server_loader

    # llama-cpp-python prints llama.cpp's load-time log through Python's sys.stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        return server_loader(read_model_info(model_path), settings, LoadOptions())


def measure_in_process(
    runtime: Runtime,
    tokenized: TokenizedPairs,
    settings: EngineSettings,
    seconds: float,
    count: int = IN_PROCESS_PAIRS,
) -> InProcess:
    """pairs/s of one engine per worker on the pairs (cycled to ``count``), as the server
    configures and feeds them; the engines are built and warmed up before the clock starts."""
    batch = EngineSettings(
        batch_tokens=pack_tokens(runtime.engine_name, settings),
        batch_sequences=settings.batch_sequences,
    )
    sample = cycled(tokenized, count)
    engines: list[Engine] = []
    try:
        engines = [runtime.new_engine() for _ in range(settings.workers)]
        decode_all(
            engines,
            sample.sequences,
            batch,
            max_packs=WARMUP_DECODES,
            token_type_starts=sample.token_type_starts,
        )
        # Metered from here: the engines' start and warm-up are not the measurement, and the
        # worker processes' CPU is the engines' (procs.CpuMeter), not other processes'.
        with procs.CpuMeter(None) as meter:
            done, took = decode_all(
                engines,
                sample.sequences,
                batch,
                seconds,
                token_type_starts=sample.token_type_starts,
            )
    finally:
        for engine in engines:
            engine.close()
    return InProcess(
        layout_label(runtime.engine_name, settings),
        done,
        took,
        meter.cores(meter.other_cpu),
        meter.cores(meter.own_cpu + meter.workers_cpu),
    )


def check_answer(target: str, model: str, query: RerankQuery) -> None:
    """One Rerank call, parsed: every document ranked once, best first; else RuntimeError."""
    from embedd import Client

    with Client(target, timeout=60) as client:
        answer = client.rerank(query.query, query.documents, model=model)
    indices = sorted(result.index for result in answer.results)
    scores = [result.score for result in answer.results]
    if indices != list(range(len(query.documents))) or scores != sorted(scores, reverse=True):
        raise RuntimeError(f"the server's rerank answer is malformed: {answer}")


def measure_served(
    models_dir: Path,
    model: str,
    queries: Sequence[RerankQuery],
    seconds: float,
    warmup_s: float,
    *,
    say: Say,
    concurrencies: Sequence[int] = CONCURRENCIES,
) -> list[ServedLeg]:
    """`embedd serve` on ``models_dir`` (the reranker its default model) under closed-loop
    Rerank calls, one leg per number of callers, each after a warm-up of the same load."""
    requests = rerank_requests(queries, model)
    documents = len(queries[0].documents)
    legs: list[ServedLeg] = []
    with procs.Children() as children:
        server = children.add_embedd(
            procs.start_embedd(
                models_dir,
                with_envoy=False,
                name="embedd-serve-rerank",
                extra=["--default-model", model],
            )
        )
        say(f"  embedd serve pid {server.child.pid} at {server.grpc_target}")
        check_answer(server.grpc_target, model, queries[0])
        for concurrency in concurrencies:
            loadgen.grpc_load(
                server.grpc_target, requests, concurrency, warmup_s, method=RERANK_METHOD
            )
            with procs.CpuMeter(server.child.pid) as meter:
                load = loadgen.grpc_load(
                    server.grpc_target, requests, concurrency, seconds, method=RERANK_METHOD
                )
            leg = served_leg(
                load,
                concurrency,
                documents,
                server_cores=meter.cores(meter.server_cpu),
                loop_cores=meter.cores(meter.main_thread_cpu),
                generator_cores=meter.cores(meter.own_cpu),
                other_cores=meter.cores(meter.other_cpu),
            )
            legs.append(leg)
            say(
                f"  served, {_callers(concurrency):9} x {documents} documents: "
                f"{fmt_rate(leg.pairs_per_s):>6} pairs/s  p50 {fmt_ms(leg.p50_ms):>6} ms  "
                f"p99 {fmt_ms(leg.p99_ms):>6} ms  errors {leg.errors}  server "
                f"{leg.server_cores:.2f} cores (main thread {leg.loop_cores:.2f}), generator "
                f"{leg.generator_cores:.2f}, others {leg.other_cores:.2f}"
                + (f"  [{leg.first_error}]" if leg.errors else "")
            )
    return legs


def run_rerank(
    source: Path,
    *,
    seconds: float,
    warmup_s: float,
    say: Say,
    sentences: Sequence[str] | None = None,
) -> RerankBench:
    """The whole rerank part: import, in-process, served."""
    from embedd_server.engines.choice import engine_for

    started = time.perf_counter()
    models_dir = procs.ensure_bench_dir() / "rerank" / source.name  # only this reranker
    model_path = import_reranker(source, models_dir, say)
    info = read_model_info(model_path)
    settings = EngineSettings(models_dir=models_dir)  # the server's defaults
    queries = build_queries(
        read_sentences() if sentences is None else sentences, QUERIES, DOCUMENTS
    )
    tokenized = model_tokenizer(model_path).encode_pairs(all_pairs(queries), info.max_input_tokens)
    bench = RerankBench(
        model=info.name,
        source=os.path.relpath(source, REPO),
        description=describe(source, info.family, info.quantization),
        engine=engine_for(info, settings, LoadOptions()),
        queries=len(queries),
        documents=DOCUMENTS,
        mean_pair_tokens=tokenized.token_count / len(tokenized.sequences),
        max_tokens=info.max_input_tokens,
        tiny=source.name.startswith("tiny-"),
    )
    runtime = load_runtime(model_path, settings)
    try:
        bench.in_process = measure_in_process(runtime, tokenized, settings, seconds)
    finally:
        runtime.close()
    say(
        f"  in-process, {bench.engine} ({bench.in_process.layout}): "
        f"{fmt_rate(bench.in_process.pairs_per_s):>6} pairs/s  "
        f"others {bench.in_process.other_cores:.2f}"
    )
    bench.served = measure_served(models_dir, info.name, queries, seconds, warmup_s, say=say)
    bench.seconds = time.perf_counter() - started
    say(f"  {summary_line(bench)}")
    return bench
