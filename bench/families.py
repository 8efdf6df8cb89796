"""The families part of ``make bench`` (issue 20): texts/s of every model family embedd serves,
on each engine that serves it, in-process and served, in one run.

Every directory of ``../shared/models`` (tiny random-weight models, one per family and task;
``--families DIR`` for another) is imported f16 with the server's importer into
``.bench/families/<model>/``: a directory of its own, so that the served catalogue holds only
the model measured. A model the importer refuses is listed with its error's first line (a
family embedd does not import yet shows so). Each engine, ONNX Runtime and llama.cpp, is then
asked whether it serves the imported model (``engines.choice.engine_for`` with the engine
forced; a refusal is listed with its reason), and each one that does is measured twice, as
bench/rerank.py measures a reranker:

1. In-process, no server: the runtime the server's loader gives with the engine forced and
   one engine per worker on the server's default settings, the inputs tokenized beforehand as
   the server tokenizes them for the model's task, taken from the server's FairQueue as its
   workers take them (``ceiling.decode_all``, through ``rerank.measure_in_process``).
2. Served: ``embedd serve --engine <engine>`` on the model's directory, under closed-loop
   native RPCs of the model's task from 1 and 4 callers (pre-serialized requests, answers not
   parsed; one answer is parsed and checked first): ``Embed`` for an embedding model,
   ``EmbedSparse`` for a sparse encoder and ``Classify`` for a classifier, each request
   ``TEXTS_PER_REQUEST`` STS-B test sentences; ``Rerank`` for a reranker, each request a query
   and its ``rerank.DOCUMENTS`` documents (as bench/rerank.py builds them: a text is a pair).

The ratio of the two is what the server costs that family's task. The models are tiny
random-weight test models: their absolute texts/s say nothing about a real model of the
family, and the ratios are pessimistic ones (the smaller the model, the larger the share of the
fixed costs per request).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench import loadgen, procs, rerank
from bench.ceiling import ENGINES
from bench.report import FAMILIES_REPORT, NOISY_CORES, fmt_rate, fmt_ratio, markdown_table
from bench.rerank import InProcess, RerankQuery, ServedLeg
from bench.texts import REPO, model_tokenizer, read_sentences
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.service import EmbedParams, model_texts, resolve_prompt
from embedd_server.core.tokenization import TokenizedPairs, Tokenizer, Truncation, tokenize_texts
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import CLASSIFY, EMBED, RERANK, SPARSE, ModelInfo, read_model_info

DEFAULT_MODELS = REPO.parent / "shared" / "models"
REPORT_NAME = FAMILIES_REPORT
OUT_TYPE: str | None = None  # each model's default type, as `embedd import` picks it (f16 or f32)
TEXTS_PER_REQUEST = 16  # an Embed / EmbedSparse / Classify request's texts
CONCURRENCIES = (1, 4)
IN_PROCESS_TEXTS = 250_000  # the inputs cycled to this many: the engines never run dry ...
IN_PROCESS_RESULT_BYTES = 512 * 2**20  # ... unless the job's result matrix would pass this
# The native RPC of each task (protos/embedd/v1/embedder.proto).
METHODS = {
    EMBED: loadgen.EMBED_METHOD,
    RERANK: rerank.RERANK_METHOD,
    CLASSIFY: "/embedd.v1.Embedder/Classify",
    SPARSE: "/embedd.v1.Embedder/EmbedSparse",
}
ERROR_CHARS = 300

Say = Callable[[str], None]


def rpc_name(task: str) -> str:
    """The RPC that serves ``task``: Embed, Rerank, Classify or EmbedSparse."""
    return METHODS[task].rsplit("/", 1)[-1]


def first_line(error: BaseException) -> str:
    """An error's first line, for a table cell: its type when it says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0][:ERROR_CHARS] if lines else type(error).__name__


# --- what a model is measured on ---------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model's inputs twice over: tokenized as the server tokenizes them for the model's
    task (in-process), and as pre-serialized requests of the task's RPC (served)."""

    task: str
    tokenized: TokenizedPairs  # type starts: a pair's document; a text's length (all type 0)
    requests: list[bytes]
    per_request: int  # inputs (texts, or a reranker's pairs) per request
    first: list[str] | RerankQuery  # the first request's inputs, for the answer's check

    @property
    def mean_tokens(self) -> float:
        sequences = self.tokenized.sequences
        return self.tokenized.token_count / len(sequences) if sequences else 0.0


def text_batches(sentences: Sequence[str], per_request: int) -> list[list[str]]:
    """Requests of ``per_request`` consecutive sentences (an incomplete last one dropped)."""
    if per_request < 1:
        raise ValueError("at least one text per request")
    count = len(sentences) // per_request * per_request
    if not count:
        raise ValueError(f"{per_request} texts per request need {per_request} sentences")
    return [list(sentences[start : start + per_request]) for start in range(0, count, per_request)]


def task_requests(task: str, model: str, batches: Sequence[Sequence[str]]) -> list[bytes]:
    """Serialized requests of ``task``'s RPC, one per batch of texts, built once before the
    legs: EmbedRequest, EmbedSparseRequest, or ClassifyRequest of single texts."""
    from embedd.v1 import embedder_pb2 as pb

    if task == EMBED:
        return [
            pb.EmbedRequest(model=model, texts=list(texts)).SerializeToString() for texts in batches
        ]
    if task == SPARSE:
        return [
            pb.EmbedSparseRequest(model=model, texts=list(texts)).SerializeToString()
            for texts in batches
        ]
    if task == CLASSIFY:
        return [
            pb.ClassifyRequest(
                model=model, inputs=[pb.ClassifyInput(text=text) for text in texts]
            ).SerializeToString()
            for texts in batches
        ]
    raise ValueError(f"task {task!r} takes no texts; choose from {EMBED}, {SPARSE}, {CLASSIFY}")


def singles(sequences: list[list[int]]) -> TokenizedPairs:
    """Texts as a worker sees them: each one's type-1 start is its length (type 0 only)."""
    return TokenizedPairs(sequences, [len(ids) for ids in sequences])


def tokenize_for_task(
    info: ModelInfo, tokenizer: Tokenizer, texts: Sequence[str]
) -> TokenizedPairs:
    """Texts tokenized as the server does for ``info``'s task, cut to the model's limit: for
    Embed and EmbedSparse with the model's default prompt (what a request naming none gets)
    and its lower-casing; for Classify as they are."""
    limit = info.max_input_tokens
    # A model pooling without its prompt gets where pooling starts from the server with each
    # input; in-process every token is pooled: a different mask, the same work.
    if info.task == CLASSIFY:
        return singles(tokenize_texts(tokenizer, texts, limit, Truncation()).sequences)
    params = EmbedParams(texts=texts)
    prompted = model_texts(params, info, resolve_prompt(params, info))
    return singles(tokenize_texts(tokenizer, prompted, limit, Truncation()).sequences)


def tokenize_pairs(
    info: ModelInfo, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> TokenizedPairs:
    """A reranker's pairs as the server tokenizes them, cut longest-first to the model's
    limit; the document's token type 1 only where the model's tokenizer gives types (the
    server passes no types otherwise)."""
    tokenized = tokenizer.encode_pairs(pairs, info.max_input_tokens)
    if info.pair_token_types:
        return tokenized
    return singles(tokenized.sequences)


def build_workload(info: ModelInfo, tokenizer: Tokenizer, sentences: Sequence[str]) -> Workload:
    """What ``info``'s model is measured on, from the STS-B sentences."""
    if info.task == RERANK:
        queries = rerank.build_queries(sentences, rerank.QUERIES, rerank.DOCUMENTS)
        return Workload(
            task=RERANK,
            tokenized=tokenize_pairs(info, tokenizer, rerank.all_pairs(queries)),
            requests=rerank.rerank_requests(queries, info.name),
            per_request=rerank.DOCUMENTS,
            first=queries[0],
        )
    batches = text_batches(sentences, TEXTS_PER_REQUEST)
    return Workload(
        task=info.task,
        tokenized=tokenize_for_task(info, tokenizer, [t for texts in batches for t in texts]),
        requests=task_requests(info.task, info.name, batches),
        per_request=TEXTS_PER_REQUEST,
        first=batches[0],
    )


def in_process_count(dimensions: int) -> int:
    """How many inputs the in-process job holds: ``IN_PROCESS_TEXTS``, fewer where its result
    matrix (inputs x dimensions float32, a sparse encoder's dimensions being its vocabulary)
    would pass ``IN_PROCESS_RESULT_BYTES``."""
    return max(1, min(IN_PROCESS_TEXTS, IN_PROCESS_RESULT_BYTES // (4 * max(1, dimensions))))


# --- checking one answer -------------------------------------------------------------------


def embeddings_fault(vectors: npt.NDArray[np.float32], texts: int, dimensions: int) -> str:
    """What is wrong with an Embed answer of ``texts`` texts ("" when nothing is)."""
    if vectors.shape != (texts, dimensions):
        return f"shape {vectors.shape}, expected {(texts, dimensions)}"
    if not np.isfinite(vectors).all():
        return "non-finite values"
    return ""


def sparse_fault(
    vectors: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]],
    texts: int,
    dimensions: int,
) -> str:
    """What is wrong with an EmbedSparse answer (each vector's indices and values): one vector
    per text, indices ascending inside the vocabulary, weights positive."""
    if len(vectors) != texts:
        return f"{len(vectors)} vectors for {texts} texts"
    for number, (indices, values) in enumerate(vectors):
        if len(indices) != len(values):
            return f"vector {number}: {len(indices)} indices, {len(values)} values"
        if len(indices) and (np.any(np.diff(indices) <= 0) or indices[-1] >= dimensions):
            return f"vector {number}: indices not ascending inside 0..{dimensions - 1}"
        if not np.all(np.asarray(values) > 0):
            return f"vector {number}: a weight that is not positive"
    return ""


def classes_fault(predictions: Sequence[Sequence[float]], texts: int, labels: int) -> str:
    """What is wrong with a Classify answer (each input's label scores in the order given):
    one classification per text, every label once, highest score first."""
    if len(predictions) != texts:
        return f"{len(predictions)} classifications for {texts} texts"
    for number, scores in enumerate(predictions):
        if len(scores) != labels:
            return f"input {number}: {len(scores)} labels, the model has {labels}"
        if list(scores) != sorted(scores, reverse=True):
            return f"input {number}: labels not highest first"
    return ""


def check_answer(target: str, info: ModelInfo, first: list[str] | RerankQuery) -> None:
    """One request of the model's task, parsed and checked; else RuntimeError."""
    from embedd import Client

    if isinstance(first, RerankQuery):
        rerank.check_answer(target, info.name, first)
        return
    with Client(target, timeout=60) as client:
        if info.task == EMBED:
            fault = embeddings_fault(
                client.embed(first, model=info.name), len(first), info.dimensions
            )
        elif info.task == SPARSE:
            answer = client.embed_sparse(first, model=info.name)
            pairs = [(vector.indices, vector.values) for vector in answer.vectors]
            fault = sparse_fault(pairs, len(first), answer.dimensions)
        else:
            result = client.classify(first, model=info.name)
            labels = len(info.label_names) or info.labels
            scores = [[label.score for label in labels_] for labels_ in result.predictions]
            fault = classes_fault(scores, len(first), labels)
    if fault:
        raise RuntimeError(f"the server's {rpc_name(info.task)} answer is malformed: {fault}")


# --- results ------------------------------------------------------------------------------


@dataclass
class EngineResult:
    """One engine on one model: measured, refused (why) or failed (the error's first line)."""

    engine: str
    in_process: InProcess | None = None  # its ``pairs`` are inputs: texts, or pairs
    served: list[ServedLeg] = field(default_factory=list)
    refusal: str = ""
    error: str = ""
    skipped: bool = False  # served but not measured: a run of the engine=auto choice only

    def leg(self, concurrency: int) -> ServedLeg | None:
        return next((leg for leg in self.served if leg.concurrency == concurrency), None)

    def ratio(self, leg: ServedLeg | None) -> float | None:
        """The leg's texts/s over the in-process texts/s."""
        if leg is None or not leg.requests or self.in_process is None:
            return None
        rate = self.in_process.pairs_per_s
        return leg.pairs_per_s / rate if rate else None

    def cpu_ratio(self, leg: ServedLeg | None) -> float | None:
        """CPU per text served (the server's processes) over CPU per text in-process (the
        engines'): what the server costs in CPU, whatever share of the cores it got."""
        if leg is None or not leg.requests or not leg.server_cores or self.in_process is None:
            return None
        engine = self.in_process
        if not engine.engine_cores or not engine.pairs_per_s or not leg.pairs_per_s:
            return None
        return (leg.server_cores / leg.pairs_per_s) / (engine.engine_cores / engine.pairs_per_s)

    @property
    def other_cores(self) -> float:
        """The most cores other processes used during one of its measurements."""
        values = [leg.other_cores for leg in self.served]
        if self.in_process is not None:
            values.append(self.in_process.other_cores)
        return max(values, default=0.0)


@dataclass
class FamilyResult:
    """One model directory: imported (its family, task and engines) or not (why)."""

    model: str
    family: str = ""
    task: str = ""
    mean_tokens: float = 0.0  # per input, special tokens (and a pair's template) included
    auto_engine: str = ""  # what engine=auto picks; "" when no engine serves it
    import_error: str = ""
    engines: list[EngineResult] = field(default_factory=list)


@dataclass
class FamiliesBench:
    """The families part of one run."""

    source: str  # the directory of model directories, as people read it
    models: list[FamilyResult] = field(default_factory=list)
    auto_only: bool = False  # each model measured on the engine engine=auto picks only
    leg_s: float = 0.0  # in-process and each served leg ran this long
    seconds: float = 0.0  # the whole part's wall time


# --- the report ---------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "—" if value is None else fmt_rate(value)


def _leg_cell(result: EngineResult, concurrency: int) -> str:
    leg = result.leg(concurrency)
    if leg is None or not leg.requests:
        return "—"
    cell = fmt_rate(leg.pairs_per_s)
    return f"{cell} ({leg.errors} errors)" if leg.errors else cell


def _ratios_cell(result: EngineResult) -> str:
    values = [result.ratio(result.leg(concurrency)) for concurrency in CONCURRENCIES]
    return " / ".join(fmt_ratio(value) for value in values)


def table_rows(bench: FamiliesBench) -> list[list[str]]:
    """A row per model and engine that measured it."""
    rows: list[list[str]] = []
    for model in bench.models:
        for result in model.engines:
            if result.in_process is None and not result.served:
                continue
            auto = " (auto)" if result.engine == model.auto_engine else ""
            rows.append(
                [
                    f"`{model.model}`",
                    model.family,
                    model.task,
                    f"{result.engine}{auto}",
                    f"{model.mean_tokens:.1f}",
                    _rate(None if result.in_process is None else result.in_process.pairs_per_s),
                    _leg_cell(result, CONCURRENCIES[0]),
                    _leg_cell(result, CONCURRENCIES[-1]),
                    _ratios_cell(result),
                    fmt_ratio(result.cpu_ratio(result.leg(CONCURRENCIES[-1]))),
                    f"{result.other_cores:.2f}",
                ]
            )
    return rows


def unmeasured_lines(bench: FamiliesBench) -> list[str]:
    """Bullets: models not imported, engines that refuse a model, measurements that failed."""
    lines = [
        f"- `{model.model}`: not imported: {model.import_error}"
        for model in bench.models
        if model.import_error
    ]
    for model in bench.models:
        for result in model.engines:
            if result.refusal:
                lines.append(f"- `{model.model}` on {result.engine}: refused: {result.refusal}")
            elif result.error:
                lines.append(f"- `{model.model}` on {result.engine}: **failed**: {result.error}")
    return lines


def render_section(bench: FamiliesBench, heading: str = "##") -> str:
    """The families section of the report: what was measured, the table, what was not."""
    callers = " and ".join(str(count) for count in CONCURRENCIES)
    out = [f"{heading} Families: texts/s per model family and engine (issue 20)\n"]
    out.append(
        "**These are tiny random-weight test models (2-3 layers, hidden size 64, small "
        "vocabularies): their absolute texts/s say nothing about a real model of the family, "
        "and the families cannot be ranked by them.** What means something is the "
        "served/in-process ratio: the share of the engine's own throughput the server delivers "
        "over gRPC, i.e. what the server costs that family's task (the RPC, tokenizing on its "
        "event loop, the queue, building the answer). It is a pessimistic figure: with a model "
        "this small the fixed costs per request weigh far more than they do with a real one; "
        "a ratio well below the others' points at that task's request or answer path. The "
        "CPU column compares the CPU each text took, the server's processes against the "
        "engines' in-process: what the server costs in CPU whatever share of the cores it "
        "got (on a shared machine the texts/s follow that share).\n"
    )
    out.append(
        f"Each directory of `{bench.source}` imported {OUT_TYPE or 'with its default type'} "
        "(f16 for an embedding model, f32 for a scorer; each into a directory of its "
        "own, so that a served catalogue holds only the model measured), on each engine that "
        "serves it (engine forced; `(auto)`: what `engine=auto` picks). Texts: STS-B test "
        "sentences; a reranker's inputs are pairs, a query followed by its "
        f"{rerank.DOCUMENTS} documents (as the rerank part builds them). In-process: the "
        "server's loader and default settings, one engine per worker taking packs from the "
        "server's queue, inputs tokenized beforehand as the server tokenizes them, no server, "
        f"{bench.leg_s:g} s. Served: `embedd serve --engine <engine>` on its defaults, "
        f"closed-loop native RPCs from {callers} callers ({bench.leg_s:g} s each, after a "
        f"warm-up) from the Python asyncio generator, which shares the cores with the server: "
        f"`Embed`, `EmbedSparse` or `Classify` of {TEXTS_PER_REQUEST} texts, or `Rerank` of a "
        f"query and {rerank.DOCUMENTS} documents (a text is then a pair); one answer is parsed "
        "and checked first. Tokens: per input, special tokens included.\n"
    )
    rows = table_rows(bench)
    if rows:
        out.append(
            markdown_table(
                [
                    "model",
                    "family",
                    "task",
                    "engine",
                    "tokens",
                    "in-process texts/s",
                    f"served, {CONCURRENCIES[0]} caller",
                    f"served, {CONCURRENCIES[-1]} callers",
                    "served / in-process (" + " / ".join(map(str, CONCURRENCIES)) + " callers)",
                    f"CPU per text, served / in-process ({CONCURRENCIES[-1]} callers)",
                    "others' cores",
                ],
                rows,
            )
        )
    else:
        out.append("No model was measured.")
    if bench.auto_only:
        out.append(
            "\nThis run measured each model on the engine `engine=auto` picks only (`--quick`); "
            "a full run measures every engine that serves it."
        )
    unmeasured = unmeasured_lines(bench)
    if unmeasured:
        out.append("\nNot measured:\n")
        out.extend(unmeasured)
    noise = noise_line(bench)
    if noise:
        out.append("")
        out.append(noise)
    return "\n".join(out)


def noise_line(bench: FamiliesBench) -> str:
    """A warning when other processes used the cores during a measurement; else ""."""
    worst = max(
        (result.other_cores for model in bench.models for result in model.engines), default=0.0
    )
    if worst <= NOISY_CORES:
        return ""
    return (
        f"**Shared machine: other processes used up to {worst:.2f} cores during these "
        "measurements (the last column); treat the texts/s and the ratios as rough and re-run "
        "on a quiet machine.** The kernel shares busy cores among the runnable processes, so "
        "the server's processes (and the load generator beside them) can get a larger share "
        "than the engines alone in-process: a served/in-process ratio above "
        "1x is that, not a server faster than its engine; the CPU per text column is not "
        "swayed by it."
    )


def render_document(
    bench: FamiliesBench, *, cpu_model: str, cores: int, date: str, command: str, quick: bool
) -> str:
    """docs/benchmarks/families.md: the families section on its own, with the run's facts."""
    mode = "quick (`--quick`: short legs, numbers are rough)" if quick else "full"
    alone = "" if "--only families" in command else "; `--only families` runs this part alone"
    return "\n".join(
        [
            "# embedd benchmark: model families\n",
            f"- Machine: {cpu_model}, {cores} cores. Date: {date}. Run: {mode}; this part "
            f"took {bench.seconds:.0f} s.",
            f"- Command: `{command}`{alone}.",
            "",
            render_section(bench),
            "",
        ]
    )


# --- measuring ----------------------------------------------------------------------------


def import_family(source: Path, models_dir: Path) -> Path:
    """``source`` imported f16 into ``models_dir`` under the directory's name (replacing an
    earlier import: the importer may have changed)."""
    from embedd_server.convert.hf_to_gguf import import_model

    models_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []  # the importer's defaults applied: its own business here
    return import_model(
        source, models_dir, out_type=OUT_TYPE, name=source.name, overwrite=True, report=notes.append
    )


def engine_refusal(info: ModelInfo, engine: str) -> str:
    """Why ``engine``, forced, does not serve ``info`` (the server's words); "" when it does."""
    from embedd_server.engines.choice import engine_for

    try:
        engine_for(info, EngineSettings(engine=engine), LoadOptions())
    except ModelLoadError as error:
        return first_line(error)
    return ""


def auto_engine(info: ModelInfo) -> str:
    """The engine ``engine=auto`` picks for ``info``; "" when none serves it."""
    from embedd_server.engines.choice import engine_for

    try:
        return engine_for(info, EngineSettings(), LoadOptions())
    except ModelLoadError:
        return ""


def measure_served(
    models_dir: Path,
    info: ModelInfo,
    engine: str,
    workload: Workload,
    *,
    seconds: float,
    warmup_s: float,
    say: Say,
) -> list[ServedLeg]:
    """``embedd serve --engine engine`` on ``models_dir`` under closed-loop calls of the
    task's RPC, one leg per number of callers, each after a warm-up of the same load."""
    method = METHODS[workload.task]
    legs: list[ServedLeg] = []
    with procs.Children() as children:
        server = children.add_embedd(
            procs.start_embedd(
                models_dir,
                with_envoy=False,
                name=f"embedd-serve-{info.name}-{engine}",
                extra=["--engine", engine, "--default-model", info.name],
            )
        )
        check_answer(server.grpc_target, info, workload.first)
        for concurrency in CONCURRENCIES:
            loadgen.grpc_load(
                server.grpc_target, workload.requests, concurrency, warmup_s, method=method
            )
            with procs.CpuMeter(server.child.pid) as meter:
                load = loadgen.grpc_load(
                    server.grpc_target, workload.requests, concurrency, seconds, method=method
                )
            leg = rerank.served_leg(
                load,
                concurrency,
                workload.per_request,
                server_cores=meter.cores(meter.server_cpu),
                loop_cores=meter.cores(meter.main_thread_cpu),
                generator_cores=meter.cores(meter.own_cpu),
                other_cores=meter.cores(meter.other_cpu),
            )
            legs.append(leg)
            say(
                f"    served, {concurrency} caller(s) x {workload.per_request}: "
                f"{fmt_rate(leg.pairs_per_s):>7} texts/s  errors {leg.errors}  server "
                f"{leg.server_cores:.2f} cores, others {leg.other_cores:.2f}"
                + (f"  [{leg.first_error}]" if leg.errors else "")
            )
    return legs


def measure_engine(
    info: ModelInfo,
    workload: Workload,
    engine: str,
    seconds: float,
    warmup_s: float,
    *,
    say: Say,
) -> EngineResult:
    """One engine on one model: refused, or measured in-process and then served; a failure
    is kept as its first line (the other models go on)."""
    result = EngineResult(engine, refusal=engine_refusal(info, engine))
    if result.refusal:
        say(f"  {engine}: refused: {result.refusal}")
        return result
    settings = EngineSettings(models_dir=info.path.parent, engine=engine)  # the defaults
    try:
        runtime = rerank.load_runtime(info.path, settings)
        try:
            result.in_process = rerank.measure_in_process(
                runtime,
                workload.tokenized,
                settings,
                seconds,
                in_process_count(runtime.dimensions),
            )
        finally:
            runtime.close()
        say(
            f"  {engine}: in-process {fmt_rate(result.in_process.pairs_per_s):>7} texts/s "
            f"({result.in_process.layout}), others {result.in_process.other_cores:.2f}"
        )
        result.served = measure_served(
            info.path.parent, info, engine, workload, seconds=seconds, warmup_s=warmup_s, say=say
        )
    # A family another branch is adding may fail anywhere in an engine or the server: it is
    # reported as such, and the other models are still measured.
    except Exception as error:
        result.error = first_line(error)
        say(f"  {engine}: failed: {result.error}")
    return result


def measure_model(
    source: Path,
    root: Path,
    sentences: Sequence[str],
    seconds: float,
    warmup_s: float,
    *,
    say: Say,
    auto_only: bool = False,
) -> FamilyResult:
    """One model directory: imported into ``root/<name>/``, then each engine (only the one
    ``engine=auto`` picks with ``auto_only``; the others' refusals are still listed)."""
    result = FamilyResult(source.name)
    try:
        path = import_family(source, root / source.name)
        info = read_model_info(path)
        workload = build_workload(info, model_tokenizer(path), sentences)
    # The importer refuses a family it does not know (ModelImportError); one being added on
    # another branch may fail otherwise. Either way the model is listed with the error.
    except Exception as error:
        result.import_error = first_line(error)
        say(f"{source.name}: not imported: {result.import_error}")
        return result
    result.family, result.task = info.family, info.task
    result.mean_tokens = workload.mean_tokens
    result.auto_engine = auto_engine(info)
    say(f"{source.name}: {info.family}, {info.task}, {workload.mean_tokens:.1f} tokens/input")
    for engine in ENGINES:
        if auto_only and engine != result.auto_engine:
            refusal = engine_refusal(info, engine)
            result.engines.append(EngineResult(engine, refusal=refusal, skipped=not refusal))
            continue
        result.engines.append(measure_engine(info, workload, engine, seconds, warmup_s, say=say))
    return result


def model_dirs(models: Path) -> list[Path]:
    """The model directories of ``models`` (each holding a config.json), by name."""
    return sorted(path for path in models.iterdir() if (path / "config.json").is_file())


def run_families(
    models: Path,
    *,
    seconds: float,
    warmup_s: float,
    say: Say,
    sentences: Sequence[str] | None = None,
    auto_only: bool = False,
) -> FamiliesBench:
    """The whole families part: every model directory of ``models``, every engine that
    serves it (or only the one ``engine=auto`` picks, with ``auto_only``)."""
    started = time.perf_counter()
    root = procs.ensure_bench_dir() / "families"
    texts = read_sentences() if sentences is None else sentences
    bench = FamiliesBench(source=os.path.relpath(models, REPO), leg_s=seconds, auto_only=auto_only)
    for source in model_dirs(models):
        bench.models.append(
            measure_model(source, root, texts, seconds, warmup_s, say=say, auto_only=auto_only)
        )
    bench.seconds = time.perf_counter() - started
    measured = len(table_rows(bench))
    say(f"  {measured} model/engine pairs measured in {bench.seconds:.0f} s")
    return bench
