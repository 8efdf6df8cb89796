"""The core every transport calls: validate, tokenize, schedule, post-process.

gRPC servicers (native, OpenAI- and Ollama-shaped) only translate their messages into the
plain types here and back; every rule about inputs, limits and vectors lives in this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import numpy as np

from embedd_server.compute.engine import FloatMatrix, gives_token_states
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.chunking import (
    MEAN,
    Chunk,
    Chunking,
    chunk_strings,
    chunk_text,
    pool_chunks,
)
from embedd_server.core.classifying import (
    ClassifyOutcome,
    ClassifyParams,
    check_classify_params,
    class_scores,
    labelled,
)
from embedd_server.core.quantization import (
    CALIBRATED_TYPES,
    CALIBRATION_SET_KEY,
    CALIBRATION_SET_SHA256,
    CALIBRATION_TEXTS,
    CALIBRATION_VECTORS_KEY,
    FLOAT,
    OUTPUT_TYPES,
    ByteMatrix,
    Ranges,
    quantize,
)
from embedd_server.core.registry import LoadedModel, ModelRegistry
from embedd_server.core.request_info import (
    current_request,
    note_cache,
    note_inputs,
    note_model,
)
from embedd_server.core.reranking import (
    RerankOutcome,
    RerankParams,
    check_rerank_params,
    ranked,
    require_reranker,
    scores_of,
)
from embedd_server.core.scheduler import BULK, INTERACTIVE, LANES, Job, TokenStatesJob
from embedd_server.core.tasks import TASK_NOUNS, require_task
from embedd_server.core.tokenization import (
    DIRECTIONS,
    RIGHT,
    ForeignIds,
    PromptLengths,
    Tokenized,
    TokenizedPairs,
    Tokenizer,
    TokenSpan,
    Truncation,
    check_token_ids,
    tokenize_texts,
    too_long,
)
from embedd_server.core.vector_cache import row_keys
from embedd_server.errors import (
    EmptyInput,
    InvalidInput,
    ModelNotClassifier,
    ModelNotEmbedding,
    ModelNotReranker,
    ModelNotSparse,
    ModelWrongTask,
    NotImplementedFeature,
    RequestTooLarge,
    shorten,
)
from embedd_server.model.catalog import (
    CLASSIFY,
    EMBED,
    POOLING_TYPES,
    RERANK,
    SPARSE,
    ModelInfo,
    read_float_array,
)
from embedd_server.model.sparse import SparseRow, sparse_rows

log = logging.getLogger(__name__)

# Tokenizing more text than this runs off the event loop, so other callers are not stalled.
_INLINE_TOKENIZE_CHARS = 16_384
_UNLIMITED_TOKENS = 1 << 30
_P = ParamSpec("_P")
_T = TypeVar("_T")  # "no truncation" for a tokenizer that always truncates

# Cohere's input_type -> the prompt names that play that role, in order of preference. The
# first of them the model has with a non-empty text is used; none: no prompt at all (so a
# client that always sends input_type works with models that have no prompts).
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


@dataclass(frozen=True)
class EmbedParams:
    """One embedding request, whatever protocol it came in."""

    model: str = ""
    texts: Sequence[str] = ()
    token_ids: Sequence[Sequence[int]] = ()
    dimensions: int | None = None
    normalize: bool = True
    truncate: bool = True
    # "right" cuts the end of an over-long input (keeps its start), "left" cuts its start.
    truncation_direction: str = RIGHT
    # How the caller's protocol turns truncation on, for the error when it is off ("" where the
    # route cannot truncate: the error then only says to shorten the input).
    truncation_hint: str = ""
    # At most this many tokens per input (Cohere's max_tokens); None: the model's limit.
    max_tokens: int | None = None
    # What the caller's protocol calls max_tokens (Ollama's: "options.num_ctx"), for errors.
    max_tokens_param: str = "max_tokens"
    # Where token ids usually come from another tokenizer (OpenAI's route: tiktoken's): what
    # to tell the caller when they are not the model's; None: ids are taken as they are.
    foreign_ids_hint: str | None = None
    # The forms wanted (core.quantization.OUTPUT_TYPES), all from one forward pass: "float"
    # fills EmbedOutcome.vectors (always filled), the others EmbedOutcome.compact.
    output_types: tuple[str, ...] = (FLOAT,)
    keep_alive_s: float | None = None  # None: the model's own keep_alive
    # At most one of these three; none: the model's default prompt (see resolve_prompt).
    prompt_name: str | None = None
    prompt: str | None = None  # literal text; "" is no prompt, not even the default
    input_type: str | None = None  # Cohere's: search_query, search_document, ...
    # The scheduler lane (core.scheduler.LANES) the caller named; None: the x-embedd-lane
    # header's, else bulk where bulk_by_default (EmbedStream), else by size (choose_lane).
    lane: str | None = None
    bulk_by_default: bool = False
    # Cut each text into chunks of the model's tokens (core.chunking); None: a text is an input.
    chunking: Chunking | None = None


@dataclass(frozen=True)
class EmbedOutcome:
    """Vectors (one row per input, in order) and what they cost."""

    model: str
    vectors: FloatMatrix
    prompt_tokens: int
    load_seconds: float
    total_seconds: float
    truncated_inputs: int = 0  # inputs cut to the limit
    # Compact forms asked for, by output type: int8 / uint8 one byte per dimension, binary /
    # ubinary 8 dimensions per byte.
    compact: dict[str, ByteMatrix] = field(default_factory=dict)
    cache_hits: int = 0  # inputs answered from the vector cache
    cache_misses: int = 0  # inputs looked up there and computed (0 and 0: cache not used)
    # Chunking answered per chunk: the chunk of each row, in order; None: a row per input.
    chunks: Sequence[Chunk] | None = None


@dataclass(frozen=True)
class SparseOutcome:
    """Sparse vectors (one per input, in order) and what they cost."""

    model: str
    rows: list[SparseRow]  # each: token ids ascending, their weights
    dimensions: int  # the vocabulary size
    prompt_tokens: int
    total_seconds: float
    truncated_inputs: int = 0


@dataclass(frozen=True)
class TokenStatesOutcome:
    """Every token's last hidden state, per input (``[its tokens, hidden size]``), in order."""

    model: str
    states: list[FloatMatrix]
    prompt_tokens: int
    truncated_inputs: int = 0


# The error for "no model of this task is installed".
_REFUSALS_BY_TASK: dict[str, type[ModelWrongTask]] = {
    EMBED: ModelNotEmbedding,
    RERANK: ModelNotReranker,
    CLASSIFY: ModelNotClassifier,
    SPARSE: ModelNotSparse,
}


@dataclass(frozen=True)
class TokenizeOutcome:
    model: str
    ids: list[int]
    tokens: list[str]
    max_input_tokens: int


@dataclass(frozen=True)
class SpansOutcome:
    """Each text's tokens with where they lie in it, and the texts as tokenized (the model's
    prompt before each, lower-cased where the model lower-cases)."""

    model: str
    texts: list[str]
    spans: list[list[TokenSpan]]


@dataclass(frozen=True)
class ModelStatus:
    info: ModelInfo
    loaded: bool
    engine: str = ""  # the engine serving it; "" when not loaded
    pooling: str = ""  # the pooling it serves with when loaded; "": the file's own (info.pooling)
    alias: str = ""  # the alias (--model-aliases) this entry is listed or asked for under


@dataclass(frozen=True)
class RunningModel:
    info: ModelInfo
    expires_in_s: float  # math.inf: kept loaded forever


class EmbeddingService:
    """Embeddings, tokenization and the model catalogue, for every transport."""

    def __init__(self, settings: EngineSettings, registry: ModelRegistry) -> None:
        self._settings = settings
        self.registry = registry
        self._metrics = registry.metrics
        # Each model's raw vectors of CALIBRATION_TEXTS (for int8/uint8), made on first use.
        self._calibration: dict[ModelInfo, FloatMatrix] = {}

    @property
    def settings(self) -> EngineSettings:
        """The settings the service runs with (limits that routes report, e.g. TEI's /info)."""
        return self._settings

    async def embed(self, params: EmbedParams, deadline: float | None = None) -> EmbedOutcome:
        """Embeds the inputs; ``deadline`` is a time.monotonic() instant, or None."""
        started = time.perf_counter()
        self._check_inputs(params)
        name, info = await self._model_info(params.model)
        await self._require_task(info, EMBED)
        was_loaded = self.registry.loaded(name) is not None
        async with self.registry.lease(name, params.keep_alive_s) as model:
            dimensions = self._check_dimensions(params.dimensions, model)
            chunks = None
            if params.chunking is None:
                raw, tokenized, hits = await self._encode(params, model, deadline)
            else:
                raw, tokenized, chunks, hits = await self._encode_chunks(
                    params, params.chunking, model, deadline
                )
            vectors = _post_process(raw, dimensions, params.normalize, owned=True)
            compact = await self._compact(model, vectors, params)
        return EmbedOutcome(
            cache_hits=hits.hits,
            cache_misses=hits.misses,
            model=model.info.name,
            vectors=vectors,
            compact=compact,
            chunks=chunks,
            prompt_tokens=tokenized.token_count,
            load_seconds=0.0 if was_loaded else model.load_seconds,
            total_seconds=time.perf_counter() - started,
            truncated_inputs=tokenized.truncated,
        )

    async def _encode(
        self, params: EmbedParams, model: LoadedModel, deadline: float | None
    ) -> tuple[FloatMatrix, Tokenized, _Rows]:
        """The engine's raw rows for the request's texts (prompt prepended, tokenized, cut),
        the tokens they were computed from, and how many came from the cache."""
        prompt = resolve_prompt(params, model.info)
        texts = model_texts(params, model.info, prompt)
        tokenize_started = time.perf_counter()
        tokenized = await self._tokenize(params, texts, model)
        self._metrics.tokenize_time.observe(time.perf_counter() - tokenize_started)
        self._count_inputs(model.info.name, tokenized)
        pooling = model.options.pooling or model.info.pooling
        starts = await _off_loop_if_long(
            len(prompt),
            prompt_pooling_starts,
            model.info,
            model.tokens,
            prompt if texts else "",
            tokenized.sequences,
        )
        computed = await self._rows(
            model,
            tokenized.sequences,
            deadline,
            starts if pooling == "mean" else None,
            lane=params.lane,
            bulk_by_default=params.bulk_by_default,
        )
        raw = computed.rows
        if starts is not None and pooling == "last":
            _zero_prompt_only_rows(raw, tokenized.sequences, starts)
        return raw, tokenized, computed

    async def _encode_chunks(
        self, params: EmbedParams, chunking: Chunking, model: LoadedModel, deadline: float | None
    ) -> tuple[FloatMatrix, Tokenized, list[Chunk] | None, _Rows]:
        """Chunking: the texts cut at the model's token boundaries, every chunk's text embedded
        as an ordinary input (prompt, queue, engine), and the raw rows per chunk (with the
        chunks) or pooled per text (chunks None); the tokens are those of the chunks."""
        if params.token_ids:
            raise InvalidInput(
                "chunking cuts texts; token ids are used as they are. Send the texts.",
                param="chunking",
            )
        chunking.check(_chunk_window(params, model, resolve_prompt(params, model.info)))
        chunks = await _off_loop_if_long(
            sum(len(text) for text in params.texts),
            cut_texts,
            model.tokenizer,
            params.texts,
            model.info.do_lower_case,
            chunking,
        )
        limit = self._settings.max_inputs_per_request
        if len(chunks) > limit:  # each chunk is an input: the request's bound is theirs
            raise InvalidInput(
                f"The texts make {len(chunks)} chunks of {chunking.size} tokens; at most "
                f"{limit} inputs are allowed per request. Give a larger chunking.size or a "
                "smaller overlap, or split the request.",
                param="chunking.size",
            )
        pieces = dataclasses.replace(
            params, texts=chunk_strings(params.texts, chunks), chunking=None
        )
        raw, tokenized, computed = await self._encode(pieces, model, deadline)
        if chunking.pooling == MEAN:
            return pool_chunks(raw, chunks, len(params.texts)), tokenized, None, computed
        return raw, tokenized, chunks, computed

    async def token_states(
        self, params: EmbedParams, deadline: float | None = None, max_values: int | None = None
    ) -> TokenStatesOutcome:
        """Every token's last hidden state of each input (TEI's /embed_all): the embedding
        model's output before pooling, from an engine that gives it (ONNX Runtime's).
        ``max_values``: the most numbers the answer may hold (RequestTooLarge, before any is
        computed, for a request whose tokens times the model's width would pass it)."""
        self._check_inputs(params)
        name, info = await self._model_info(params.model)
        await self._require_task(info, EMBED)
        async with self.registry.lease(name, params.keep_alive_s) as model:
            if not gives_token_states(model.runtime):
                raise NotImplementedFeature(
                    f"Model '{model.info.name}' runs on {model.runtime.engine_name}, which gives "
                    "pooled vectors only, not each token's hidden state. Token vectors come from "
                    "the ONNX Runtime engine, which serves BERT, ModernBERT, MPNet and Gemma3 "
                    "encoders with f32 or f16 weights (the `engine` setting, default auto, "
                    "picks it for them)."
                )
            prompt = resolve_prompt(params, model.info)
            texts = model_texts(params, model.info, prompt)
            tokenized = await self._tokenize(params, texts, model)
            _check_answer_size(tokenized.token_count, model.dimensions, max_values)
            self._count_inputs(model.info.name, tokenized)
            request = current_request()
            job = TokenStatesJob(
                tokenized.sequences,
                asyncio.get_running_loop(),
                deadline,
                request_id=request.request_id if request is not None else "",
                lane=self._lane(params.lane, params.bulk_by_default, tokenized.sequences),
            )
            states = await self._await(model, job)
        ends = np.cumsum(tokenized.lengths)[:-1]
        return TokenStatesOutcome(
            model=model.info.name,
            states=np.split(states, ends),
            prompt_tokens=tokenized.token_count,
            truncated_inputs=tokenized.truncated,
        )

    async def embed_sparse(
        self, params: EmbedParams, deadline: float | None = None
    ) -> SparseOutcome:
        """Sparse vectors of the texts from a sparse (SPLADE) encoder: each text's non-zero
        weights over the vocabulary, as sentence-transformers' SparseEncoder.encode."""
        started = time.perf_counter()
        self._check_inputs(params)
        name, info = await self._model_info(params.model or await self._first_for(SPARSE))
        await self._require_task(info, SPARSE)
        async with self.registry.lease(name, params.keep_alive_s) as model:
            raw, tokenized, _ = await self._encode(params, model, deadline)
        return SparseOutcome(
            model=model.info.name,
            rows=sparse_rows(raw),
            dimensions=int(raw.shape[1]) if raw.ndim == 2 else model.dimensions,
            prompt_tokens=tokenized.token_count,
            total_seconds=time.perf_counter() - started,
            truncated_inputs=tokenized.truncated,
        )

    async def classify(
        self, params: ClassifyParams, deadline: float | None = None
    ) -> ClassifyOutcome:
        """Every label's score for each text or text pair, from a sequence classifier (or a
        one-label cross-encoder, as TEI's /predict allows); each input is one work item of
        the model's fair queue."""
        started = time.perf_counter()
        check_classify_params(params, self._settings.max_inputs_per_request)
        if params.truncation_direction not in DIRECTIONS:
            raise InvalidInput(
                f"truncation_direction must be 'right' or 'left'; got "
                f"'{shorten(params.truncation_direction)}'.",
                param="truncation_direction",
            )
        name, info = await self._model_info(params.model or await self._first_for(CLASSIFY))
        await self._require_task(info, CLASSIFY, accepted=(RERANK,))
        async with self.registry.lease(name, params.keep_alive_s) as model:
            tokenized = await self._tokenize_inputs(model, params)
            self._count_inputs(model.info.name, tokenized)
            # Token type 1 for a pair's second text only where the model's tokenizer gives it.
            types = tokenized.token_type_starts if model.info.pair_token_types else None
            logits = await self._run(model, tokenized.sequences, deadline, token_type_starts=types)
        scores = class_scores(logits, model.info.problem_type, params.raw_scores)
        return ClassifyOutcome(
            model=model.info.name,
            predictions=labelled(scores, model.info.label_names),
            prompt_tokens=tokenized.token_count,
            total_seconds=time.perf_counter() - started,
            truncated_inputs=tokenized.truncated,
        )

    async def _tokenize_inputs(self, model: LoadedModel, params: ClassifyParams) -> TokenizedPairs:
        """A classification's texts and pairs, each as the model reads it, in order, with
        where each pair's second text begins (a text's length for a single text)."""
        singles = [i for i, item in enumerate(params.inputs) if len(item) == 1]
        pairs = [i for i, item in enumerate(params.inputs) if len(item) == 2]
        sequences: list[list[int]] = [[] for _ in params.inputs]
        type_starts = [0] * len(params.inputs)
        truncated = 0
        if singles:
            truncation = Truncation(
                params.truncate, params.truncation_direction, params.truncation_hint
            )
            texts = [params.inputs[i][0] for i in singles]
            limit = model.info.max_input_tokens
            tokenized = await asyncio.to_thread(
                tokenize_texts, model.tokenizer, texts, limit, truncation
            )
            truncated += tokenized.truncated
            for index, ids in zip(singles, tokenized.sequences, strict=True):
                sequences[index], type_starts[index] = ids, len(ids)
        if pairs:
            both = [(params.inputs[i][0], params.inputs[i][-1]) for i in pairs]
            encoded = await self._tokenize_pairs(model, both, params.truncate, pairs)
            for index, ids, start in zip(
                pairs, encoded.sequences, encoded.token_type_starts, strict=True
            ):
                sequences[index], type_starts[index] = ids, start
        return TokenizedPairs(sequences, type_starts, truncated=truncated)

    async def rerank(self, params: RerankParams, deadline: float | None = None) -> RerankOutcome:
        """Scores every document against the query with a cross-encoder and ranks them.

        Each pair is one work item of the model's fair queue, so a large rerank shares the
        workers with other callers instead of holding them."""
        started = time.perf_counter()
        check_rerank_params(params, self._settings.max_inputs_per_request)
        name, info = await self._model_info(params.model or await self._first_reranker())
        rerankers = await self._models_for(RERANK) if info.task != RERANK else []
        require_reranker(info, lambda: rerankers)
        async with self.registry.lease(name, params.keep_alive_s) as model:
            pairs = [(params.query, document) for document in params.documents]
            tokenized = await self._tokenize_pairs(model, pairs, params.truncate)
            self._count_inputs(model.info.name, tokenized)
            # Token type 1 for the document only where the model's tokenizer gives types.
            types = tokenized.token_type_starts if model.info.pair_token_types else None
            logits = await self._run(model, tokenized.sequences, deadline, token_type_starts=types)
        return RerankOutcome(
            model=model.info.name,
            results=ranked(
                scores_of(logits, params.raw_scores),
                params.documents,
                params.top_n,
                params.return_documents,
            ),
            prompt_tokens=tokenized.token_count,
            total_seconds=time.perf_counter() - started,
        )

    async def _model_info(self, requested: str) -> tuple[str, ModelInfo]:
        """The model a request names, resolved once (aliases, tags, the default): its name,
        for the lease, and its catalogue entry (a loaded model's own, without the index)."""
        name = self.registry.resolve(requested)
        loaded = self.registry.loaded(name)
        return name, loaded.info if loaded is not None else await self.registry.info_of(name)

    async def _require_task(
        self, info: ModelInfo, wanted: str, accepted: Sequence[str] = ()
    ) -> None:
        """core.tasks.require_task, with the models of ``wanted`` from the index (asked
        only for the error)."""
        serving = [] if info.task in (wanted, *accepted) else await self._models_for(wanted)
        require_task(info, wanted, lambda: serving, accepted)

    async def _models_for(self, task: str) -> list[str]:
        """The catalogue's models of a task, by name (from the index as it is)."""
        return [info.name for info in await self.registry.catalogue() if info.task == task]

    async def _first_for(self, task: str) -> str:
        """The model a request of ``task`` without a model name goes to: the first of the
        catalogue with that task."""
        found = await self._models_for(task)
        if not found:
            raise _REFUSALS_BY_TASK[task](
                f"No {TASK_NOUNS[task]} is installed; import one with `embedd import DIR` "
                "and name it.",
                param="model",
            )
        return found[0]

    async def _first_reranker(self) -> str:
        """The model a rerank without a model name goes to: the first cross-encoder."""
        rerankers = await self._models_for(RERANK)
        if not rerankers:
            raise ModelNotReranker(
                "No reranker (cross-encoder) model is installed; import one with `embedd "
                "import DIR` (e.g. a BertForSequenceClassification directory) and name it.",
                param="model",
            )
        return rerankers[0]

    async def _tokenize_pairs(
        self,
        model: LoadedModel,
        pairs: list[tuple[str, str]],
        truncate: bool,
        positions: Sequence[int] | None = None,
    ) -> TokenizedPairs:
        """Pairs as the model reads them; an over-long one is InputTooLong naming its place
        in the request (``positions[i]``, default i)."""
        limit = model.info.max_input_tokens
        # Without truncation the pairs are encoded whole, once, and refused if any is too long.
        cut_at = limit if truncate else _UNLIMITED_TOKENS
        chars = sum(len(q) + len(d) for q, d in pairs)
        tokenized = await _off_loop_if_long(chars, model.tokenizer.encode_pairs, pairs, cut_at)
        for index, ids in enumerate(tokenized.sequences):
            if len(ids) > limit:
                where = index if positions is None else positions[index]
                param = f"documents[{where}]" if positions is None else f"inputs[{where}]"
                raise too_long(where, len(ids), limit, param=param)
        return tokenized

    async def _compact(
        self, model: LoadedModel, vectors: FloatMatrix, params: EmbedParams
    ) -> dict[str, ByteMatrix]:
        """The compact forms the request asks for, from its float vectors."""
        ranges = None
        if CALIBRATED_TYPES.intersection(params.output_types):
            calibration = await self._calibration_vectors(model)
            ranges = Ranges.of(_post_process(calibration, vectors.shape[1], params.normalize))
        return {
            kind: quantize(vectors, kind, ranges) for kind in params.output_types if kind != FLOAT
        }

    async def calibration_vectors(self, model_name: str) -> FloatMatrix:
        """The model's raw vectors of the calibration texts: those stored in its file, else
        computed (once per loaded file)."""
        async with self.registry.use(model_name) as model:
            return await self._calibration_vectors(model)

    async def _calibration_vectors(self, model: LoadedModel) -> FloatMatrix:
        """The model's raw vectors of the calibration texts (no prompt), computed once."""
        found = self._calibration.get(model.info)
        if found is None:
            found = await asyncio.to_thread(_stored_calibration, model.info)
        if found is None:
            calibration = EmbedParams(texts=CALIBRATION_TEXTS, prompt="")
            texts = model_texts(calibration, model.info, "")
            tokenized = tokenize_texts(
                model.tokenizer, texts, model.info.max_input_tokens, Truncation()
            )
            found = await self._run(model, tokenized.sequences, None)
        self._calibration[model.info] = found
        return found

    async def load_if_needed(self, model_name: str, keep_alive_s: float | None = None) -> str:
        """Loads the model as a call to embed would (keep_alive renewed), embeds nothing;
        returns the model's name."""
        async with self.registry.use(model_name, keep_alive_s) as model:
            note_model(model.info.name)
        return model.info.name

    async def tokenize(self, model_name: str, text: str) -> TokenizeOutcome:
        """Token ids and strings of a text, untruncated, with the model's tokenizer."""
        async with self.registry.use(model_name) as model:
            note_model(model.info.name)
            encoded = await _off_loop_if_long(len(text), model.tokenizer.encode_batch, [text])
            ids = encoded[0]
        return TokenizeOutcome(
            model=model.info.name,
            ids=ids,
            tokens=[model.tokenizer.id_to_token(token_id) for token_id in ids],
            max_input_tokens=model.info.max_input_tokens,
        )

    async def token_spans(
        self,
        model_name: str,
        texts: Sequence[str],
        add_special_tokens: bool,
        prompt_name: str | None,
    ) -> SpansOutcome:
        """Each text's tokens, untruncated, with where each lies in the text as the model
        reads it (its prompt, ``prompt_name`` or the default one, prepended)."""
        params = EmbedParams(model=model_name, texts=texts, prompt_name=prompt_name)
        self._check_inputs(params)
        async with self.registry.use(model_name) as model:
            note_model(model.info.name)
            tokenized = model_texts(params, model.info, resolve_prompt(params, model.info))
            spans = await _off_loop_if_long(
                sum(len(text) for text in tokenized),
                lambda: [model.tokenizer.spans(text, add_special_tokens) for text in tokenized],
            )
        return SpansOutcome(model.info.name, tokenized, spans)

    async def decode(
        self, model_name: str, sequences: Sequence[Sequence[int]], skip_special_tokens: bool
    ) -> tuple[str, list[str]]:
        """The model's name and the text of each sequence of token ids."""
        if not sequences:
            raise EmptyInput("The request has no ids; give at least one token id.", param="ids")
        limit = self._settings.max_inputs_per_request
        if len(sequences) > limit:
            raise InvalidInput(
                f"The request has {len(sequences)} inputs; at most {limit} are allowed per "
                "request. Split it.",
                param="ids",
            )
        async with self.registry.use(model_name) as model:
            note_model(model.info.name)
            for index, ids in enumerate(sequences):
                if not ids:
                    raise EmptyInput(f"ids {index} is empty; give at least one token id.")
                outside = next((i for i in ids if i >= model.vocab_size), None)
                if outside is not None:
                    raise InvalidInput(
                        f"ids {index} has token id {outside}, outside the model's vocabulary "
                        f"(0..{model.vocab_size - 1}).",
                        param="ids",
                    )
            texts = [model.tokenizer.decode(ids, skip_special_tokens) for ids in sequences]
        return model.info.name, texts

    async def list_models(self) -> list[ModelStatus]:
        """Every model of the models directories as they are now (files just added or
        removed included), from the index: no file is read here unless it is new."""
        return [self._status(info) for info in await self.registry.catalogue(fresh=True)]

    async def get_model(self, name: str) -> ModelStatus:
        """The model ``name`` means; asked for by an alias, the entry carries the alias."""
        status = self._status(await self.registry.info(name))
        return dataclasses.replace(status, alias=self.registry.alias_named(name))

    async def digest(self, info: ModelInfo) -> str:
        """sha256 of the model's GGUF file, hex, computed once per file version by the
        index's background task (never in the request)."""
        return await self.registry.digest(info)

    async def list_aliases(self) -> list[ModelStatus]:
        """An entry per alias (--model-aliases) whose model is in the catalogue, by alias."""
        models = {info.name: info for info in await self.registry.catalogue()}
        return [
            dataclasses.replace(self._status(models[target]), alias=alias)
            for alias, target in sorted(self._settings.aliases.items())
            if target in models
        ]

    def _status(self, info: ModelInfo) -> ModelStatus:
        loaded = self.registry.is_loaded(info.name)
        if not loaded:
            return ModelStatus(info, loaded=False)
        return ModelStatus(
            info, True, self.registry.engine_of(info.name), self.registry.pooling_of(info.name)
        )

    def is_default_model(self, name: str) -> bool:
        """Whether ``name`` (an alias, or '') means the default model."""
        return self.registry.is_default(name)

    async def load_model(
        self, name: str, options: LoadOptions, keep_alive_s: float | None
    ) -> ModelStatus:
        """Loads a model now (model control): InvalidInput for a pooling that would replace
        the model's own, Conflict for options other than those it is loaded with."""
        if options.pooling is not None and options.pooling not in POOLING_TYPES:
            raise InvalidInput(
                f"pooling must be one of {', '.join(POOLING_TYPES)}; got "
                f"'{shorten(options.pooling)}'.",
                param="pooling",
            )
        model = await self.registry.load(name, options, keep_alive_s)
        note_model(model.info.name)
        pooling = model.options.pooling or model.info.pooling
        return ModelStatus(model.info, True, model.runtime.engine_name, pooling)

    async def unload_model(self, name: str) -> ModelStatus:
        """Unloads a model once its calls in flight have finished."""
        return ModelStatus(await self.registry.unload(name), loaded=False)

    def running(self) -> list[RunningModel]:
        """The loaded models and the seconds until each expires (inf: never)."""
        now = time.monotonic()
        return [
            RunningModel(
                model.info,
                max(0.0, model.expires_at - now) if model.leases == 0 else model.keep_alive_s,
            )
            for model in self.registry.loaded_models()
        ]

    def _check_inputs(self, params: EmbedParams) -> None:
        unknown = [kind for kind in params.output_types if kind not in OUTPUT_TYPES]
        if unknown or not params.output_types:
            raise InvalidInput(
                f"The output type must be one of {', '.join(OUTPUT_TYPES)}; got "
                f"'{shorten(unknown[0] if unknown else '')}'.",
                param="output_type",
            )
        if params.truncation_direction not in DIRECTIONS:
            raise InvalidInput(
                f"truncation_direction must be 'right' or 'left'; got "
                f"'{shorten(params.truncation_direction)}'.",
                param="truncation_direction",
            )
        if params.max_tokens is not None and params.max_tokens < 1:
            raise InvalidInput(
                f"max_tokens must be at least 1; got {params.max_tokens}.", param="max_tokens"
            )
        count = len(params.texts) + len(params.token_ids)
        if params.texts and params.token_ids:
            raise InvalidInput("Give either texts or token ids, not both.", param="input")
        if count == 0:
            raise EmptyInput("The request has no input; give at least one text.", param="input")
        limit = self._settings.max_inputs_per_request
        if count > limit:
            raise InvalidInput(
                f"The request has {count} inputs; at most {limit} are allowed per request. "
                "Split it, or use EmbedStream for bulk jobs.",
                param="input",
            )
        for index, text in enumerate(params.texts):
            if not text:
                raise EmptyInput(
                    f"Input {index} is an empty string; every input needs some text.",
                    param=f"input[{index}]",
                )

    @staticmethod
    def _check_dimensions(dimensions: int | None, model: LoadedModel) -> int:
        if dimensions is None:
            return model.dimensions
        if not 1 <= dimensions <= model.dimensions:
            raise InvalidInput(
                f"dimensions must be between 1 and {model.dimensions} for model "
                f"'{model.info.name}'; got {dimensions}.",
                param="dimensions",
            )
        return dimensions

    async def _tokenize(
        self, params: EmbedParams, texts: Sequence[str], model: LoadedModel
    ) -> Tokenized:
        limit = model.info.max_input_tokens
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
            if params.texts:
                _check_room_for_text(params, model.tokens.special_count)
        truncation = Truncation(
            params.truncate, params.truncation_direction, params.truncation_hint
        )
        if params.token_ids:
            foreign = None
            if params.foreign_ids_hint is not None:
                foreign = ForeignIds(model.tokens.specials, params.foreign_ids_hint)
            return check_token_ids(params.token_ids, model.vocab_size, limit, truncation, foreign)
        return await _off_loop_if_long(
            sum(len(text) for text in texts),
            tokenize_texts,
            model.tokenizer,
            texts,
            limit,
            truncation,
        )

    def _count_inputs(self, model: str, tokenized: Tokenized) -> None:
        tokens = tokenized.token_count
        self._metrics.input_tokens.labels(model).inc(tokens)
        if tokenized.truncated:
            self._metrics.truncated_inputs.labels(model).inc(tokenized.truncated)
        note_inputs(model, len(tokenized.sequences), tokens, tokenized.truncated)

    async def _run(
        self,
        model: LoadedModel,
        sequences: Sequence[Sequence[int]],
        deadline: float | None,
        pooling_starts: Sequence[int] | None = None,
        *,
        token_type_starts: Sequence[int] | None = None,
    ) -> FloatMatrix:
        computed = await self._rows(
            model, sequences, deadline, pooling_starts, token_type_starts=token_type_starts
        )
        return computed.rows

    async def _rows(
        self,
        model: LoadedModel,
        sequences: Sequence[Sequence[int]],
        deadline: float | None,
        pooling_starts: Sequence[int] | None = None,
        *,
        token_type_starts: Sequence[int] | None = None,
        lane: str | None = None,
        bulk_by_default: bool = False,
    ) -> _Rows:
        """The engine's raw rows of ``sequences``, in order, in a matrix of the caller's own:
        those the vector cache holds from there, the others computed by the model's workers
        (only they are queued) and stored in it."""
        # Chosen (and a bad header refused) before the cache is asked, whatever it holds.
        lane = self._lane(lane, bulk_by_default, sequences)
        cache = self.registry.cache
        keys = (
            row_keys(model.cache_key, sequences, pooling_starts, token_type_starts)
            if model.cache_key
            else None
        )
        found = [cache.get(key) for key in keys] if keys is not None else [None] * len(sequences)
        misses = [i for i, row in enumerate(found) if row is None]
        rows = np.empty((len(sequences), model.dimensions), dtype=np.float32)
        if misses:
            job = Job(
                [sequences[i] for i in misses],
                model.dimensions,
                asyncio.get_running_loop(),
                deadline,
                request_id=_request_id(),
                pooling_starts=_picked(pooling_starts, misses),
                token_type_starts=_picked(token_type_starts, misses),
                lane=lane,
            )
            computed = await self._await(model, job)
            if len(misses) == len(sequences):
                rows = computed  # the job's own matrix: no copy
            else:
                rows[misses] = computed
        if keys is None:
            return _Rows(rows, 0, 0)
        for i, row in enumerate(found):
            if row is not None:
                rows[i] = row
        for i in misses:
            cache.put(model.cache_key, keys[i], rows[i])
        self._count_cache(model.info.name, len(sequences) - len(misses), len(misses))
        return _Rows(rows, len(sequences) - len(misses), len(misses))

    def _count_cache(self, model: str, hits: int, misses: int) -> None:
        if hits:
            self._metrics.cache_hits.labels(model).inc(hits)
        if misses:
            self._metrics.cache_misses.labels(model).inc(misses)
        self._metrics.cache_bytes.set(self.registry.cache.size_bytes)
        note_cache(hits, misses)

    def _lane(
        self, asked: str | None, bulk_by_default: bool, sequences: Sequence[Sequence[int]]
    ) -> str:
        """The lane of a job: the one the request names, else its x-embedd-lane header's,
        else bulk for a stream, else by size (choose_lane)."""
        if asked is None:
            request = current_request()
            if request is not None and request.lane:
                asked = request.lane
        if asked is not None:
            if asked not in LANES:
                raise InvalidInput(
                    f"The lane must be 'interactive' or 'bulk'; got '{shorten(asked)}'.",
                    param="x-embedd-lane",
                )
            return asked
        if bulk_by_default:
            return BULK
        return choose_lane(len(sequences), sum(map(len, sequences)), self._settings)

    async def _await(self, model: LoadedModel, job: Job) -> FloatMatrix:
        """Queues a job on the model's workers and waits for its rows."""
        model.queue.submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancel()  # the caller went away: its queued inputs are dropped
            raise
        finally:
            if job.started_at is not None:  # set by the worker that took its first input
                self._metrics.queue_wait.observe(job.started_at - job.created_at)


@dataclass(frozen=True)
class _Rows:
    """A job's raw rows, and how many of them the vector cache answered."""

    rows: FloatMatrix
    hits: int
    misses: int


def choose_lane(inputs: int, tokens: int, settings: EngineSettings) -> str:
    """The lane of a request that names none: bulk above ``bulk_above_inputs`` inputs or
    ``bulk_above_tokens`` tokens (a batch job: throughput matters, not its latency), else
    interactive (someone waits for it)."""
    if inputs > settings.bulk_above_inputs or tokens > settings.bulk_above_tokens:
        return BULK
    return INTERACTIVE


def _picked(values: Sequence[int] | None, indices: Sequence[int]) -> list[int] | None:
    return None if values is None else [values[i] for i in indices]


def _request_id() -> str:
    request = current_request()
    return request.request_id if request is not None else ""


def _chunk_window(params: EmbedParams, model: LoadedModel, prompt: str) -> int:
    """How many tokens of text fit in one input: the model's limit (or max_tokens) less the
    special tokens it adds and the prompt's tokens."""
    limit = model.info.max_input_tokens
    if params.max_tokens is not None:
        limit = min(limit, params.max_tokens)
    specials = model.tokens.special_count
    if model.info.do_lower_case:
        prompt = prompt.lower()
    prompt_tokens = len(model.tokenizer.encode_batch([prompt])[0]) - specials if prompt else 0
    return limit - specials - prompt_tokens


def cut_texts(
    tokenizer: Tokenizer, texts: Sequence[str], lower: bool, chunking: Chunking
) -> list[Chunk]:
    """Every text's chunks, in order, at the tokens the model's tokenizer gives it (the text
    lower-cased first where the model lower-cases, as model_texts does)."""
    chunks: list[Chunk] = []
    for index, text in enumerate(texts):
        read = text.lower() if lower else text
        if len(read) != len(text):  # offsets in the lower-cased text would not be the text's
            raise InvalidInput(
                f"Input {index} changes length when lower-cased (as this model reads it), so "
                "its chunks' offsets cannot be given; send it without chunking.",
                param=f"input[{index}]",
            )
        try:
            spans = tokenizer.spans(read, False)
        except NotImplementedFeature as error:
            raise NotImplementedFeature(
                "chunking cuts texts at the model's own token boundaries, which needs the "
                f"model's exact tokenizer. {error.message}",
                param="chunking",
            ) from None
        chunks.extend(chunk_text(index, text, spans, chunking))
    return chunks


def _check_answer_size(tokens: int, width: int, max_values: int | None) -> None:
    """RequestTooLarge when ``tokens`` vectors of ``width`` numbers pass ``max_values``."""
    if max_values is None or tokens * width <= max_values:
        return
    raise RequestTooLarge(
        f"The request's {tokens} tokens would be answered with {tokens * width:,} numbers (a "
        f"vector of {width} per token), more than the server sends in one answer "
        f"({max_values:,}, from its max_message_mb setting); send fewer or shorter inputs "
        "per request."
    )


async def _off_loop_if_long(
    chars: int, work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """``work(...)``, which tokenizes ``chars`` characters: on the event loop when they are
    few (a thread hop costs more than a short text), else in a thread, so that other callers
    are not stalled meanwhile (the tokenizers release the GIL while they work)."""
    if chars <= _INLINE_TOKENIZE_CHARS:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


def _stored_calibration(info: ModelInfo) -> FloatMatrix | None:
    """The calibration vectors `embedd import` stored in the model's file, if any."""
    flat = read_float_array(
        info.path, CALIBRATION_VECTORS_KEY, CALIBRATION_SET_KEY, CALIBRATION_SET_SHA256
    )
    shape = (len(CALIBRATION_TEXTS), info.dimensions)
    if flat is None or flat.size != shape[0] * shape[1]:
        return None
    vectors: FloatMatrix = flat.reshape(shape)
    return vectors


def resolve_prompt(params: EmbedParams, info: ModelInfo) -> str:
    """The prompt text for a request, as sentence-transformers' encode() picks it.

    A literal ``prompt`` wins; else ``prompt_name`` (which must be one of the model's prompts);
    else ``input_type`` mapped by INPUT_TYPES; else the model's ``default_prompt_name``.
    Returns "" for no prompt.
    """
    given = [
        name
        for name, value in (
            ("prompt_name", params.prompt_name),
            ("prompt", params.prompt),
            ("input_type", params.input_type),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise InvalidInput(
            f"Give at most one of prompt_name, prompt and input_type; got {' and '.join(given)}.",
            param=given[1],
        )
    if params.prompt is not None:
        return params.prompt
    if params.prompt_name is not None:
        if params.prompt_name not in info.prompts:
            raise InvalidInput(
                f"Model '{info.name}' has no prompt named '{shorten(params.prompt_name)}'; "
                f"{_prompt_list(info)}",
                param="prompt_name",
            )
        return info.prompts[params.prompt_name]
    if params.input_type is not None:
        names = INPUT_TYPES.get(params.input_type)
        if names is None:
            raise InvalidInput(
                f"input_type must be one of {', '.join(INPUT_TYPES)}; got "
                f"'{shorten(params.input_type)}'.",
                param="input_type",
            )
        return next((info.prompts[n] for n in names if info.prompts.get(n)), "")
    if info.default_prompt_name is not None:
        return info.prompts.get(info.default_prompt_name, "")
    return ""


def model_texts(params: EmbedParams, info: ModelInfo, prompt: str) -> list[str]:
    """The texts as the model's tokenizer gets them: ``prompt`` (from :func:`resolve_prompt`)
    prepended, lower-cased if the model lower-cases (sentence-transformers' do_lower_case,
    applied to prompt and text). Token ids take no prompt: [] for them."""
    if params.token_ids:
        explicit = params.prompt_name is not None or params.prompt is not None
        if prompt and (explicit or params.input_type is not None):
            raise InvalidInput(
                "A prompt applies to texts; token ids are used as they are. Prepend the "
                "prompt's tokens yourself, or send texts.",
                param="input",
            )
        return []
    texts = [prompt + text for text in params.texts] if prompt else list(params.texts)
    if info.do_lower_case:
        texts = [text.lower() for text in texts]
    return texts


def prompt_pooling_starts(
    info: ModelInfo, tokenizer: PromptLengths, prompt: str, sequences: Sequence[Sequence[int]]
) -> list[int] | None:
    """Per input, the first token that pooling counts when the model leaves its prompt out of
    pooling (sentence-transformers' ``include_prompt: false``); None when every token counts.

    As sentence-transformers: the prompt's length is that of the prompt tokenized alone
    (lower-cased if the model lower-cases, cut to the model's limit), special tokens included,
    less a closing special token; so [CLS] or BOS is left out with the prompt. Only mean and
    last-token pooling use it (CLS takes the first token whatever the mask).
    """
    if not prompt or info.include_prompt:
        return None
    if info.do_lower_case:
        prompt = prompt.lower()
    length = tokenizer.prompt_length(prompt, info.max_input_tokens)
    return [min(length, len(ids)) for ids in sequences]


def _zero_prompt_only_rows(
    vectors: FloatMatrix, sequences: Sequence[Sequence[int]], starts: Sequence[int]
) -> None:
    """Last-token pooling of an input that is all prompt (truncated inside it): with every
    token masked, sentence-transformers' gather gives the zero vector."""
    for row, (ids, start) in enumerate(zip(sequences, starts, strict=True)):
        if start >= len(ids):
            vectors[row] = 0.0


def _prompt_list(info: ModelInfo) -> str:
    if not info.prompts:
        return "it has no prompts (send a literal prompt instead)."
    return "its prompts are: " + ", ".join(f"'{name}'" for name in info.prompts) + "."


def _check_room_for_text(params: EmbedParams, specials: int) -> None:
    """InvalidInput when ``max_tokens`` leaves no token for text after the ``specials``
    special tokens the model adds to each input (a tokenizer asked to cut below those cuts
    nothing)."""
    if params.max_tokens is not None and params.max_tokens <= specials:
        raise InvalidInput(
            f"{params.max_tokens_param} {params.max_tokens} leaves no room for text: this "
            f"model's special tokens take {specials} of each input's tokens; give at least "
            f"{specials + 1}.",
            param=params.max_tokens_param,
        )


def _post_process(
    vectors: FloatMatrix, dimensions: int, normalize: bool, *, owned: bool = False
) -> FloatMatrix:
    """Keeps the first ``dimensions`` components, then L2-normalizes each row if asked.
    ``owned``: the rows are the caller's own to change (an engine's fresh answer, not the
    calibration vectors kept for later), so they are normalized where they are, not copied."""
    if dimensions < vectors.shape[1]:
        vectors = np.ascontiguousarray(vectors[:, :dimensions])
        owned = True
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)  # as torch's F.normalize: no division by zero
        if owned and vectors.flags.writeable and vectors.dtype == norms.dtype:
            vectors /= norms  # the same quotients as vectors / norms, without a new matrix
        else:
            vectors = vectors / norms
    return vectors.astype(np.float32, copy=False)
