"""What a GGUF file says about its model, read without loading the weights."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedd_server.errors import ModelLoadError
from embedd_server.model.dense import DENSE_COUNT_KEY, dense_key
from embedd_server.model.gguf_metadata import ForeignGguf, read_metadata

# llama.cpp's enum llama_pooling_type.
POOLING_NAMES = {-1: "unspecified", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
EMBEDDING_POOLINGS = frozenset({1, 2, 3})
# The poolings a model without its own can be loaded with, by name.
POOLING_TYPES = {POOLING_NAMES[number]: number for number in sorted(EMBEDDING_POOLINGS)}

# llama.cpp's enum llama_ftype (general.file_type), the common ones.
FILE_TYPE_NAMES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    11: "q3_k_s",
    12: "q3_k_m",
    13: "q3_k_l",
    14: "q4_k_s",
    15: "q4_k_m",
    16: "q5_k_s",
    17: "q5_k_m",
    18: "q6_k",
    32: "bf16",
}

RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a cross-encoder's classifier head
# ModelInfo.task: what a model is for, and so which RPCs and routes serve it.
EMBED = "embed"  # one dense vector per text (Embed, /v1/embeddings, /api/embed, ...)
RERANK = "rerank"  # a cross-encoder with one label: scores query/document pairs (Rerank)
CLASSIFY = "classify"  # a sequence classifier with N labels: class probabilities (Classify)
SPARSE = "sparse"  # SPLADE: one sparse vector over the vocabulary per text (EmbedSparse)
TASKS = (EMBED, RERANK, CLASSIFY, SPARSE)
# `embedd import` writes the task of a classifier or a sparse encoder here; a file without it
# is a reranker when its pooling is rank (llama.cpp's converter), else an embedding model.
TASK_KEY = "embedd.task"
# A classifier's problem_type (config.json): "multi_label_classification" scores each label
# with a sigmoid; anything else ("single_label_classification", none) a softmax over labels.
PROBLEM_TYPE_KEY = "embedd.problem_type"
MULTI_LABEL = "multi_label_classification"
CLASSIFIER_LABELS_SUFFIX = "classifier.output_labels"  # {arch}.<this>: the output label names
# A cross-encoder's pairs give the document token type 1 (its tokenizer's token_type_ids).
PAIR_TOKEN_TYPES_KEY = "embedd.pair_token_types"
# The family as `embedd import` knew it (distilbert, roberta, camembert, mistral, ...): llama.cpp's
# architecture `bert` holds several; a file without it gets the family from its architecture
# and tokenizer.
FAMILY_KEY = "embedd.family"
# The activation between a classifier head's two layers: tanh (BERT's pooler, RoBERTa's
# classification head, what llama.cpp's rank pooling computes) unless the file says otherwise
# (DistilBERT's pre_classifier is followed by a ReLU).
HEAD_ACTIVATION_KEY = "embedd.head_activation"
TANH, RELU = "tanh", "relu"
HEAD_ACTIVATIONS = (TANH, RELU)

# GGUF architectures of embedd's own, for families llama.cpp has no graph for (it cannot load
# such a file, not even its vocabulary): architecture -> the family's name.
OWN_ARCHITECTURES = {"mpnet": "MPNet"}

HF_TOKENIZER_KEY = "tokenizer.huggingface.json"
MAX_SEQ_LENGTH_KEY = "sentence_transformers.max_seq_length"
NORMALIZE_KEY = "sentence_transformers.normalize"
# What sentence-transformers reads from a model directory, as `embedd import` stores it.
DO_LOWER_CASE_KEY = "sentence_transformers.do_lower_case"  # lower-case texts before tokenizing
INCLUDE_PROMPT_KEY = "sentence_transformers.include_prompt"  # pool over the prompt's tokens too
PROMPTS_KEY = "sentence_transformers.prompts"  # a JSON object: prompt name -> text
DEFAULT_PROMPT_NAME_KEY = "sentence_transformers.default_prompt_name"


# llama.cpp's GGUF names of a BERT-style encoder's tensors (BERT, XLM-RoBERTa), by the Hugging
# Face module they hold (each with .weight and .bias; token types and positions .weight only).
# The converter writes them and the ONNX engine reads them back.
ENCODER_EMBEDDING_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
ENCODER_BLOCK_TENSORS = {  # per layer: encoder.layer.N.<module> -> blk.N.<name>
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}


@dataclass(frozen=True)
class ModelInfo:
    """A model of the catalogue, as its GGUF file describes it."""

    name: str
    path: Path
    architecture: str
    dimensions: int
    context_length: int
    max_input_tokens: int
    pooling: str
    quantization: str
    normalizes: bool
    vocab_size: int
    hf_tokenizer_json: str | None
    file_size_bytes: int
    created: int
    family: str = "unknown"  # bert, xlm-roberta, roberta, distilbert, qwen3, ... (FAMILY_KEY)
    do_lower_case: bool = False
    include_prompt: bool = True
    prompts: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    default_prompt_name: str | None = None
    # A cross-encoder's classifier outputs (``{arch}.classifier.output_labels``); 0 otherwise.
    labels: int = 0
    # A cross-encoder whose pairs have token type 1 from the document on (BERT's tokenizer);
    # else every token of a pair has type 0 (XLM-RoBERTa, generic tokenizers).
    pair_token_types: bool = False
    parameters: int = 0  # weights in the file's tensors
    # The task the file declares (TASK_KEY); None: from the pooling (see :attr:`task`).
    declared_task: str | None = None
    # A classifier's or cross-encoder's label names in id order (``id2label``); () otherwise.
    label_names: tuple[str, ...] = ()
    # A classifier's problem_type (PROBLEM_TYPE_KEY): how logits become probabilities.
    problem_type: str = ""
    # The activation after a cross-encoder's or classifier's first head layer.
    head_activation: str = TANH
    # How the model tokenizes ("exact" or "llama.cpp": gguf_tokenizer.tokenizer_kind), which for
    # a file without tokenizer.json means reading its vocabulary: filled in by the model index
    # off the event loop; "" in a ModelInfo read directly. Not part of equality.
    tokenizer: str = dataclasses.field(default="", compare=False)

    @property
    def embedding(self) -> bool:
        """Whether the model pools its tokens into one vector by itself."""
        return self.pooling in {POOLING_NAMES[p] for p in EMBEDDING_POOLINGS}

    @property
    def task(self) -> str:
        """What the model is for (one of TASKS): the file's own statement, else ``"rerank"``
        for a cross-encoder (pooling ``rank``: scores a query/document pair), else
        ``"embed"``."""
        if self.declared_task in TASKS:
            return self.declared_task
        return RERANK if self.pooling == POOLING_NAMES[RANK_POOLING] else EMBED


def read_model_info(path: Path) -> ModelInfo:
    """Reads a GGUF file's metadata (cached per path, size and modification time)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelLoadError(f"Cannot read model file {path}: {exc.strerror}.") from None
    # Keyed by the modification time in nanoseconds: a file rewritten within the same second
    # with the same size is another file.
    return _read_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: Path, size: int, mtime_ns: int) -> ModelInfo:
    fields = _read_fields(path)
    arch = str(fields.get("general.architecture", "unknown"))
    context_length = int(fields.get(f"{arch}.context_length", 512))
    max_seq = int(fields.get(MAX_SEQ_LENGTH_KEY, context_length))
    pooling = int(fields.get(f"{arch}.pooling_type", 0))
    file_type = fields.get("general.file_type")
    labels = _labels(fields, arch, pooling)
    vocab_size = int(fields.get("tokenizer.ggml.tokens.count", 0))
    # A cross-encoder's output is one logit per label, a sparse encoder's one weight per
    # vocabulary entry, not a hidden-size vector; after sentence-transformers Dense modules,
    # the last one's width.
    dimensions = labels or _dense_width(fields) or int(fields.get(f"{arch}.embedding_length", 0))
    if fields.get(TASK_KEY) == SPARSE:
        dimensions = vocab_size
    return ModelInfo(
        name=path.stem,
        path=path,
        architecture=arch,
        dimensions=dimensions,
        context_length=context_length,
        max_input_tokens=min(max_seq, context_length),
        pooling=POOLING_NAMES.get(pooling, str(pooling)),
        quantization=_quantization_name(file_type),
        normalizes=bool(fields.get(NORMALIZE_KEY, pooling in EMBEDDING_POOLINGS)),
        vocab_size=vocab_size,
        hf_tokenizer_json=_optional_str(fields.get(HF_TOKENIZER_KEY)),
        file_size_bytes=size,
        created=mtime_ns // 1_000_000_000,
        family=_family(fields, arch),
        do_lower_case=bool(fields.get(DO_LOWER_CASE_KEY, False)),
        include_prompt=bool(fields.get(INCLUDE_PROMPT_KEY, True)),
        prompts=_prompts(path, fields.get(PROMPTS_KEY)),
        default_prompt_name=_optional_str(fields.get(DEFAULT_PROMPT_NAME_KEY)),
        labels=labels,
        pair_token_types=_pair_token_types(fields, pooling),
        parameters=int(fields.get(PARAMETERS_FIELD, 0)),
        declared_task=_optional_str(fields.get(TASK_KEY)),
        label_names=_label_names(fields, arch, labels),
        problem_type=str(fields.get(PROBLEM_TYPE_KEY, "")),
        head_activation=str(fields.get(HEAD_ACTIVATION_KEY, TANH)),
    )


def _dense_width(fields: dict[str, Any]) -> int:
    """The output width of the Dense modules the file carries under embedd's keys; 0 without
    them (llama.cpp's own gemma-embedding projections end at the hidden size)."""
    count = int(fields.get(DENSE_COUNT_KEY, 0))
    return int(fields.get(dense_key(count - 1, "out_features"), 0)) if count else 0


def _label_names(fields: dict[str, Any], arch: str, labels: int) -> tuple[str, ...]:
    """The names of a classifier's outputs, else ``LABEL_i`` as transformers names them."""
    names = fields.get(f"{arch}.{CLASSIFIER_LABELS_SUFFIX}")
    if isinstance(names, list) and len(names) == labels:
        return tuple(str(name) for name in names)
    return tuple(f"LABEL_{i}" for i in range(labels))


def _pair_token_types(fields: dict[str, Any], pooling: int) -> bool:
    """The file's own statement; a cross-encoder from elsewhere (llama.cpp's converter) gives
    the document type 1 when the model has two token types, as BERT's tokenizer does."""
    if pooling != RANK_POOLING:
        return False
    stated = fields.get(PAIR_TOKEN_TYPES_KEY)
    if stated is not None:
        return bool(stated)
    return int(fields.get("tokenizer.ggml.token_type_count", 1)) > 1


def _labels(fields: dict[str, Any], arch: str, pooling: int) -> int:
    """A cross-encoder's number of outputs: its label names, else llama.cpp's default of 1."""
    if pooling != RANK_POOLING:
        return 0
    return int(fields.get(f"{arch}.{CLASSIFIER_LABELS_SUFFIX}.count", 1))


def _family(fields: dict[str, Any], arch: str) -> str:
    """The model family: as `embedd import` stored it, else guessed from the architecture and
    tokenizer (llama.cpp's ``bert`` architecture holds BERT, XLM-RoBERTa, RoBERTa, ...)."""
    if (stored := fields.get(FAMILY_KEY)) is not None:
        return str(stored)
    if arch == "bert":
        tokenizer_model = str(fields.get("tokenizer.ggml.model"))
        return {"t5": "xlm-roberta", "gpt2": "roberta"}.get(tokenizer_model, "bert")
    return arch


def _prompts(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    try:
        prompts = json.loads(str(value))
    except json.JSONDecodeError:
        prompts = None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(
            f"{path.name}: {PROMPTS_KEY} is not a JSON object of prompt texts; "
            "re-create the file with `embedd import`."
        )
    return {str(k): v for k, v in prompts.items()}


def _quantization_name(file_type: Any) -> str:
    if file_type is None:
        return "unknown"
    return FILE_TYPE_NAMES.get(int(file_type), f"type{int(file_type)}")


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


PARAMETERS_FIELD = "embedd.tensor_elements"  # not a GGUF key: the sum over the file's tensors


def read_float_array(path: Path, key: str, text_key: str, expected_text: str) -> Any:
    """The float32 array stored under ``key`` as a numpy vector, provided ``text_key`` holds
    ``expected_text``; None when either is absent or differs (or the file is unreadable)."""
    from gguf import GGUFReader
    from numpy import concatenate, float32

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, OSError):
        return None
    marker, field = reader.get_field(text_key), reader.get_field(key)
    if marker is None or field is None or marker.contents() != expected_text:
        return None
    if not field.data:
        return None
    return concatenate([field.parts[index] for index in field.data]).astype(float32)


def _read_fields(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file; arrays are reported by their length, and
    the weights of all tensors as PARAMETERS_FIELD (a classifier's label names in full).

    Read with core.gguf_metadata in milliseconds (gguf's reader takes seconds over a
    vocabulary); a big-endian file with gguf's reader."""
    try:
        found = read_metadata(path, wanted=lambda key: key.endswith(CLASSIFIER_LABELS_SUFFIX))
    except ForeignGguf:
        return _read_fields_with_gguf(path)
    except (ValueError, OSError) as exc:
        raise _unreadable(path, exc) from None
    values = found.values
    for key in [key for key in values if key.endswith(CLASSIFIER_LABELS_SUFFIX)]:
        values[key] = [str(name) for name in values[key]]
    values[PARAMETERS_FIELD] = found.tensor_elements
    return values


def _unreadable(path: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{path.name} is not a readable GGUF file ({exc}); re-create it with `embedd import`."
    )


def _read_fields_with_gguf(path: Path) -> dict[str, Any]:
    """What _read_fields returns, read with gguf's GGUFReader (slow over a vocabulary)."""
    from gguf import GGUFReader  # heavy import, only where needed

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, OSError) as exc:
        raise _unreadable(path, exc) from None
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if _is_array(field):
            values[f"{key}.count"] = len(field.data)
            if key.endswith(CLASSIFIER_LABELS_SUFFIX):  # a few label names: read them
                values[key] = [str(name) for name in field.contents()]
        else:
            values[key] = field.contents()
    values[PARAMETERS_FIELD] = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return values


def _is_array(field: Any) -> bool:
    from gguf import GGUFValueType

    return bool(field.types) and field.types[0] == GGUFValueType.ARRAY
